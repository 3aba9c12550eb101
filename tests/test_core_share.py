"""A host's cores shared by the vqlog processes that train on it, however they were started.

Two `vqlog-sweep` processes started apart on one 2-core host each sized torch's pool by the whole
host, and each trial took 2.5 times as long as with the cores shared. Each process now holds
a lock on a file of its own in a folder per user, and sets its torch threads to cores / live
processes as each trial starts. Real processes, real locks, real sweeps; no mocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _sweep_helpers import mlflow_runs, write_spec
from vqlog.study.hosts import CoreShare, cores

HOLD = ("import sys, time\n"
        "from pathlib import Path\n"
        "from vqlog.study.hosts import CoreShare\n"
        "share = CoreShare(Path(sys.argv[1]))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "share.close()\n")


def holder(folder: Path) -> subprocess.Popen:
    """Another process on the host, registered in `folder` until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_processes_are_counted_while_they_live_and_a_killed_ones_file_goes(tmp_path):
    folder = tmp_path / "workers"
    with CoreShare(folder) as mine:
        assert mine.processes() == 1 and mine.threads() == cores()
        first, second = holder(folder), holder(folder)
        try:
            assert mine.processes() == 3
            assert mine.threads() == max(1, cores() // 3)
            second.kill()  # SIGKILL: no close(); the kernel drops its lock
            second.wait(30)
            assert mine.processes() == 2
            assert len(list(folder.iterdir())) == 2  # the dead one's file was removed
            first.stdin.close()  # a clean end: close() removes its own file
            first.wait(30)
            assert mine.processes() == 1 and [p.name for p in folder.iterdir()] == [mine.path.name]
        finally:
            for p in (first, second):
                p.kill()
                p.wait(30)
    assert list(folder.iterdir()) == []


def test_an_unusable_folder_counts_this_process_as_alone(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    share = CoreShare(blocked / "workers")
    assert share.processes() == 1 and share.threads() == cores()
    share.close()


@pytest.mark.slow
def test_a_sweep_started_beside_another_process_takes_its_share_of_the_cores(tmp_path):
    """`vqlog-sweep` without OMP_NUM_THREADS while another vqlog process holds its place: each
    trial run's `vqlog.torch_threads` is the sweep's share; once the other has ended, the
    trials of the rerun take every core."""
    if cores() < 2:
        pytest.skip("one core: every share is one thread")
    temp = tmp_path / "tmp"  # the sweep's own temp folder: other tests' workers are not counted
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["TMPDIR"] = str(temp)
    spec = write_spec(tmp_path, "shared", budget={"iteration": 10, "eval_every": 10},
                      pruner="none")

    def sweep(trials: int) -> None:
        done = subprocess.run([f"{sys.prefix}/bin/vqlog-sweep", "--trials", str(trials),
                               "--config", str(spec)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    other = holder(temp / f"vqlog-{os.getuid()}" / "workers")
    try:
        sweep(2)
    finally:
        other.stdin.close()
        other.wait(30)
    sweep(3)
    runs = sorted(mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db", "shared"),
                  key=lambda r: int(r.data.tags["optuna.trial_number"]))
    assert [r.data.tags["vqlog.torch_threads"] for r in runs] == \
        [str(cores() // 2)] * 2 + [str(cores())]
    assert list((temp / f"vqlog-{os.getuid()}" / "workers").iterdir()) == []


def test_omp_num_threads_set_by_the_user_is_kept(monkeypatch):
    from vqlog.study.hosts import core_share

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert core_share() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    share = core_share()
    assert isinstance(share, CoreShare)
    share.close()


