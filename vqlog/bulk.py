"""Bulk reads without Python's cyclic garbage collector in the way.

A worker's start reads every trial of the study from Optuna's storage and every trial run from
MLflow: at 10,000 trials a few million objects, all of which stay alive. While they are built,
each full collection walks the whole heap again, and Python 3.11 runs one whenever a quarter as
many objects as the heap holds have survived the young generations: 17 to 25 of them were two
thirds of a worker's start at 10,000 runs (benchmarks/README.md, scale).
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """The cyclic collector off for the block, and back on after (unless it was off already).
    Reference counting still frees what dies meanwhile; the collector looks at the rest once it
    is back on.

    The switch is process-wide: other threads run without the collector meanwhile too. When two
    such blocks overlap in two threads, the one that turned it off turns it back on when it
    ends, even if the other is still running."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
