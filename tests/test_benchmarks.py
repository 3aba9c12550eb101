"""The benchmarks still run against the code they measure. Each runs in its quickest form, as
its own process from the repository root, and must exit 0 and write its JSON with a result in it.
No time is asserted here: the figures are the benchmarks' own (README, "Performance").

bench_scale once failed at its first worker, after Tracker.start_study gained an argument that
its timed subclass did not take, and nothing noticed until the benchmark was next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _sweep_helpers import ROOT, SUBPROCESS_ENV

QUICK = {  # benchmark: its quickest arguments
    "bench_scale": ["--sizes", "100", "--rounds", "1", "--topologies", "sqlite"],
    "bench_tracking": ["--rounds", "1", "--iterations", "20"],
    "bench_step": ["--shapes", "default", "--rounds", "1", "--steps", "1"],
    "bench_syncs": ["--shapes", "default", "--rounds", "1", "--steps", "5"],
    "bench_nearest": ["--rounds", "1"],
    "bench_checkpoint": ["--rounds", "1"],
    "bench_core_share": ["--sweeps", "1", "--trials", "1", "--iterations", "10"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUICK))
def test_a_benchmark_runs_in_its_quickest_form(tmp_path, name):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, f"benchmarks/{name}.py", *QUICK[name], "--out", str(out)],
                          cwd=ROOT, env={**os.environ, **SUBPROCESS_ENV}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    payload = json.loads(out.read_text())
    assert payload["table"] and payload["machine"], sorted(payload)  # what it printed, and where
