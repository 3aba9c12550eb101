"""A host's cores, shared by the vqlog processes that train on it, however they were started:
`vqlog-sweep` in two terminals or two scheduler jobs, a second sweep beside a `--workers` one,
`vqlog train` beside a sweep. Each sized torch's pool by the whole host before: two one-worker
sweeps on 2 cores took 2.5 times as long a trial as with the cores shared (OpenMP threads
spinning on cores the other process holds; benchmarks/bench_core_share.py).

Each live process holds an exclusive lock (flock) on a file of its own in a folder only its user
may write to (by default `vqlog-<uid>/workers` in the temp folder); the file holds the CPUs the
process may run on. `CoreShare.apply()` sets torch's threads to the process's cores (`hosts.
cores`) / the live processes whose CPUs overlap its own, at least 1 and at most its limit; a
worker calls it as each trial starts, so the threads follow processes that start and end. A
file whose lock is free is a dead process's (the kernel drops a killed process's locks) and is
removed; the others probe it with a shared lock, so that one scan's probe never looks like a
live process to another scan. A hidden file (one not yet renamed into view) is never counted, and
is removed once it is a minute old and free. Where the folder cannot be used, the process counts
as alone (still at most its limit). Processes that do not share a temp folder (most containers)
do not see each other, and are sized by their own CPU quota.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

from vqlog.study.hosts import cores

# A hidden file (made, locked, then renamed into view) older than this, and unlocked, is a
# process's that was killed before the rename: removed as a dead process's visible file is.
HIDDEN_SECONDS = 60.0


class CoreShare:
    """This process's place among the host's vqlog processes. `limit`: at most this many torch
    threads (a `--workers` child's cores / N; default: the threads torch has when the share
    opens, which `close()` puts back); `fixed`: the threads are the user's (OMP_NUM_THREADS),
    never changed, yet the process is counted by the others."""

    def __init__(self, limit: int | None = None, fixed: bool = False,
                 folder: Path | None = None):
        import tempfile
        import uuid

        import torch

        self.before = torch.get_num_threads()
        self.limit = limit or self.before
        self.fixed = fixed
        self.cpus = _affinity()
        self.folder = folder or Path(tempfile.gettempdir()) / f"vqlog-{os.getuid()}" / "workers"
        self.path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fd: int | None = None
        new = self.folder / f".{self.path.name}"  # locked before the others can see it
        fd = None
        try:
            import fcntl

            for folder in (self.folder.parent, self.folder):
                _own_folder(folder)
            fd = os.open(new, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, ",".join(map(str, sorted(self.cpus or ()))).encode())
            os.rename(new, self.path)
            self.fd = fd
        except (OSError, ImportError):  # a read-only temp folder, another user's, no flock
            if fd is not None:
                os.close(fd)
                with contextlib.suppress(OSError):
                    new.unlink()

    def processes(self) -> int:
        """The live processes sharing this one's CPUs, this one included; 1 on any failure."""
        if self.fd is None:
            return 1
        import fcntl

        live = 1
        try:
            entries = [e for e in self.folder.iterdir() if e != self.path]
        except OSError:
            return 1
        for entry in entries:
            hidden = entry.name.startswith(".")  # not yet renamed: never counted
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:  # removed meanwhile, or not a plain file
                continue
            try:  # shared: two scans of a dead process's file do not see each other's probe
                if hidden and time.time() - os.fstat(fd).st_mtime < HIDDEN_SECONDS:
                    continue  # a process that is making it, or just was
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held exclusively: a live process
                theirs = _cpus(os.pread(fd, 1 << 16, 0))
                live += not hidden and (not (self.cpus and theirs) or bool(self.cpus & theirs))
            except OSError:
                pass
            else:  # free: its process is gone
                with contextlib.suppress(OSError):
                    entry.unlink()
            finally:
                os.close(fd)
        return live

    def threads(self) -> int:
        return min(self.limit, max(1, cores() // self.processes()))

    def apply(self) -> int:
        """Set torch's intra-op threads to this process's share (unless fixed); returns them."""
        import torch

        if not self.fixed and torch.get_num_threads() != (n := self.threads()):
            torch.set_num_threads(n)
        return torch.get_num_threads()

    def close(self) -> None:
        """Leave the share, and put torch's threads back as they were."""
        import torch

        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)  # the lock goes with it
            self.fd = None
        if not self.fixed and torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)

    def __enter__(self) -> "CoreShare":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def core_share(limit: int | None = None) -> CoreShare:
    """A CoreShare for this process; the user's OMP_NUM_THREADS, where set, is kept (`fixed`)."""
    return CoreShare(limit, fixed="OMP_NUM_THREADS" in os.environ)


def _own_folder(folder: Path) -> None:
    """`folder`, made if missing, a folder of this user's that no one else may write to (one
    this user made open to the group is closed); OSError otherwise."""
    folder.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{folder} is not this user's own folder")
    if st.st_mode & 0o022:
        os.chmod(folder, 0o700)


def _affinity() -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on this platform
        return None


def _cpus(text: bytes) -> frozenset[int] | None:
    try:
        return frozenset(int(c) for c in text.decode().split(",") if c) or None
    except ValueError:
        return None
