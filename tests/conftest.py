"""Shared test setup. Keep this file to small, generic pieces."""

import os
import sys


def pytest_configure(config):
    # One intra-op thread. The tests run tiny models (d_model 8) on a shared 2-core machine;
    # with two OpenMP threads and other processes on the cores, a tiny forward+backward measured
    # ~400 ms instead of ~8 ms (spinning threads waiting for a core). Set before torch starts its
    # pool; a value the caller exported (OMP_NUM_THREADS=2 pytest) is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:  # imported early by a plugin: the variable came too late
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
