"""whisper-lens as a drop-in for openai-whisper: the same Python call and result, the same command line and files.

The reference is openai-whisper itself on the same weights (real tiny.en): ``whisper.transcribe`` for
the Python call, its ``whisper`` command run in-process for the command line. openai-whisper's DTW
runs as its plain-Python function (``py_func``: the same code without numba's compilation).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import soundfile

import whisper_lens as wl
from whisper_lens import cli

from .conftest import DATA, openai_alignment_heads

OFFICIAL_HEADS = [(1, 0), (2, 0), (2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)]  # tiny.en's


def joined(names: list[str], pause: float) -> np.ndarray:
    gap = np.zeros(int(pause * 16000), np.float32)
    return np.concatenate([x for n in names for x in (wl.load_audio(DATA / n), gap)])


@pytest.fixture(scope="module")
def openai_tiny(real_tiny_en_openai, monkeypatch_module):
    """openai-whisper's tiny.en with OpenAI's alignment heads, and its DTW as plain Python."""
    import whisper.timing

    monkeypatch_module.setattr(whisper.timing, "dtw_cpu", whisper.timing.dtw_cpu.py_func)
    monkeypatch_module.setattr(whisper.timing, "backtrace", whisper.timing.backtrace.py_func)
    with openai_alignment_heads(real_tiny_en_openai, OFFICIAL_HEADS) as model:
        yield model


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


@pytest.fixture(scope="module")
def minute():
    """64.5 s of real speech: the twelve test clips, 2 s of silence after each (three windows)."""
    names = list(json.loads((DATA / "transcripts.json").read_text()))
    audio = joined(names, 2.0)
    assert len(audio) / 16000 >= 60
    return audio


def assert_same(ours, ref, path: str = "result") -> None:
    """Equal dicts: the same keys in the same order, the same types; times within 0.01 s, log-probabilities and
    probabilities within 1e-3, everything else (text, tokens, ids, seeks, temperatures, ratios) identical."""
    if isinstance(ref, dict):
        assert type(ours) is dict and list(ours) == list(ref), (path, list(ours), list(ref))
        for key in ref:
            assert_same(ours[key], ref[key], f"{path}[{key!r}]")
    elif isinstance(ref, list):
        assert type(ours) is list and len(ours) == len(ref), (path, ours, ref)
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float):  # np.float64 too: a float
        assert type(ours) is float, (path, type(ours))
        if path.endswith(("['start']", "['end']")):
            assert abs(ours - ref) <= 0.01, (path, ours, ref)
        elif path.endswith(("['avg_logprob']", "['no_speech_prob']", "['probability']")):
            assert abs(ours - ref) <= 1e-3, (path, ours, ref)
        else:
            assert ours == ref, (path, ours, ref)
    else:
        assert type(ours) is type(ref) and ours == ref, (path, ours, ref)


# ----------------------------------------------------------------------------- the Python call

OPTION_SETS = [
    {},  # openai-whisper's defaults: the fallback temperatures, greedy
    dict(word_timestamps=True),
    dict(clip_timestamps="5,25,40"),
    dict(clip_timestamps=[0, 12.5, 30.0, 45.2], word_timestamps=True),
    dict(word_timestamps=True, hallucination_silence_threshold=0.5),
    dict(initial_prompt="Jane Austen, cards.", carry_initial_prompt=True),
    dict(initial_prompt="Jane Austen.", condition_on_previous_text=False),
    # every window fails the ratio: decoded again at each temperature (tiny ones: sampling that equals greedy)
    dict(temperature=(0.0, 1e-6), compression_ratio_threshold=1.2),
    dict(logprob_threshold=None, no_speech_threshold=None, without_timestamps=True),
    dict(sample_len=40, suppress_blank=False, max_initial_timestamp=None),
    dict(beam_size=3, patience=1.5, temperature=0.0),
    dict(word_timestamps=True, prepend_punctuations="", append_punctuations="."),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=[",".join(o) or "defaults" for o in OPTION_SETS])
def test_transcribe_dict_equals_openai_whisper(real_tiny_en, openai_tiny, minute, options):
    """``wl.transcribe(model, audio, **options).to_dict()`` is ``whisper.transcribe(model, audio, **options)``."""
    import whisper

    ref = whisper.transcribe(openai_tiny, minute, fp16=False, **options)
    ours = wl.transcribe(real_tiny_en, minute, **options)
    assert_same(ours.to_dict(), ref)
    assert ours["text"] == ref["text"] and ours["language"] == ref["language"] == "en"
    if options.get("word_timestamps"):
        assert ours["segments"][0]["words"][0]["start"] == ours.segments[0].words[0].start


def test_result_reads_as_a_dict(real_tiny_en):
    """Keys, get, `in`, items: as the dict; fp16=True on the CPU warns as openai-whisper does and runs fp32."""
    audio = wl.load_audio(DATA / "austen-0880.flac")
    with pytest.warns(UserWarning, match="FP16 is not supported on CPU"):
        t = wl.transcribe(real_tiny_en, audio, fp16=True, verbose=None, word_timestamps=True)
    assert list(t.keys()) == ["text", "segments", "language"] and "windows" not in t
    seg = t["segments"][0]
    assert seg.get("words")[0]["word"] == seg.words[0].word and dict(seg.items())["id"] == 0
    assert json.loads(json.dumps(t.to_dict())) == t.to_dict()
    assert model_transcribe_is_the_same(real_tiny_en, audio, t)
    with pytest.raises(TypeError, match="did you mean 'word_timestamps'"):
        wl.transcribe(real_tiny_en, audio, word_timestamp=True)


def model_transcribe_is_the_same(model, audio, t) -> bool:
    return model.transcribe(audio, word_timestamps=True).to_dict() == t.to_dict()


def test_verbose_prints_openai_whispers_lines(real_tiny_en, capsys):
    audio = wl.load_audio(DATA / "austen-0880.flac")
    t = wl.transcribe(real_tiny_en, audio, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[00:{s.start:06.3f} --> 00:{s.end:06.3f}] {s.text}" for s in t.segments]


# ----------------------------------------------------------------------------- the command line

FAST = ["--beam_size", "1", "--best_of", "1"]  # greedy: the layouts below do not need beam search's cost
COMMAND_LINES = [
    [],  # openai-whisper's defaults: all formats, beam 5, best of 5
    ["--output_format", "srt", "--language", "en", "--task", "transcribe"],
    ["--word_timestamps", "True", "--highlight_words", "True", "-f", "vtt", *FAST],
    ["--word_timestamps", "True", "--max_line_width", "42", "--max_line_count", "2", "-f", "srt", *FAST],
    ["--word_timestamps", "True", "--max_words_per_line", "3", "-f", "srt", *FAST],
    ["--word_timestamps", "True", "--max_line_width", "20", "-f", "vtt", *FAST],
    ["--temperature", "0", "--temperature_increment_on_fallback", "None", "--beam_size", "1", "-f", "tsv"],
    ["--initial_prompt", "Jane Austen.", "--carry_initial_prompt", "True", "-f", "txt", *FAST],
    ["--condition_on_previous_text", "False", "--best_of", "2", "--beam_size", "2", "-f", "tsv"],
    ["--clip_timestamps", "5,25,32", "-f", "json", *FAST],
    ["--fp16", "False", "--no_speech_threshold", "0.3", "--logprob_threshold", "-0.5", "-f", "srt", *FAST],
    ["--word_timestamps", "True", "--hallucination_silence_threshold", "0.5", "-f", "json", *FAST],
]


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory):
    """33 s of real speech as a 16-bit wav: four clips, 3 s of silence after each (two windows)."""
    path = tmp_path_factory.mktemp("speech") / "talk.wav"
    names = ["austen-0870.flac", "austen-0880.flac", "austen-0890.flac", "austen-0920.flac"]
    soundfile.write(path, joined(names, 3.0), 16000, subtype="PCM_16")
    return path


def run_openai_whisper(argv: list[str], openai_model, monkeypatch) -> None:
    """openai-whisper's ``whisper`` command in this process, on ``openai_model`` (tiny.en with its heads)."""
    import whisper

    monkeypatch.setattr(whisper, "load_model", lambda *a, **k: openai_model)
    monkeypatch.setattr(sys, "argv", ["whisper", *argv])
    sys.modules["whisper.transcribe"].cli()  # (whisper.transcribe is the function, as ours)


@pytest.mark.parametrize("args", COMMAND_LINES, ids=[" ".join(a) or "defaults" for a in COMMAND_LINES])
def test_command_line_writes_openai_whispers_files(args, speech_file, real_tiny_en_pt, openai_tiny, tmp_path,
                                                   monkeypatch, capsys):  # fmt: skip
    """``whisper-lens transcribe ARGS`` writes the files ``whisper ARGS`` writes, byte for byte (json: as data)."""
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    common = [str(speech_file), "--model", str(real_tiny_en_pt)]
    run_openai_whisper([*common, "-o", str(theirs), *args], openai_tiny, monkeypatch)
    assert cli.main(["transcribe", *common, "-o", str(ours), "--verbose", "False", "--no-progress", *args]) == 0
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names and names  # the same files and nothing else
    for name in names:
        if name.endswith(".json"):
            assert_same(json.loads((ours / name).read_text()), json.loads((theirs / name).read_text()))
        else:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


# ----------------------------------------------------------------------------- output folders, models, audio

SAMPLE = wl.loading.SHIPPED["toy"] / "samples" / "sample1.wav"


def toy_transcribe(*args: str) -> int:
    return cli.main(["transcribe", "--model", "toy", "--no-progress", "--quiet", *args])


def test_output_folder_keeps_the_users_files(tmp_path, capsys):
    """Only the transcript names are written; existing ones need --overwrite; nothing deleted, no hidden file."""
    folder = tmp_path / "transcripts"
    folder.mkdir()
    (folder / "notes.md").write_text("mine")
    (folder / "sample1.srt").write_text("written by whisper")
    audio = tmp_path / "sample1.wav"
    audio.write_bytes(SAMPLE.read_bytes())
    assert toy_transcribe(str(audio), "-o", str(folder)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sample1.srt already exist" in err and "--overwrite" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.md", "sample1.srt"]  # refused before any work
    assert (folder / "sample1.srt").read_text() == "written by whisper"
    assert toy_transcribe(str(audio), "-o", str(folder), "--overwrite") == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["notes.md", "sample1.json", "sample1.srt", "sample1.tsv", "sample1.txt", "sample1.vtt"]
    assert (folder / "notes.md").read_text() == "mine" and "-->" in (folder / "sample1.srt").read_text()
    assert toy_transcribe(str(audio), "-o", str(folder), "-f", "txt") == 2  # ours now, but not known to be: refused


def test_no_model_is_never_the_toy(tmp_path, monkeypatch, capsys):
    """Without --model and without a real model on disk: one line saying how to pick one (never the toy)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    for command in (["transcribe", str(SAMPLE)], ["lens", str(SAMPLE), "--out", "l"], ["attention", str(SAMPLE)]):
        assert cli.main([*command, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--model NAME" in err and "--model toy" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_names_of_openai_whisper_and_faster_whisper():
    """`large` and distil-whisper's names are known; download_root and local_files_only are taken."""
    import faster_whisper.utils
    import whisper

    from whisper_lens.loading import ALIASES, DISTIL, NAMES, CheckpointError

    assert set(whisper.available_models()) <= set(NAMES) and set(faster_whisper.utils._MODELS) <= set(NAMES)
    assert ALIASES["large"] == "large-v3" and DISTIL["distil-large-v3"][2].n_text_layer == 2
    with pytest.raises(CheckpointError, match="local_files_only") as e:
        wl.load_model("distil-small.en", download_root="/nonexistent/models", local_files_only=True)
    assert "\n" not in str(e.value)


def test_version_and_list_options_leave_positionals(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"whisper-lens {version('whisper-lens')}"
    args = cli.build_parser().parse_args(cli.split_list_options(["export", "--trace", "encoder.*", "logits",
                                                                 str(DATA), "--out", "x"]))  # fmt: skip
    assert args.trace == ["encoder.*", "logits"] and args.audio == [str(DATA)]
    args = cli.build_parser().parse_args(cli.split_list_options(["sweep", "--removals", "0", "2", str(DATA),
                                                                 "--stack", "encoder", "--out", "x"]))  # fmt: skip
    assert args.removals == [0, 2] and args.audio == [str(DATA)]
    for command in cli.build_parser()._subparsers._group_actions[0].choices.values():
        flags = {f for a in command._actions for f in a.option_strings}
        assert {"--quiet", "--no-progress"} <= flags, command.prog


CONTAINERS = [("m4a", "aac"), ("mp4", "aac"), ("webm", "libopus"), ("ogg", "libopus"), ("opus", "libopus"),
              ("mp3", "libmp3lame"), ("flac", "flac"), ("wav", "pcm_s16le")]  # fmt: skip


def encode(samples: np.ndarray, path, codec: str) -> None:
    """Write 16 kHz mono samples to ``path`` with PyAV (48 kHz for the codecs that want it)."""
    import av

    rate = 48000 if codec in ("libopus",) else 16000
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = 16000
        for f in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))


@pytest.mark.parametrize("suffix, codec", CONTAINERS, ids=[s for s, _ in CONTAINERS])
def test_every_container_without_an_ffmpeg_program(suffix, codec, tmp_path, monkeypatch):
    """m4a ... wav made by PyAV are read with no ffmpeg on PATH: the same sound (correlation > 0.9)."""
    samples = wl.load_audio(SAMPLE)
    path = tmp_path / f"clip.{suffix}"
    encode(samples, path, codec)
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg program anywhere
    audio = wl.load_audio(path)
    assert audio.dtype == np.float32 and abs(len(audio) - len(samples)) < 0.2 * 16000  # codecs pad a few frames
    n = len(samples) - 3200
    shift = int(np.argmax(np.correlate(audio[: n + 3200], samples[:n], "valid")))  # a codec's delay, up to 0.2 s
    assert np.corrcoef(audio[shift : shift + n], samples[:n])[0, 1] > 0.9


def test_bad_audio_is_one_line_naming_file_and_reason(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "broken.m4a"
    bad.write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"garbage" * 100)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError) as e:
        wl.load_audio(bad)
    message = str(e.value)
    assert str(bad) in message and message.split(": ", 1)[1].strip() and "\n" not in message
    assert toy_transcribe(str(bad), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.m4a" in err


def test_study_commands_on_a_long_file_point_to_transcribe(tmp_path, capsys):
    """`lens` reads one window: on a longer file it names the command that takes any length."""
    long = tmp_path / "long.wav"
    soundfile.write(long, np.concatenate([wl.load_audio(SAMPLE)] * 4), 16000)  # 5.6 s: longer than the toy's 4 s
    assert cli.main(["lens", str(long), "--model", "toy", "--out", str(tmp_path / "l"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "long.wav" in err and "whisper-lens transcribe" in err, err
