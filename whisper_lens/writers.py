"""Transcripts as files: plain text, SubRip (.srt), WebVTT (.vtt), tab-separated (.tsv) and JSON.

Subtitle cues are the transcript's segments (empty ones left out); the JSON file holds everything,
words included. Files follow ``whisper_lens.files``' rules: each is written atomically (a
temporary file beside the target, renamed into place) with the permissions the umask gives, and
the output folder's marker (``.whisper-lens.json``) lists the files ``transcribe`` wrote there.
An existing file is replaced only if that marker lists it; anything else is refused before any
work, and so is a folder that holds another command's output.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import files

if TYPE_CHECKING:
    from .transcribe import Transcript

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
COMMAND = "transcribe"  # the command named in the output folder's marker


def timestamp(seconds: float, marker: str) -> str:
    """HH:MM:SS<marker>mmm, rounded to the millisecond (``marker`` "," for SubRip, "." for WebVTT)."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{marker}{ms:03d}"


def cues(t: Transcript) -> list[tuple[float, float, str]]:
    """(start, end, text) of every segment with text; "-->" in text would end a cue line, so it is written "->"."""
    return [(s.start, s.end, s.text.strip().replace("-->", "->")) for s in t.segments if s.text.strip()]


def render(t: Transcript, fmt: str) -> str:
    """The file ``fmt`` (one of ``FORMATS``) for one transcript, as text."""
    if fmt == "txt":
        return "".join(f"{text}\n" for _, _, text in cues(t))
    if fmt == "srt":
        return "".join(
            f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text}\n\n" for i, (a, b, text) in enumerate(cues(t), 1)
        )
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(
            f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text}\n\n" for a, b, text in cues(t)
        )
    if fmt == "tsv":  # times in integer milliseconds, as openai-whisper's
        return "start\tend\ttext\n" + "".join(
            f"{round(1000 * a)}\t{round(1000 * b)}\t{text.replace(chr(9), ' ')}\n" for a, b, text in cues(t)
        )
    if fmt == "json":
        return json.dumps({"text": t.text, "language": t.language, "segments": [asdict(s) for s in t.segments]},
                          ensure_ascii=False, indent=1) + "\n"  # fmt: skip
    raise ValueError(f"unknown output format {fmt!r}: choose from {', '.join(FORMATS)} or all")


def formats(choice: str) -> tuple[str, ...]:
    """The formats of an ``--output-format`` value: one of ``FORMATS`` or "all"."""
    if choice == "all":
        return FORMATS
    if choice not in FORMATS:
        raise ValueError(f"unknown output format {choice!r}: choose from {', '.join(FORMATS)} or all")
    return (choice,)


class OutputFolder:
    """Where transcripts are written: checks every target before any work, then writes them one by one.

    ``plan(names)`` returns the paths that will be written for the given file stems and formats,
    and refuses (``FileExistsError``) any that exists and is not listed in the folder's marker as
    written by an earlier run of this command. ``write(path, text)`` writes one atomically and
    adds it to the marker.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--output-dir {self.folder} exists and is not a folder")

    def plan(self, stems: list[str], fmts: tuple[str, ...]) -> list[list[Path]]:
        """The output paths of every stem (one list per stem, one path per format), checked."""
        if len(set(stems)) != len(stems):
            twice = sorted({s for s in stems if stems.count(s) > 1})
            raise ValueError(f"two inputs would write the same output files ({twice[0]}.*): rename one of them")
        marker = files.read_marker(self.folder) if self.folder.is_dir() else None
        if marker and marker["command"] != COMMAND:  # its marker would lose the other command's files
            raise FileExistsError(f"--output-dir {self.folder} holds the output of `whisper-lens {marker['command']}`"
                                  ": choose another folder")  # fmt: skip
        names = [f"{stem}.{fmt}" for stem in stems for fmt in fmts]
        files.check_can_write(self.folder, names, COMMAND, what="--output-dir", shared=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        return [[self.folder / f"{stem}.{fmt}" for fmt in fmts] for stem in stems]

    def write(self, path: Path, text: str) -> None:
        files.write_text(path, text)
        files.mark_written(self.folder, [path.name], COMMAND)
