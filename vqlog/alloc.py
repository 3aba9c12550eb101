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

It is a command line's choice, not a library's: the CLI and the sweep's worker processes call it
(`vqlog.cli.configure_process`), `import vqlog` does not. It leaves malloc as it is where the
user has a say already: `VQLOG_MALLOC=system`, any of glibc's own `MALLOC_*_` variables or
`glibc.malloc` tunables, or another allocator loaded with LD_PRELOAD (jemalloc, tcmalloc). Off
Linux or on a C library that is not glibc (musl) it does nothing.
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


def keep_freed_memory(environ=os.environ) -> str:
    """Apply SETTINGS with mallopt, unless the environment says otherwise; returns what was done
    ("applied", or why not). The settings are made once per process: later calls return the
    first outcome (after checking VQLOG_MALLOC again: an unknown value raises UserError)."""
    global _outcome
    reason = reason_to_leave(environ)
    if _outcome is not None:
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
