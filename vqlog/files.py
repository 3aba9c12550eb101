"""Files that a reader never sees half-written: the experiment table and saved weights.

`atomic_write` writes a temp file in the target's folder, syncs it and renames it over the target,
so a reader (or a worker killed mid-write) sees the old file or the new one, never a piece.
"""

from __future__ import annotations

import contextlib
import glob
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from vqlog.failpoints import failpoint

ORPHAN_AGE = 600  # seconds: a temp file this old was left by a killed writer, not a live one


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 crash_point: str | None = None) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it to `path`.

    The file keeps the mode of the one it replaces (a new one gets the user's umask: 0644 under
    the usual 022, where mkstemp's 0600 would hide a table from other users). A symbolic link of
    this user's is followed: the file it points to is replaced and the link kept. An output that
    `writes_through` is written as it is, not replaced by a file (as root, `--out /dev/null`
    replaced the device). `crash_point` names the failpoint between the write and the rename,
    for the crash-safety test."""
    atomic_write_all([(path, write)], crash_point)


def atomic_write_all(outputs: list[tuple[str | os.PathLike, Callable[[BinaryIO], None]]],
                     crash_point: str | None = None) -> None:
    """`atomic_write` of several files that belong together (encode's tokens and their index):
    all are written to temp files first and renamed only once every write has succeeded, so a
    failed write (a full disk) leaves each file as it was; a rename that fails after others
    (a file it may not replace) puts those back, from hard links of their old files. Outputs
    that write through (a pipe, /dev/stdout) are written after the renames: a stream cannot be
    taken back."""
    staged: list[tuple[str, Path]] = []  # (temp file, the file it replaces)
    replaced: list[tuple[Path, str | None, bool]] = []  # renamed: (file, a link to its old one,
    #                                                      whether it existed)
    streams = []
    try:
        for path, write in outputs:
            path = Path(path)
            if writes_through(path):
                streams.append((path, write))
                continue
            path = write_target(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
            remove_orphans(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
        if crash_point:
            failpoint(crash_point)
        while staged:
            tmp, path = staged[0]
            old, existed = None, path.exists()
            if len(outputs) > 1 and existed:
                old = f"{tmp[:-4]}.old"  # (remove_orphans' pattern, for a writer killed here)
                try:
                    os.link(path, old)
                except OSError:  # no hard links here: replaced without a way back
                    old = None
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.unlink(old)
                raise
            replaced.append((path, old, existed))
            staged.pop(0)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for path, old, existed in reversed(replaced):  # the renames before the one that failed
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, path)
                elif not existed:
                    os.unlink(path)  # there was none before
        raise
    finally:
        for _, old, _ in replaced:
            if old is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
    for path, write in streams:
        with open(path, "ab") as f:  # append: what `>>` gave the shell's file stays
            write(_Stream(f))


def writes_through(path: Path) -> bool:
    """Whether an output is written as it is, not replaced by a new file: a character device
    (/dev/null, a terminal), a named pipe of this user's, or this process's standard output or
    error (`--out /dev/stdout`, whatever it goes to: a pipe, a terminal, a file)."""
    try:
        there = path.stat()
    except OSError:
        return False
    if stat.S_ISCHR(there.st_mode) or (stat.S_ISFIFO(there.st_mode) and there.st_uid == os.getuid()):
        return True
    return is_open_as(path, 1) or is_open_as(path, 2)


def is_open_as(path: str | os.PathLike, fd: int) -> bool:
    """Whether `path` is the file that descriptor `fd` of this process has open."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except (OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


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


def write_target(path: Path) -> Path:
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
    for tmp in [*path.parent.glob(f".{glob.escape(path.name)}.*.tmp"),
                *path.parent.glob(f".{glob.escape(path.name)}.*.old")]:
        with contextlib.suppress(FileNotFoundError):
            st = tmp.stat()  # a .old is a hard link to an old file: its ctime is the link's
            if (st.st_ctime if tmp.suffix == ".old" else st.st_mtime) < cutoff:
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
