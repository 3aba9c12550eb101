"""Files that a reader never sees half-written: the experiment table and saved weights.

`atomic_write` writes a temp file in the target's folder, syncs it and renames it over the target,
so a reader (or a worker killed mid-write) sees the old file or the new one, never a piece.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from vqlog.failpoints import failpoint

ORPHAN_AGE = 600  # seconds: a temp file this old was left by a killed writer, not a live one


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 crash_point: str | None = None) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it to `path`.

    The file keeps the mode of the one it replaces (0644 for a new one; mkstemp's 0600 would hide
    a table from other users). A symbolic link of this user's is followed: the file it points
    to is replaced and the link kept. A character device (/dev/null) or a named pipe of this
    user's is written as it is, not replaced by a file (as root, `--out /dev/null` replaced the
    device). `crash_point` names the failpoint between the write and the
    rename, for the crash-safety test."""
    path = Path(path)
    if path.is_char_device() or (path.is_fifo() and path.stat().st_uid == os.getuid()):
        with open(path, "wb") as f:  # /dev/null, a pipe of this user's (/dev/stdout | tool)
            write(_Stream(f))
        return
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if crash_point:
            failpoint(crash_point)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class _Stream:
    """Writes only, in order: what a pipe takes. numpy and torch ask a real file for its position
    (np.save: "obtaining file position failed" on a pipe); given this, they write in order."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True


def _target(path: Path) -> Path:
    """The file a write to `path` replaces: where a link of this user's points (the link kept),
    else `path` itself. Another user's link (one planted in a shared /tmp) is not followed, nor
    a link to a folder that does not exist."""
    if not path.is_symlink() or os.lstat(path).st_uid != os.getuid():
        return path
    target = Path(os.path.realpath(path))
    return target if target.parent.is_dir() else path


def write_text(path: str | os.PathLike, text: str, crash_point: str | None = None) -> None:
    """`text` as UTF-8 with \\n line ends, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), crash_point)


def remove_orphans(path: Path) -> None:
    """Temp files of `path` left by a writer killed before its rename. Only old ones: a worker on
    another host may be writing its own right now (the folder can be shared)."""
    cutoff = time.time() - ORPHAN_AGE
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


def read_only_part(path: str | os.PathLike) -> str | None:
    """What keeps this process from writing a database file and the lock file beside it: "the
    file F" or "the folder D", or None: the file's access (a read-only mount counts), and the
    folder tried with an unnamed temp file, made and dropped (root passes its mode bits, and
    /proc takes no file)."""
    path = Path(path).expanduser().resolve()
    # (the file is not opened: closing any descriptor of it drops this process's SQLite locks)
    if path.is_file() and not os.access(path, os.W_OK):
        return f"the file {path}"
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError:
        return f"the folder {path.parent}"
    return None
