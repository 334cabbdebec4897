"""Transcripts as files, byte for byte as openai-whisper's command writes them: txt, vtt, srt, tsv and json.

The layouts (written here from openai-whisper's documented behaviour):

- ``txt``: each segment's text, stripped, one line each (an emptied segment gives an empty line);
- ``vtt`` / ``srt``: one cue per segment, or, with word timestamps, cues made of words:
  ``max_line_width`` characters a line at most, ``max_line_count`` lines a cue (both given: cues
  run across segments and break at pauses over 3 s; otherwise each segment starts a cue),
  ``max_words_per_line`` words a line when no width is given, and ``highlight_words``
  underlining (``<u>``) each word in a cue of its own while it is spoken;
- ``tsv``: ``start``, ``end`` (integer milliseconds) and text of each segment;
- ``json``: the result dict (``Transcript.to_dict()``), as ``json.dump`` writes it.

A file is named after its audio (``talk.mp3`` -> ``talk.srt``) and written atomically (a temporary
file beside it, renamed into place) with the permissions the umask gives. The output folder may
hold the user's own files: only these names are written, nothing is deleted, no marker is left,
and an existing file is replaced only with ``overwrite=True`` (``--overwrite``; openai-whisper
replaces them without asking), after every target has been checked, before any work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import files

if TYPE_CHECKING:
    from .longform import Transcript

FORMATS = ("txt", "vtt", "srt", "tsv", "json")  # openai-whisper's order for "all"
LONG_PAUSE = 3.0  # seconds: with a width and a line count, a longer pause between words starts a new cue


@dataclass(frozen=True)
class Layout:
    """How word-timed subtitles are cut into lines and cues (openai-whisper's ``--max_line_width`` & co)."""

    max_line_width: int | None = None
    max_line_count: int | None = None
    max_words_per_line: int | None = None
    highlight_words: bool = False


def timestamp(seconds: float, marker: str = ".", hours: bool = True) -> str:
    """[HH:]MM:SS<marker>mmm rounded to the millisecond; the hours always when ``hours``, else from one hour on."""
    if not seconds >= 0:
        raise ValueError(f"a timestamp must be a number of seconds >= 0, got {seconds!r}")
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return (f"{h:02d}:" if hours or h else "") + f"{m:02d}:{s:02d}{marker}{ms:03d}"


def first_start(segments: list[dict]) -> float:
    """The first word's start, else the first segment's, else 0."""
    for seg in segments:
        for w in seg.get("words", []):
            return w["start"]
    return segments[0]["start"] if segments else 0.0


def word_cues(segments: list[dict], layout: Layout) -> list[list[dict]]:
    """The words cut into cues: lists of words, whose ``word`` carries its line break ("\\n") if it starts a line."""
    width = layout.max_line_width or 1000
    per_line = layout.max_words_per_line or 1000
    keep_segments = layout.max_line_count is None or layout.max_line_width is None
    cues, cue = [], []
    line_len, lines, last = 0, 1, first_start(segments)
    for seg in segments:
        words = seg["words"]
        for chunk_start in range(0, len(words), per_line):
            for i, original in enumerate(words[chunk_start : chunk_start + per_line]):
                w = dict(original)
                pause = not keep_segments and w["start"] - last > LONG_PAUSE
                new_segment = keep_segments and i == 0 and bool(cue)
                if line_len > 0 and line_len + len(w["word"]) <= width and not pause and not new_segment:
                    line_len += len(w["word"])  # the line goes on
                else:
                    w["word"] = w["word"].strip()
                    full = layout.max_line_count is not None and (pause or lines >= layout.max_line_count)
                    if new_segment or (cue and full):
                        cues.append(cue)
                        cue, lines = [], 1
                    elif line_len > 0:
                        lines += 1
                        w["word"] = "\n" + w["word"]
                    line_len = len(w["word"].strip())
                cue.append(w)
                last = w["start"]
    if cue:
        cues.append(cue)
    return cues


def underlined(word: str) -> str:
    """The word between <u> and </u>, its leading space or line break outside."""
    rest = word.lstrip()
    return f"{word[: len(word) - len(rest)]}<u>{rest}</u>"


def subtitles(result: dict, layout: Layout, marker: str, hours: bool) -> list[tuple[str, str, str]]:
    """(start, end, text) of every cue: one per segment, or made of words when the segments have them."""
    segments = result["segments"]
    stamp = lambda t: timestamp(t, marker, hours)  # noqa: E731
    if not (segments and "words" in segments[0]):
        return [(stamp(s["start"]), stamp(s["end"]), s["text"].strip().replace("-->", "->")) for s in segments]
    out = []
    for cue in word_cues(segments, layout):
        start, end = stamp(cue[0]["start"]), stamp(cue[-1]["end"])
        text = "".join(w["word"] for w in cue)
        if not layout.highlight_words:
            out.append((start, end, text))
            continue
        last = start
        for i, w in enumerate(cue):
            a, b = stamp(w["start"]), stamp(w["end"])
            if last != a:
                out.append((last, a, text))  # the gap before the word: the cue without underlining
            out.append((a, b, "".join(underlined(x["word"]) if j == i else x["word"] for j, x in enumerate(cue))))
            last = b
    return out


def render(t: Transcript | dict, fmt: str, layout: Layout = Layout()) -> str:
    """The file ``fmt`` (one of ``FORMATS``) of one transcript, as text."""
    result = t if isinstance(t, dict) else t.to_dict()
    if fmt == "txt":
        return "".join(s["text"].strip() + "\n" for s in result["segments"])
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{x}\n\n" for a, b, x in subtitles(result, layout, ".", False))
    if fmt == "srt":
        cues = subtitles(result, layout, ",", True)
        return "".join(f"{i}\n{a} --> {b}\n{x}\n\n" for i, (a, b, x) in enumerate(cues, 1))
    if fmt == "tsv":  # times in integer milliseconds
        return "start\tend\ttext\n" + "".join(
            f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip().replace(chr(9), ' ')}\n"
            for s in result["segments"]
        )
    if fmt == "json":
        return json.dumps(result)
    raise ValueError(f"unknown output format {fmt!r}: choose from {', '.join(FORMATS)} or all")


def formats(choice: str) -> tuple[str, ...]:
    """The formats of an ``--output_format`` value: one of ``FORMATS`` or "all"."""
    if choice == "all":
        return FORMATS
    if choice not in FORMATS:
        raise ValueError(f"unknown output format {choice!r}: choose from {', '.join(FORMATS)} or all")
    return (choice,)


class OutputFolder:
    """Where transcripts are written: every target checked before any work, then written one by one.

    ``plan(stems, fmts)`` returns the paths that will be written, one list per stem, and refuses
    (``FileExistsError``, one line naming them) targets that exist, unless ``overwrite``; the
    folder may hold anything else. ``write(path, text)`` writes one atomically.
    """

    def __init__(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.overwrite = overwrite
        for p in (self.folder, *self.folder.parents):  # the folder, or the nearest part of its path that exists
            if os.path.lexists(p):
                if not p.is_dir():
                    raise NotADirectoryError(f"--output_dir {self.folder}: {p} exists and is not a folder")
                break

    def plan(self, stems: list[str], fmts: tuple[str, ...]) -> list[list[Path]]:
        """The output paths of every stem (one list per stem, one path per format), checked."""
        if len(set(stems)) != len(stems):
            twice = sorted({s for s in stems if stems.count(s) > 1})
            raise ValueError(f"two inputs would write the same output files ({twice[0]}.*): rename one of them")
        paths = [[self.folder / f"{stem}.{fmt}" for fmt in fmts] for stem in stems]
        existing = [p for row in paths for p in row if os.path.lexists(p)]
        if not self.overwrite and existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise FileExistsError(f"{existing[0]}{more} already exist: pass --overwrite to replace them (only the "
                                  "transcript files named after the audio are written)")  # fmt: skip
        for p in existing:
            if not p.is_file() or p.is_symlink():
                raise FileExistsError(f"{p} exists and is not a plain file: it will not be replaced")
        self.folder.mkdir(parents=True, exist_ok=True)
        return paths

    def write(self, path: Path, text: str) -> None:
        files.write_text(path, text)
