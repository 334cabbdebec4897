"""Transcripts as files: plain text, SubRip (.srt), WebVTT (.vtt), tab-separated (.tsv) and JSON.

Subtitle cues are the transcript's segments (empty ones left out); the JSON file holds everything,
words included. Files are written atomically (a temporary file beside the target, renamed into
place) with the permissions the umask gives. An existing file is replaced only if this command
wrote it and nobody changed it since: every file written is recorded, with a hash of its bytes, in
``.whisper-lens-transcribe.json`` in the output folder; anything else is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .transcribe import Transcript

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
MANIFEST = ".whisper-lens-transcribe.json"  # {file name: sha256 of the bytes written}


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
    and refuses (``FileExistsError``) any that exists and was not written unchanged by an earlier
    run of this command. ``write(path, text)`` writes one atomically and records it.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--output-dir {self.folder} exists and is not a folder")
        self.manifest = self.folder / MANIFEST

    def written(self) -> dict[str, str]:
        """The files this command wrote here before, with their hashes (empty if none or unreadable)."""
        try:
            data = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def plan(self, stems: list[str], fmts: tuple[str, ...]) -> list[list[Path]]:
        """The output paths of every stem (one list per stem, one path per format), checked."""
        if len(set(stems)) != len(stems):
            twice = sorted({s for s in stems if stems.count(s) > 1})
            raise ValueError(f"two inputs would write the same output files ({twice[0]}.*): rename one of them")
        ours = self.written()
        paths = [[self.folder / f"{stem}.{fmt}" for fmt in fmts] for stem in stems]
        for path in (p for row in paths for p in row):
            if path.exists() and (not path.is_file() or ours.get(path.name) != sha256(path)):
                raise FileExistsError(f"{path} exists and was not written by whisper-lens transcribe (or was changed "
                                      "since): move it or choose another --output-dir")  # fmt: skip
        existing = next(p for p in (self.folder, *self.folder.parents) if p.exists())  # the folder or where it will be
        if not existing.is_dir():
            raise NotADirectoryError(f"--output-dir {self.folder}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"--output-dir {self.folder}: cannot write into {existing}")
        self.folder.mkdir(parents=True, exist_ok=True)
        return paths

    def write(self, path: Path, text: str) -> None:
        data = text.encode("utf-8")
        atomic_write_bytes(path, data)
        record = self.written()
        record[path.name] = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(self.manifest, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file beside ``path``, then rename it into place (the umask gives its mode)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:  # created as 0666 & ~umask, unlike mkstemp's 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
