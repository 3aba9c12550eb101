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
import time
from pathlib import Path

import pytest

from _sweep_helpers import mlflow_runs, write_spec
from vqlog.study.cores import HIDDEN_SECONDS, CoreShare, core_share
from vqlog.study.hosts import cores

HOLD = ("import sys, time\n"
        "from pathlib import Path\n"
        "from vqlog.study.cores import CoreShare\n"
        "share = CoreShare(limit=64, folder=Path(sys.argv[1]))\n"
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
    with CoreShare(limit=64, folder=folder) as mine:
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


def test_a_file_left_hidden_by_a_process_killed_before_its_rename_goes_once_old(tmp_path):
    """A process killed between making its file (hidden, `.<name>`) and renaming it into view
    left the hidden file for good. Once it is old and unlocked it is removed; a fresh one (a
    process making its own now) is left alone and never counted."""
    folder = tmp_path / "workers"
    with CoreShare(limit=64, folder=folder) as mine:
        old, fresh = folder / ".999999-0ld", folder / ".999998-new"
        old.write_text("0")
        fresh.write_text("0")
        past = time.time() - HIDDEN_SECONDS - 5
        os.utime(old, (past, past))
        assert mine.processes() == 1
        assert sorted(p.name for p in folder.iterdir()) == sorted([mine.path.name, fresh.name])


SCAN = ("import os, sys\n"
        "from pathlib import Path\n"
        "from vqlog.study.cores import CoreShare\n"
        "folder = Path(sys.argv[1])\n"
        "share = CoreShare(limit=64, folder=folder)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "over = 0\n"
        "for i in range(2000):\n"
        "    (folder / f'999999-dead{os.getpid()}-{i}').write_text('')  # a killed process's\n"
        "    over += share.processes() > 2\n"
        "print(over, flush=True)\n"
        "share.close()\n")


def test_two_scans_never_count_a_dead_processs_file_as_live(tmp_path):
    """Two processes scanning at once, while killed processes' files come and go: one scan's
    probe of a dead file (an exclusive lock, held while it removed the file) looked like a live
    process to the other, 25 to 39 scans in 2000, each a trial run with too few threads."""
    folder = tmp_path / "workers"
    procs = [subprocess.Popen([sys.executable, "-c", SCAN, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        for p in procs:  # both start scanning together
            p.stdin.write("go\n")
            p.stdin.flush()
        assert [int(p.stdout.readline()) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
            p.wait(30)


def test_an_unusable_folder_counts_this_process_as_alone_within_its_limit(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with CoreShare(limit=64, folder=blocked / "workers") as share:
        assert share.processes() == 1 and share.threads() == cores()
    with CoreShare(limit=1, folder=blocked / "workers") as share:  # a --workers child's cores / N
        assert share.threads() == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder another user's")
def test_another_users_folder_is_not_used(tmp_path):
    """On a shared host another user could make `vqlog-<uid>` first and put a link or a named
    pipe there for a worker to open: their folder is left alone."""
    theirs = tmp_path / "vqlog-someone"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    with CoreShare(limit=64, folder=theirs / "workers") as share:
        assert share.processes() == 1 and list(theirs.iterdir()) == []


def test_a_folder_open_to_others_is_closed_and_odd_entries_are_skipped(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o777)
    os.mkfifo(mine / "123-deadbeef")  # not a lock file: not waited on
    (mine / "456-cafe").symlink_to(tmp_path / "elsewhere")
    with CoreShare(limit=64, folder=mine) as share:
        assert os.stat(mine).st_mode & 0o777 == 0o700
        assert share.processes() == 1


def test_only_processes_on_the_same_cpus_are_counted(tmp_path):
    """Two jobs pinned to different cores (taskset, a Slurm cpuset) do not compete."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    first, second = sorted(os.sched_getaffinity(0))[:2]
    folder = tmp_path / "workers"
    pinned = subprocess.Popen(["taskset", "-c", str(second), sys.executable, "-c", HOLD,
                               str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert pinned.stdout.readline().strip() == "ready"
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {first})
        try:
            with CoreShare(limit=64, folder=folder) as alone:
                assert alone.processes() == 1
        finally:
            os.sched_setaffinity(0, before)
        with CoreShare(limit=64, folder=folder) as overlapping:
            assert overlapping.processes() == 2
    finally:
        pinned.stdin.close()
        pinned.wait(30)


def test_close_puts_torch_threads_back(tmp_path):
    """A notebook's vqlog.sweep() leaves torch's threads as it found them."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        share = CoreShare(limit=1, folder=tmp_path / "workers")
        torch.set_num_threads(2)  # as a trial might have left them
        share.close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


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


def test_omp_num_threads_set_by_the_user_is_kept_and_counted(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = tmp_path / "workers"
    with core_share() as users:
        assert users.fixed and users.apply() == torch.get_num_threads()
    theirs = CoreShare(limit=64, fixed=True, folder=folder)  # as core_share() makes it
    try:
        with CoreShare(limit=64, folder=folder) as mine:
            assert mine.processes() == 2  # the fixed one is counted all the same
    finally:
        theirs.close()
