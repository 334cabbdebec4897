"""Long-form transcription, word timestamps, alignment heads and the subtitle writers.

The reference is openai-whisper's ``transcribe`` on the same weights (real tiny.en) and the same
long recordings: the real test clips joined with pauses. openai-whisper's DTW is run as its
plain-Python function (``py_func``: the same code without numba's compilation, which would cost
tens of seconds in CI). Cheaper behaviours run on the shipped toy model (4 s window).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

import whisper_lens as wl
from whisper_lens import files
from whisper_lens.alignment import dtw, median_filter
from whisper_lens.audio import N_SAMPLES, log_mel_spectrogram, mel_frames, mel_peak
from whisper_lens.decoding import segments
from whisper_lens.files import MARKER
from whisper_lens.loading import SHIPPED
from whisper_lens.longform import Segment, Transcript, Window
from whisper_lens.writers import FORMATS, OutputFolder, render

from .conftest import DATA, openai_alignment_heads, real_tiny_en_folder

SAMPLES = SHIPPED["toy"] / "samples"  # the toy's five sentences, 1.4-2.6 s each
OFFICIAL_HEADS = [(1, 0), (2, 0), (2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)]  # tiny.en's, from its config.json


def joined(paths, pause: float) -> np.ndarray:
    """The clips one after another, ``pause`` seconds of silence after each."""
    gap = np.zeros(int(pause * 16000), np.float32)
    return np.concatenate([x for p in paths for x in (wl.load_audio(p), gap)])


@pytest.fixture(scope="module")
def toy():
    return wl.load_model("toy")


@pytest.fixture(scope="module")
def openai_with_heads(real_tiny_en_openai):
    """openai-whisper's tiny.en with OpenAI's alignment heads (the fixture's model has the default: half the layers)."""
    with openai_alignment_heads(real_tiny_en_openai, OFFICIAL_HEADS) as model:
        yield model


def test_official_heads_are_the_checkpoints(real_tiny_en):
    """transcribe's default heads (``model.alignment_heads``, read by load_model) are the checkpoint's."""
    config = json.loads((real_tiny_en_folder() / "config.json").read_text())
    assert [tuple(h) for h in config["alignment_heads"]] == OFFICIAL_HEADS == list(real_tiny_en.alignment_heads)


# ----------------------------------------------------------------------------- equal to openai-whisper


def test_long_form_equals_openai_whisper(real_tiny_en, openai_with_heads, real_clips, monkeypatch):
    """Two long recordings decoded as one batch: segments and words equal openai-whisper's, one at a time."""
    import whisper
    import whisper.timing

    monkeypatch.setattr(whisper.timing, "dtw_cpu", whisper.timing.dtw_cpu.py_func)
    monkeypatch.setattr(whisper.timing, "backtrace", whisper.timing.backtrace.py_func)
    paths = [p for p, _ in real_clips]
    first = joined(paths, 2.0)  # 64.5 s: three windows
    second = joined(paths[::-1][:7], 1.0)  # 24.4 s: one window, the clips reversed
    assert len(first) / 16000 >= 60
    ours = real_tiny_en.transcribe([first, second], temperature=0.0, word_timestamps=True)  # the model's heads
    for audio, mine in zip([first, second], ours, strict=True):
        with torch.no_grad():
            ref = whisper.transcribe(openai_with_heads, audio, temperature=0.0, condition_on_previous_text=True,
                                     word_timestamps=True, fp16=False)  # fmt: skip
        assert mine.text == ref["text"] and mine.language == ref["language"]
        assert len(mine.segments) == len(ref["segments"])
        for seg, r in zip(mine.segments, ref["segments"], strict=True):
            assert (seg.id, seg.seek, seg.tokens, seg.text) == (r["id"], r["seek"], r["tokens"], r["text"])
            assert (seg.start, seg.end) == (r["start"], r["end"])
            assert seg.temperature == r["temperature"]
            assert seg.avg_logprob == pytest.approx(r["avg_logprob"], abs=1e-4)
            assert seg.no_speech_prob == pytest.approx(r["no_speech_prob"], abs=1e-4)
            assert seg.compression_ratio == r["compression_ratio"]
            assert [w.word for w in seg.words] == [w["word"] for w in r["words"]]
            for w, rw in zip(seg.words, r["words"], strict=True):
                assert abs(w.start - rw["start"]) <= 0.02 and abs(w.end - rw["end"]) <= 0.02, (w, rw)
                assert w.probability == pytest.approx(rw["probability"], abs=1e-4)
    assert len(ours[0].windows) == 3 and all(not w.no_speech for w in ours[0].windows)


def test_dtw_and_median_filter_equal_openai_whisper():
    """Paths (ties included: values rounded to 0.1) and the median filter, against openai-whisper's own code."""
    import whisper.timing

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 9), (9, 1), (7, 30), (40, 90)]:
        for decimals in (None, 1):
            x = rng.standard_normal(shape)
            x = x if decimals is None else x.round(decimals)
            assert np.array_equal(dtw(x), whisper.timing.dtw_cpu.py_func(x)), (shape, decimals)
    y = torch.randn(3, 5, 40)
    assert torch.equal(median_filter(y, 7), whisper.timing.median_filter(y, 7))
    assert torch.equal(median_filter(y[..., :3], 7), y[..., :3])  # too short to filter: unchanged, as openai-whisper


def test_window_mel_equals_the_whole_files():
    """Frames computed from a window's own samples equal openai-whisper's whole-file mel (reflect at the start)."""
    import whisper

    rng = np.random.default_rng(0)
    audio = torch.from_numpy((0.1 * rng.standard_normal(16000 * 7)).astype(np.float32))
    audio[16000:20000] *= 5  # the peak, in the middle
    whole = whisper.log_mel_spectrogram(audio, 80, padding=N_SAMPLES)  # [80, frames + 3000]
    ours_whole = log_mel_spectrogram(audio, 80, padding=N_SAMPLES)
    peak = mel_peak(audio, 80, chunk_frames=128)  # several chunks
    for first, count in [(0, 300), (1, 2), (299, 400), (650, 50), (690, 3000)]:
        window = mel_frames(audio, first, count, 80, peak)
        assert torch.allclose(window, ours_whole[:, first : first + count], atol=1e-6)
        assert torch.allclose(window, whole[:, first : first + count], atol=1e-5)


def test_memory_is_bounded_by_the_window(toy, monkeypatch):
    """A 20-minute recording: no spectrogram is ever computed over more than one chunk (60 s) or one window."""
    sizes = []
    stft = torch.stft

    def recording_stft(x, *args, **kwargs):
        sizes.append(x.shape[-1])
        return stft(x, *args, **kwargs)

    monkeypatch.setattr(torch, "stft", recording_stft)
    audio = np.zeros(16000 * 60 * 20, np.float32)
    audio[16000 * 500 : 16000 * 501] = 0.1 * np.sin(np.arange(16000) / 5)  # one second of sound at 500 s
    t = toy.transcribe(audio, temperature=0.0, without_timestamps=True)
    assert max(sizes) <= 6000 * 160 + 400  # mel_peak's chunk; a window is 400 frames
    assert len(t.windows) == 300 and sum(not w.no_speech for w in t.windows) >= 1


# ----------------------------------------------------------------------------- batching, windows, no speech


def test_batched_equals_one_by_one_with_fallback(toy):
    """Recordings decoded together equal each decoded alone: prompts, fallback sampling and word timing included."""
    samples = sorted(SAMPLES.glob("*.wav"))
    a, b, c = joined(samples, 0.3), joined(samples[::-1], 0.6), wl.load_audio(samples[0])
    # a strict log-probability threshold makes some windows fall back to sampling at 0.4 (still prompted after)
    # condition_on_previous_text=True: the toy's own default is off (its files say so); the batching is what's tested
    options = dict(word_timestamps=True, alignment_heads=[(2, 0), (3, 1)], temperature=(0.0, 0.4), best_of=2,
                   logprob_threshold=-0.3, seed=3, condition_on_previous_text=True)  # fmt: skip
    together = toy.transcribe([a, b, c], batch_size=2, **options)
    alone = [toy.transcribe(x, **options) for x in (a, b, c)]
    assert any(w.result.temperature > 0 for t in together for w in t.windows if w.result)  # fallback happened
    assert any(w.result.temperature == 0 for t in together for w in t.windows if w.result)
    for t, u in zip(together, alone, strict=True):
        assert t.text == u.text
        assert [(w.seek, w.frames) for w in t.windows] == [(w.seek, w.frames) for w in u.windows]
        for s, v in zip(t.segments, u.segments, strict=True):  # everything equal; probabilities up to float rounding
            assert (s.seek, s.start, s.end, s.tokens) == (v.seek, v.start, v.end, v.tokens)
            assert s.temperature == v.temperature
            assert [(w.word, w.start, w.end) for w in s.words] == [(w.word, w.start, w.end) for w in v.words]
            assert s.avg_logprob == pytest.approx(v.avg_logprob, abs=1e-5)
            assert [w.probability for w in s.words] == pytest.approx([w.probability for w in v.words], abs=1e-5)


def test_a_round_is_one_generate_call(toy, monkeypatch):
    """At temperature 0 each round decodes every recording's window in one call, each after its own prompt."""
    samples = sorted(SAMPLES.glob("*.wav"))
    audios = [joined(samples, 0.3), joined(samples[::-1], 0.6), joined(samples[1:], 0.1)]
    calls = []
    generate = type(toy).generate

    def counted(model, *args, **kwargs):
        calls.append([tuple(p) for p in kwargs["prompt"]])  # one prompt per window of the round
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(type(toy), "generate", counted)
    prompted = dict(temperature=0.0, without_timestamps=True, condition_on_previous_text=True)  # the toy's: off
    together = toy.transcribe(audios, **prompted)
    rounds = max(len(t.windows) for t in together)
    assert len(calls) == rounds >= 3
    assert calls[0] == [()] * 3 and len(set(calls[1])) == 3  # later rounds: three different prompts, one call
    monkeypatch.setattr(type(toy), "generate", generate)
    alone = [toy.transcribe(x, **prompted) for x in audios]
    for t, u in zip(together, alone, strict=True):  # the same tokens as alone (log-probabilities up to rounding)
        assert [(s.seek, s.start, s.end, s.tokens) for s in t.segments] == [
            (s.seek, s.start, s.end, s.tokens) for s in u.segments
        ]


def test_timestamps_follow_the_models_window(toy):
    """The toy's window is 4 s (200 positions of 20 ms): timestamps step 20 ms and end with the audio, not at 30 s."""
    tok = toy.tokenizer
    ts = tok.timestamp_begin
    text = tok.encode(" hello")
    assert segments([ts, *text, ts + 50, ts + 50, *text], tok, 200) == [(0.0, 1.0, "hello"), (1.0, 4.0, "hello")]
    assert segments([ts + 5, *text], tok, 200, duration=1.37) == [(0.1, 1.37, "hello")]
    sample = wl.load_audio(SAMPLES / "sample1.wav")  # 1.37 s
    t = toy.transcribe(sample, temperature=0.0)
    assert t.windows[0].frames == 136 and t.windows[0].end == 1.36
    for s in t.segments:
        assert 0 <= s.start <= s.end <= 1.36 + 1e-9
        assert round(s.start / 0.02, 6) % 1 == 0
    plain = toy.transcribe(sample, temperature=0.0, without_timestamps=True)
    assert plain.text.strip() == "my rice is funny" and plain.segments[0].end == 1.36


def test_language_is_detected_once_per_recording(small_model):
    """A multilingual model given no language detects it from each recording's first window (its whole-file mel)."""
    rng = np.random.default_rng(0)
    audios = [(0.1 * rng.standard_normal(16000 * 3)).astype(np.float32) for _ in range(2)]
    frames = 2 * small_model.dims.n_audio_ctx  # a 1.2 s window
    together = small_model.transcribe(audios, temperature=0.0)
    for audio, t in zip(audios, together, strict=True):
        a = torch.from_numpy(audio)
        first = mel_frames(a, 0, frames, 80, mel_peak(a, 80))
        assert t.language == small_model.generate(first[None], max_new_tokens=1)[0].language
        alone = small_model.transcribe(audio, temperature=0.0)
        assert (alone.language, alone.text) == (t.language, t.text)
        assert [s.tokens for s in alone.segments] == [s.tokens for s in t.segments]


def test_silence_and_empty_audio_give_empty_transcripts(toy):
    """No hallucinated "a": a flat window is skipped undecoded; no audio gives no windows."""
    for audio in (np.zeros(16000 * 9, np.float32), np.zeros(0, np.float32), np.zeros(100, np.float32)):
        t = toy.transcribe(audio, without_timestamps=True)
        assert t.text == "" and t.segments == []
        assert all(w.no_speech and w.result is None for w in t.windows)
    decoded = toy.transcribe(np.zeros(16000 * 2, np.float32), without_timestamps=True, skip_silence=False)
    assert decoded.windows[0].result is not None  # openai-whisper's behaviour when asked: silence decoded


def test_trace_and_edits_in_every_window(toy):
    """Edits act in every window; each window's trace holds its encoder output and its decoding's patterns."""
    audio = joined(sorted((SAMPLES).glob("*.wav"))[:3], 0.3)
    edits = wl.Edits().skip("encoder", [3])
    t = toy.transcribe(audio, temperature=0.0, without_timestamps=True, edits=edits,
                       trace=["encoder.ln_post", "decoder.blocks.1.cross_attn.pattern"])  # fmt: skip
    assert len(t.windows) >= 2
    peak = mel_peak(torch.from_numpy(audio), 80)
    for w in t.windows:  # each window's mel, the last one padded with silence as the toy was trained (its config)
        mel = mel_frames(torch.from_numpy(audio), w.seek, 400, 80, peak)
        run = toy.run(mel[None], torch.tensor([[toy.tokenizer.sot]]), trace=["encoder.ln_post"], edits=edits)
        assert torch.allclose(w.trace["encoder.ln_post"], run.trace["encoder.ln_post"], atol=1e-5)
        pattern = w.trace["decoder.blocks.1.cross_attn.pattern"]  # [1, H, prompt + tokens, 200]
        assert pattern.shape[-1] == 200 and pattern.shape[2] >= len(w.result.tokens)
        assert torch.allclose(pattern.sum(-1), torch.ones(()))
    unedited = toy.transcribe(audio, temperature=0.0, without_timestamps=True)
    assert [w.result.tokens for w in unedited.windows] != [w.result.tokens for w in t.windows]


# ----------------------------------------------------------------------------- word timing and alignment heads


def test_word_timing_from_decoding_is_close_to_the_pass(real_tiny_en, real_clips):
    """The recorded-pattern option gives the same words; their times are near the exact pass's (README's figures)."""
    clips = [p for p, _ in real_clips if p.name.startswith("austen")][:3]
    exact = real_tiny_en.transcribe(clips, temperature=0.0, word_timestamps=True)
    recorded = real_tiny_en.transcribe(clips, temperature=0.0, word_timestamps=True, word_timing="decoding")
    gaps = []
    for e, r in zip(exact, recorded, strict=True):
        we, wr = [w for s in e.segments for w in s.words], [w for s in r.segments for w in s.words]
        assert [w.word for w in we] == [w.word for w in wr]
        gaps += [abs(a.start - b.start) for a, b in zip(we, wr, strict=True)]
    assert len(gaps) > 30 and np.median(gaps) <= 0.04 and np.mean(gaps) <= 0.15
    assert r.windows[0].trace is None  # what word timing recorded is not handed to the user


def test_picture_of_a_windows_word_timing(toy, tmp_path):
    """The alignment heads' attention under the spectrogram with the DTW path and the words, saved as a PNG."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from whisper_lens.longform import window_alignment
    from whisper_lens.plot import save, word_alignment

    sample = SAMPLES / "sample2.wav"
    heads = [(2, 0), (3, 1)]
    t = toy.transcribe(sample, temperature=0.0, without_timestamps=True, word_timestamps=True, alignment_heads=heads)
    mel, a = window_alignment(toy, sample, t, 0, heads)
    assert mel.shape == (80, 400) and a.matrix.shape == (len(a.text_tokens) + 1, t.windows[0].frames // 2)
    assert [w.word for w in a.words] == [w.word for w in t.segments[0].words]  # nothing to merge in the toy's text
    labels = [toy.tokenizer.decode([x]) for x in a.text_tokens] + ["EOT"]
    fig = word_alignment(mel, a.matrix, a.path, labels, [(w.word, w.start, w.end) for w in a.words])
    out = save(fig, tmp_path / "w.png")
    width, height = Image.open(out).size
    assert width == 1800 and abs(height - fig.get_figheight() * 150) <= 1  # 12 in wide at 150 dpi
    assert [t.get_text() for t in fig.axes[0].texts] == [w.word.strip() for w in a.words]
    with pytest.raises(ValueError, match="tokens has"):
        word_alignment(mel, a.matrix, a.path, labels[:-1], [])
    with pytest.raises(ValueError, match="dtw_path"):
        word_alignment(mel, a.matrix, a.path[0], labels, [])


def test_find_alignment_heads_on_real_tiny_en(real_tiny_en, real_clips):
    """Without labels, the heads found overlap OpenAI's and time words at least as well against forced alignment."""
    from whisper_lens.heads import find_alignment_heads

    clips = [p for p, _ in real_clips if p.name.startswith("austen")]
    found = find_alignment_heads(real_tiny_en, clips)
    assert len(set(found.heads) & set(OFFICIAL_HEADS)) >= 4
    assert found.ranking[: len(found.heads)] == found.heads and found.deviation.shape == (4, 6)
    reference = json.loads((DATA / "transcripts.json").read_text())

    def error(heads) -> float:
        """Mean distance (s) of word starts and ends from pocketsphinx's forced alignment, over matched words."""
        gaps = []
        for path, t in zip(clips, real_tiny_en.transcribe(clips, word_timestamps=True, alignment_heads=heads),
                           strict=True):  # fmt: skip
            ours = [w for s in t.segments for w in s.words]
            theirs = reference[path.name]["words"]
            norm = [re.sub(r"[^a-z]", "", w.word.lower()) for w in ours]
            j = 0
            for w, n in zip(ours, norm, strict=True):
                while j < len(theirs) and theirs[j]["word"] != n and n in {x["word"] for x in theirs[j:]}:
                    j += 1
                if j < len(theirs) and theirs[j]["word"] == n:
                    gaps += [abs(w.start - theirs[j]["start"]), abs(w.end - theirs[j]["end"])]
                    j += 1
        assert len(gaps) > 60
        return float(np.mean(gaps))

    assert error(found.heads) <= error(OFFICIAL_HEADS)


# ----------------------------------------------------------------------------- writers and the command


def sample_transcript() -> Transcript:
    seg = [
        Segment(0, 0, 0.0, 1.5, " Hello --> world.", [1, 2], 0.0, -0.1, 1.2, 0.01),
        Segment(1, 0, 1.5, 2.0, "", [], 0.0, -0.1, 1.2, 0.01),  # emptied by the rules: no cue
        Segment(
            2,
            300,
            3725.2344,
            3729.0,
            " Über\tdrei Stunden",
            [3],
            0.2,
            -0.3,
            1.1,
            0.02,
            [wl.Word(" Über", 3725.24, 3726.0, 0.9)],
        ),  # fmt: skip
    ]
    return Transcript(" Hello --> world. Über\tdrei Stunden", "de", seg, [Window(0, 3000, None, True)])


def parse_cues(text: str, marker: str) -> list[tuple[float, float, str]]:
    """An independent reader of SubRip / WebVTT cues: (start, end, text)."""
    stamp = rf"(\d\d):(\d\d):(\d\d){re.escape(marker)}(\d\d\d)"
    out = []
    for m in re.finditer(rf"{stamp} --> {stamp}\n(.*)\n", text):
        g = [int(x) for x in m.groups()[:8]]
        out.append((g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000, g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000, m[9]))
    return out


def test_writers_round_trip():
    """openai-whisper's layouts: every segment a cue (an emptied one too), hours in srt always, in vtt from 1 h on."""
    t = sample_transcript()
    want = [(0.0, 1.5, "Hello -> world."), (1.5, 2.0, ""), (3725.234, 3729.0, "Über\tdrei Stunden")]
    srt = render(t, "srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\n") and "\n3\n01:02:05,234 --> 01:02:09,000\n" in srt
    assert parse_cues(srt, ",") == want
    vtt = render(t, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00.000 --> 00:01.500\nHello -> world.\n\n00:01.500 --> 00:02.000\n\n\n")
    assert vtt.endswith("01:02:05.234 --> 01:02:09.000\nÜber\tdrei Stunden\n\n")
    rows = [line.split("\t") for line in render(t, "tsv").splitlines()]
    assert rows == [
        ["start", "end", "text"],
        ["0", "1500", "Hello --> world."],
        ["1500", "2000", ""],
        ["3725234", "3729000", "Über drei Stunden"],
    ]
    assert render(t, "txt") == "Hello --> world.\n\nÜber\tdrei Stunden\n"
    back = json.loads(render(t, "json"))
    assert back == t.to_dict() and "words" not in back["segments"][0] and back["segments"][1]["words"] == []
    assert list(back["segments"][2]) == ["id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                                         "compression_ratio", "no_speech_prob"]  # fmt: skip


def test_cli_transcribes_long_files_into_files(tmp_path, capsys):
    """Any length; files written atomically with the umask's mode; a re-run replaces only its own files."""
    import soundfile

    from whisper_lens.cli import main

    samples = sorted(SAMPLES.glob("*.wav"))
    soundfile.write(tmp_path / "long.wav", joined(samples, 0.5), 16000)  # 14.4 s: four of the toy's windows
    soundfile.write(tmp_path / "quiet.wav", np.zeros(16000 * 5, np.float32), 16000)
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        code = main(["transcribe", str(tmp_path / "long.wav"), str(tmp_path / "quiet.wav"), "-o", str(out),
                     "--no-progress", "--model", "toy", "--beam_size", "1"])  # fmt: skip
    finally:
        os.umask(old)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (
        "long.wav [en, 14.4 s" in printed.out
        and "quiet.wav [en, 5.0 s, 2 windows, 2 without speech]: no speech" in printed.out
    )
    assert "(no speech: silence)" in printed.out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{s}.{f}" for s in ("long", "quiet") for f in FORMATS)  # no hidden marker
    assert all((p.stat().st_mode & 0o777) == 0o640 for p in out.iterdir())
    cues = parse_cues((out / "long.srt").read_text(), ",")
    assert cues and all(a <= b <= 14.412 for a, b, _ in cues)  # the toy's garbled long-form text, timed in 14.4 s
    again = ["transcribe", str(tmp_path / "long.wav"), "-o", str(out), "-f", "txt", "--no-progress", "-m", "toy"]
    assert main(again) == 2 and "long.txt already exist" in capsys.readouterr().err  # not known to be ours
    assert main([*again, "--overwrite"]) == 0
    (out / "mine.txt").write_text("my own notes\n")
    (tmp_path / "mine.wav").write_bytes((tmp_path / "long.wav").read_bytes())
    assert main(["transcribe", str(tmp_path / "mine.wav"), "-o", str(out), "-f", "txt", "--no-progress"]) == 2
    assert (out / "mine.txt").read_text() == "my own notes\n"


def test_output_folder_refuses_before_any_work(tmp_path):
    (tmp_path / "a.srt").write_text("mine")
    folder = OutputFolder(tmp_path)
    with pytest.raises(FileExistsError, match="a.srt"):
        folder.plan(["a"], ("srt",))
    with pytest.raises(ValueError, match="same output files"):
        folder.plan(["b", "b"], ("srt",))
    assert (tmp_path / "a.srt").read_text() == "mine"
    other = tmp_path / "model"
    other.mkdir()
    files.mark_written(other, [], "train-toy")  # another command's output folder: its files and marker are left alone
    assert OutputFolder(other).plan(["a"], ("srt",)) == [[other / "a.srt"]]
    assert files.read_marker(other)["command"] == "train-toy" and sorted(os.listdir(other)) == [MARKER]
