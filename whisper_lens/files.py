"""Writing files and output folders without ever losing what the user had.

Three rules, for every file and folder whisper-lens writes:

1. **Atomic.** A file is written to a hidden temporary name beside its destination and renamed
   into place, so a reader sees the old file or the new one, never half of one
   (``atomic_write``). A command's output folder is built the same way (``output_folder``).
2. **The umask is honoured.** Temporary names are created with mode 0666 (files) or 0777
   (folders) and the kernel applies the umask, as for any file a program opens; ``tempfile``'s
   0600/0700 would make every report and model private whatever the user's umask says.
3. **Nothing the tool did not write is deleted or overwritten.** A folder that whisper-lens wrote
   holds a marker, ``.whisper-lens.json``, naming the command and the files it wrote with a
   hash of each one's content. ``--out`` may name a folder that is absent, empty, or a previous
   output of the same command holding only the files its marker lists; anything else is refused
   before any work starts, with one line naming the folder. A file of its own that the user has
   edited since (its content no longer has the hash the marker recorded) is the user's now: it
   is kept, and the run is refused naming it. Every command applies this one rule, through
   ``check_replaceable`` (a folder replaced as a whole) or ``check_can_write`` (named files
   written into a folder).

The switch from the old output to the new one happens under an exclusive lock on the parent
folder (two runs finishing together take turns) with SIGINT/SIGTERM/SIGHUP held back until it
is over (they take effect right after). Where the kernel offers it (Linux's
``renameat2(RENAME_EXCHANGE)``) the new folder and the old one swap names in one step, so there
is no moment without ``--out``, even if the process is killed; elsewhere two renames, undone if
the second fails. A temporary folder left by a process that was killed outright (SIGKILL, power
loss) is removed by the next run that writes to the same destination, once its marker shows
that the process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import signal
import socket
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".whisper-lens.json"  # in every folder whisper-lens wrote: the command and the files it wrote
TEMP_TAG = "whisper-lens"  # temporary names are ".{name}.whisper-lens-{pid}-{random}"


# ----------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` through ``write(tmp_path)``: a temporary file beside it, renamed into place when complete.

    The temporary file, ``.{name}.whisper-lens-{pid}-{random}.tmp``, is created with mode 0666
    less the umask, and given that mode again before the rename (some writers, safetensors'
    among them, replace the file with a private one of their own). A writer that picks the
    format by the file's suffix must be told it (or given an open file). On any error, or an
    interrupt, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    tmp = _create_temp(path.parent, f".{path.name}.{TEMP_TAG}-{os.getpid()}-", ".tmp", _new_file)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask, as the kernel applied it
    try:
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        with signals_held():
            tmp.unlink(missing_ok=True)
        if e.errno is None or str(path) in str(e):
            raise
        # "File too large" (ulimit -f), "No space left on device": say which file, and that it is as it was
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e} ({path.name} is as it was)") from None
    except BaseException:
        with signals_held():
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text file (a report, a table, a JSON document)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask


def _new_folder(path: Path) -> None:
    os.mkdir(path, 0o777)  # the kernel applies the umask


def _create_temp(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new file or folder ``parent/prefix<random>suffix`` that did not exist before (as ``tempfile``, other modes)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free temporary name in {parent}")


# ----------------------------------------------------------------------------- markers


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder whisper-lens wrote, or None when there is none (or it is not whisper-lens')."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and marker.get("tool") == "whisper-lens" and isinstance(marker.get("command"), str)
    return marker if ok else None


def _write_marker(folder: Path, command: str, files: list[str] | None, hashes: dict | None = None) -> None:
    """The marker: complete (``files`` listed, with each file's content hash) or in progress (``pid`` and
    ``host``, for the stale-folder sweep). ``hashes``: those already known (of files not rewritten)."""
    marker: dict = {"tool": "whisper-lens", "command": command}
    if files is None:
        marker |= {"pid": os.getpid(), "host": socket.gethostname()}
    else:
        known = hashes or {}
        marker["files"] = files
        marker["sha256"] = {n: known.get(n) or content_hash(folder / n) for n in files if _is_file(folder / n)}
    write_text(folder / MARKER, json.dumps(marker, indent=1) + "\n")


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes, as hex: what the marker records, to tell a file the user edited since."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def edited(folder: Path, marker: dict, names: list[str]) -> list[str]:
    """Those of ``names`` whose content is no longer what the command wrote (the marker's hash); a marker of
    an older version (no hashes) cannot tell, and a file it lists with no hash is taken as unedited."""
    recorded = marker.get("sha256")
    if not isinstance(recorded, dict):
        return []
    return [n for n in names if isinstance(recorded.get(n), str) and _is_file(folder / n)
            and content_hash(folder / n) != recorded[n]]  # fmt: skip


def _refuse_edited(folder: Path, names: list[str], what: str) -> None:
    raise FileExistsError(
        f"{what} {folder} holds {_some(names)}, written by whisper-lens but edited since; it is yours now and was "
        "kept: move it out of the folder (or choose another folder) and run again, nothing was changed"
    )


def _entries(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (the marker excepted), as relative POSIX paths; links not followed."""
    return [p for p in _all_entries(folder) if p != MARKER]


def _all_entries(folder: Path) -> list[str]:
    def fail(error: OSError) -> None:
        raise error

    found = []
    for root, dirs, files in os.walk(folder, onerror=fail):
        rel = Path(root).relative_to(folder)
        found += [(rel / name).as_posix() for name in dirs + files]
    return sorted(found)


def check_can_write(
    folder: str | os.PathLike, names: list[str], command: str, *, what: str = "folder", shared: bool = False
) -> None:
    """Refuse, before any work, to overwrite a file in ``folder`` that ``command`` did not write there.

    For commands that write named files into a folder: each of ``names`` that already exists must
    be listed in the folder's marker for ``command``, with the content it had when written (a file
    the user edited since is kept and named). The folder itself must be absent, empty, or marked
    by ``command`` (``train-toy`` writes a model into ``weights/toy``, beside its samples), unless
    ``shared``: a folder of the user's where new files may land beside theirs (``transcribe``'s
    ``--output-dir``, as openai-whisper's). ``what`` names the folder in the messages
    (``--out``, ``--data``...).
    """
    folder = Path(folder)
    if not folder.exists():
        check_can_create(folder)
        return
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} exists and is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write in {what} {folder}: no permission")
    marker = read_marker(folder)
    ours = marker is not None and marker["command"] == command
    if not shared and not ours:
        try:
            held = sorted(os.listdir(folder))
        except OSError as e:
            raise PermissionError(f"cannot read {what} {folder}: {e.strerror}") from None
        if held:
            whose = f"the output of `whisper-lens {marker['command']}`" if marker else "files it did not write"
            raise FileExistsError(
                f"{what} {folder} is not empty and holds {whose} ({_some(held)}); `whisper-lens {command}` writes "
                "only into a new or empty folder or one it wrote before: choose another folder, nothing was changed"
            )
    existing = [n for n in names if os.path.lexists(folder / n)]
    if not existing:
        return
    listed = set(marker.get("files") or []) if ours else set()
    foreign = [n for n in existing if n not in listed]
    if foreign:
        raise FileExistsError(
            f"{what} {folder} already holds {', '.join(foreign)}, which `whisper-lens {command}` did not write there; "
            "choose another folder (nothing was overwritten)"
        )
    changed = edited(folder, marker, existing) if ours else []
    if changed:
        _refuse_edited(folder, changed, what)


def mark_written(folder: str | os.PathLike, names: list[str], command: str) -> None:
    """Add ``names`` to ``folder``'s marker for ``command`` (after writing them), so a rerun may replace them.

    Their content hashes are recorded now; the others the marker lists keep theirs."""
    folder = Path(folder)
    marker = read_marker(folder)
    ours = marker is not None and marker["command"] == command
    listed = set(marker.get("files") or []) if ours else set()
    known = marker.get("sha256") if ours and isinstance(marker.get("sha256"), dict) else {}
    known = {n: h for n, h in known.items() if n not in names and isinstance(h, str)}
    _write_marker(folder, command, sorted(listed | set(names)), known)


# ----------------------------------------------------------------------------- output folders


@contextmanager
def output_folder(out: str | os.PathLike, command: str) -> Iterator[Path]:
    """Yield a fresh temporary folder to write a command's output into; on success it becomes ``out``.

    Before anything is yielded, ``out`` is checked: it must be absent, an empty folder, or a
    previous output of ``command`` (its marker) holding nothing but the files that marker
    lists. ``out`` may be a symlink to such a folder (the folder it points to is replaced).
    Refused: a file, the current folder or one that contains it, a mount point, a folder whose
    parent cannot be written. If the body raises (or is interrupted), the temporary folder is
    removed and ``out`` is untouched. On success the marker is written, listing every file.
    """
    target = destination(out)
    check_replaceable(target, command)
    _sweep_stale(target)
    tmp, created = _start(target, command)
    try:
        yield tmp
        _write_marker(tmp, command, _entries(tmp))
        _switch(tmp, target, command)
    except BaseException:
        with signals_held():
            _discard(tmp)
            _remove_empty(created)
        raise


def _start(target: Path, command: str) -> tuple[Path, list[Path]]:
    """Make the temporary folder (and ``target``'s missing parents), marked as in progress; no interrupt in between."""
    with signals_held():
        created = _make_parents(target.parent)
        tmp = None
        try:
            tmp = _create_temp(target.parent, f".{target.name}.{TEMP_TAG}-{os.getpid()}-", "", _new_folder)
            _write_marker(tmp, command, None)
        except BaseException:
            if tmp is not None:
                _discard(tmp)
            _remove_empty(created)
            raise
    return tmp, created


def destination(out: str | os.PathLike) -> Path:
    """The real folder ``out`` names (symlinks followed), after the checks that need no listing."""
    if not isinstance(out, str | os.PathLike) or not os.fspath(out):
        raise TypeError(f"output folder must be a non-empty path, got {out!r}")
    given = Path(out).expanduser()
    target = Path(os.path.realpath(given))
    if given.is_symlink() and not target.exists():
        raise FileNotFoundError(f"output folder {out} is a symlink to {target}, which does not exist")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"output folder {out} exists and is a file, not a folder")
    here = Path(os.path.realpath(os.getcwd()))
    if target == here or target in here.parents:
        raise ValueError(
            f"output folder {out} is the current folder (or contains it); whisper-lens replaces its output "
            "folder as a whole, so name a new folder (e.g. --out results)"
        )
    if target.exists() and os.path.ismount(target):
        raise ValueError(f"output folder {out} is a mount point, which cannot be replaced; name a folder inside it")
    check_can_create(target)
    if target.exists() and _sticky_and_foreign(target):
        raise PermissionError(f"cannot replace output folder {out}: it belongs to another user (sticky parent)")
    return target


def check_can_create(path: str | os.PathLike) -> None:
    """Refuse, before any work, a file or folder that cannot be created at ``path`` (a file in the way, permissions)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {path}: no permission to write in {existing}")


def _sticky_and_foreign(target: Path) -> bool:
    """In a sticky folder (/tmp) only a folder's owner or the parent's may rename it."""
    me = os.geteuid()
    parent = target.parent.stat()
    return me != 0 and bool(parent.st_mode & stat.S_ISVTX) and me not in (parent.st_uid, target.stat().st_uid)


def check_replaceable(target: Path, command: str) -> list[str]:
    """Refuse ``target`` unless it is absent, empty, or ``command``'s output holding only what its marker lists.

    Returns the entries of the previous output (empty when there is none).
    """
    if not target.exists():
        return []
    try:
        everything = _all_entries(target)
    except OSError as e:
        raise PermissionError(f"cannot read output folder {target}: {e.strerror}") from None
    marker = read_marker(target)
    if marker is None and not everything:
        return []
    if marker is None:  # a .whisper-lens.json that is not whisper-lens' own counts as the user's file
        raise FileExistsError(
            f"output folder {target} is not empty and was not written by whisper-lens (it holds {_some(everything)}); "
            "choose a new or empty folder, nothing was changed"
        )
    if marker["command"] != command:
        raise FileExistsError(
            f"output folder {target} holds the output of `whisper-lens {marker['command']}`, not {command}; "
            "choose another folder, nothing was changed"
        )
    found = [p for p in everything if p != MARKER]
    listed = marker.get("files")
    foreign = [p for p in found if not isinstance(listed, list) or p not in listed]
    if foreign:
        raise FileExistsError(
            f"output folder {target} holds {_some(foreign)}, which whisper-lens did not write; move it out or "
            "choose another folder, nothing was changed"
        )
    changed = edited(target, marker, found)
    if changed:
        _refuse_edited(target, changed, "output folder")
    return found


def _some(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return the ones created (deepest last), to remove on failure."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    for p in missing:
        with contextlib.suppress(FileExistsError):
            _new_folder(p)
    return missing


def _remove_empty(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


def _switch(tmp: Path, target: Path, command: str) -> None:
    """Put ``tmp`` in ``target``'s place; remove the previous output. Locked, with signals held back."""
    with _locked(target.parent), signals_held():
        previous = check_replaceable(target, command)  # again: another run may have finished meanwhile
        try:
            old = _put_in_place(tmp, target)
        except OSError as e:
            raise OSError(
                f"cannot put the new output in place of {target}: {e.strerror or e}; {target} is as it was"
            ) from None
        if old is not None:
            _remove_previous(old, previous)


def _put_in_place(tmp: Path, target: Path) -> Path | None:
    """Rename ``tmp`` to ``target``; return where the previous ``target`` now is (None if there was none)."""
    if not target.exists():
        os.rename(tmp, target)
        return None
    if _exchange(tmp, target):
        return tmp  # tmp now holds the previous output
    old = _create_temp(target.parent, f".{target.name}.{TEMP_TAG}-{os.getpid()}-", "", _new_folder)
    os.rename(target, old)  # replaces the empty folder just made
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the filesystem (or kernel) cannot exchange: two renames instead
    raise OSError(code, f"cannot replace {b}: {os.strerror(code)}", str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove_previous(folder: Path, entries: list[str]) -> None:
    """Delete the previous output's listed files and folders (links unfollowed), then the folder itself."""
    for rel in sorted(entries + [MARKER], key=lambda p: -p.count("/")):  # deepest first
        path = folder / rel
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
    try:
        folder.rmdir()
    except OSError:
        warnings.warn(f"kept {folder}: something was added to the previous output while it was replaced", stacklevel=3)


def _discard(tmp: Path) -> None:
    """Remove a temporary folder this process made (it holds only what the command wrote)."""
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale(target: Path) -> None:
    """Remove temporary folders for ``target`` left by whisper-lens processes on this host that no longer run."""
    prefix = f".{target.name}.{TEMP_TAG}-"
    try:
        names = [n for n in os.listdir(target.parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        folder = target.parent / name
        marker = read_marker(folder)
        if marker and "files" not in marker and marker.get("host") == socket.gethostname():
            pid = marker.get("pid")
            if isinstance(pid, int) and not _alive(pid):
                _discard(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` (flock on the directory itself: no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP until the block is over; they are raised again after it.

    Python runs signal handlers in the main thread only, so from the main thread the handlers are
    swapped for ones that just note the signal; another thread is never interrupted by them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not None:  # None: a handler installed outside Python, left alone
            previous[sig] = signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in noted:
            signal.raise_signal(sig)
