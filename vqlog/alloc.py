"""glibc's malloc told to keep freed memory for the next training step.

A CPU training step allocates and frees a few dozen tensors of 1 to 8 MiB. glibc returns such
memory to the kernel as soon as it is freed: a block above the mmap threshold is unmapped, and
the top of the heap is trimmed once more than the trim threshold of it is free (glibc raises both
as it sees large frees, but only to the largest block freed so far and twice that). The next
step's tensors then land in fresh pages, and every 4 KiB page costs a fault and a zero-fill: at
the seed spec's shape about 4,000 page faults a step, 5 to 7 ms of kernel time and the cache
misses that come with it (`benchmarks/bench_alloc.py`).

`keep_freed_memory()` fixes the three settings with glibc's `mallopt`, for the whole process:
blocks up to 32 MiB come from the heap, and the heap keeps up to 256 MiB free at its top (and
grows 64 MiB at a time) instead of handing it back. A process then holds on to the memory of its
largest step; that is the high-water mark it reaches anyway. Tensors above 32 MiB (a long
evaluation chunk) are still mapped and unmapped on their own.

Huge pages. A step's tensors are 1 to 8 MiB each, read and written a few dozen times a step: in
4 KiB pages each pass over them walks the page tables for a few thousand pages, and the TLB
misses that cost. Linux backs memory with 2 MiB transparent huge pages where a program asks for
them (`madvise`, most distributions' setting), and glibc asks for its heap when its
`glibc.malloc.hugetlb=1` tunable is set. Tunables are read only when a process starts, so a
vqlog command line, as it starts, runs itself again (the same process, `execve`) with
GLIBC_TUNABLES holding the three settings and the huge pages (`restart_tuned`); the sweep's
worker processes inherit them. Where that is not possible or not wanted, `keep_freed_memory`
makes the three settings with `mallopt`, without huge pages.

It is a command line's choice, not a library's: the CLI and the sweep's worker processes call it
(`vqlog.cli.main` and `vqlog.cli.configure_process`), `import vqlog` does not. It leaves malloc
as it is where the user has a say already: `VQLOG_MALLOC=system`, any of glibc's own
`MALLOC_*_` variables or `glibc.malloc` tunables, or another allocator loaded with LD_PRELOAD
(jemalloc, tcmalloc). Off Linux or on a C library that is not glibc (musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MiB = 1 << 20
SETTINGS = {  # mallopt parameter -> value
    M_MMAP_THRESHOLD: 32 * MiB,  # the largest value glibc's own dynamic threshold reaches
    M_TRIM_THRESHOLD: 256 * MiB,
    M_TOP_PAD: 64 * MiB,
}

# The same settings as glibc tunables, with huge pages for the heap (glibc 2.35 and later).
TUNABLES = ":".join([
    f"glibc.malloc.mmap_threshold={SETTINGS[M_MMAP_THRESHOLD]}",
    f"glibc.malloc.trim_threshold={SETTINGS[M_TRIM_THRESHOLD]}",
    f"glibc.malloc.top_pad={SETTINGS[M_TOP_PAD]}",
    "glibc.malloc.hugetlb=1",
])
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never"

OPT_OUT = "VQLOG_MALLOC"  # "system": leave glibc's malloc as it is
# glibc's own environment variables for these settings, read when the process starts.
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                   "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")

_outcome: str | None = None  # what keep_freed_memory did in this process, once it ran


def reason_to_leave(environ=os.environ) -> str | None:
    """Why malloc should be left as it is in this environment, or None. An unknown VQLOG_MALLOC
    raises UserError."""
    choice = environ.get(OPT_OUT, "").strip().lower()
    if choice == "system":
        return f"{OPT_OUT}=system"
    if choice not in ("", "vqlog"):
        from vqlog.errors import UserError

        raise UserError(f"{OPT_OUT} must be 'vqlog' (the default) or 'system', not {environ[OPT_OUT]!r}")
    for name in GLIBC_VARIABLES:
        if name in environ:
            return f"{name} is set"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    if environ.get("LD_PRELOAD", "").strip():
        return "LD_PRELOAD is set (another allocator, perhaps)"
    return None


def glibc():
    """The process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded: the C library among them
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others have no gnu_get_libc_version
    return libc


def huge_pages_on_request() -> bool:
    """Whether the kernel backs memory with transparent huge pages where a program asks
    (`madvise`) or always."""
    try:
        with open(THP_MODE) as f:
            mode = f.read()
    except OSError:
        return False
    return "[madvise]" in mode or "[always]" in mode


def glibc_version(libc) -> tuple[int, int]:
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    major, minor = libc.gnu_get_libc_version().decode().split(".")[:2]
    return int(major), int(minor)


def restart_tuned(environ=os.environ) -> None:
    """Run this command line again in this process (`execve`) with TUNABLES in GLIBC_TUNABLES,
    unless malloc is to be left alone (`reason_to_leave`; an unknown VQLOG_MALLOC is left for
    `keep_freed_memory` to report), they are set already, glibc is older than 2.35, or the kernel
    gives no huge pages on request. Returns only when it does not restart. Call it first thing,
    before anything is printed or started."""
    try:
        if reason_to_leave(environ) is not None or TUNABLES in environ.get("GLIBC_TUNABLES", ""):
            return
    except Exception:  # noqa: BLE001 - an unknown VQLOG_MALLOC: reported by keep_freed_memory
        return
    libc = glibc()
    if libc is None or glibc_version(libc) < (2, 35) or not huge_pages_on_request():
        return
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own command line (3.10+)
    if not argv or not sys.executable:
        return
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), TUNABLES]))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return  # run on as we are: keep_freed_memory makes the settings


def keep_freed_memory(environ=os.environ) -> str:
    """Apply SETTINGS with mallopt, unless the environment says otherwise; returns what was done
    ("applied", "applied at start" when `restart_tuned` set them with huge pages, or why not).
    The settings are made once per process: later calls return the first outcome (after
    checking VQLOG_MALLOC again: an unknown value raises UserError)."""
    global _outcome
    reason = reason_to_leave(environ)
    if _outcome is not None:
        return _outcome
    if TUNABLES in environ.get("GLIBC_TUNABLES", ""):
        _outcome = "applied at start, with huge pages (GLIBC_TUNABLES)"
        return _outcome
    libc = None if reason else glibc()
    if reason is None and libc is None:
        reason = "not glibc"
    if reason is None:
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        failed = [param for param, value in SETTINGS.items() if libc.mallopt(param, value) != 1]
        reason = f"mallopt refused {failed}" if failed else None
    _outcome = "applied" if reason is None else f"left as it is: {reason}"
    return _outcome


def outcome() -> str | None:
    """What keep_freed_memory did in this process, or None if it has not run."""
    return _outcome
