"""Long trials: checkpoints, resume and a clean stop, from `fit` to real `vqlog-sweep` processes
on the SQLite default, across "hosts" (separate folders, one `mlflow server`, PostgreSQL), and
under SIGTERM. A resumed trial must end where an uninterrupted one ends: on the CPU with one
thread, the same final validation MSE within 1e-6 relative (it is equal here).

VQLOG_RESUME_SEED=<n> replays one draw of the random stop and kill points.
"""

import io
import math
import os
import random
import re
import signal
import time

import pytest
from _sweep_helpers import (FAST_HEARTBEAT, Worker, has_checkpoint, mlflow_runs, retried_from,
                            states, study_trials, wait_until, write_spec)

from vqlog.checkpoint import read_state, write_state
from vqlog.config import QUANTIZERS
from vqlog.data import prepare
from vqlog.errors import TrainingStopped, UserError
from vqlog.train import fit

SEED = int(os.environ.get("VQLOG_RESUME_SEED", time.time_ns() % 1_000_000))


def rng(name: str) -> random.Random:
    print(f"VQLOG_RESUME_SEED={SEED}")  # shown by pytest when the test fails
    return random.Random(f"{SEED}:{name}")


class StopAfter:
    """`should_stop` that turns true after `n` steps (counted through `progress`)."""

    def __init__(self, n: int):
        self.n, self.step = n, 0

    def progress(self, step: int, point) -> None:
        self.step = step

    def __call__(self) -> bool:
        return self.step >= self.n


def same_summary(a: dict, b: dict) -> None:
    for key in a:
        if key == "train_seconds":
            continue
        if math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), key


# ------------------------------------------------------------------------------------ fit


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_a_stopped_fit_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(quantizer, tiny,
                                                                                 tmp_path):
    """Stopped at a random step (mid log interval, mid evaluation interval), saved to a file,
    loaded weights-only and resumed: the same curves and summary as without the stop."""
    cfg = tiny(quantizer=quantizer, iteration=30, dropout=0.1)  # dropout: the RNG matters
    data = prepare("synthetic", cfg)
    straight = fit(cfg, data)
    stop_at = rng(quantizer).randint(2, cfg.iteration - 2)
    saved, stop = [], StopAfter(stop_at)
    with pytest.raises(TrainingStopped) as stopped:
        fit(cfg, data, on_checkpoint=saved.append, should_stop=stop, progress=stop.progress)
    assert stopped.value.iteration == stop_at and [s["step"] for s in saved] == [stop_at]
    write_state(tmp_path / "state.pt", saved[0])
    resumed = fit(cfg, data, resume=read_state(tmp_path / "state.pt"))
    assert resumed.resumed_at == stop_at
    same_summary(straight.summary(), resumed.summary())
    assert repr(resumed.train_points) == repr(straight.train_points)  # exact, NaN included
    assert [e.step for e in resumed.evals] == [e.step for e in straight.evals]


def test_checkpoints_come_every_checkpoint_every_steps_but_not_after_the_last(tiny):
    cfg = tiny(iteration=17)
    data = prepare("synthetic", cfg)
    for every, expected in ((5, [5, 10, 15]), (4, [4, 8, 12, 16]), (0, [])):
        saved = []
        fit(cfg, data, checkpoint_every=every, on_checkpoint=lambda s: saved.append(s["step"]))
        assert saved == expected, every
    saved, stop = [], StopAfter(7)  # a stop checkpoints even with periodic checkpoints off
    with pytest.raises(TrainingStopped):
        fit(cfg, data, on_checkpoint=lambda s: saved.append(s["step"]), should_stop=stop,
            progress=stop.progress)
    assert saved == [7]


def test_a_training_state_is_weights_only_and_for_its_own_config(tiny, tmp_path):
    from vqlog import checkpoint
    from vqlog.model.vqvae import VQVAE

    cfg = tiny()
    checkpoint.save(tmp_path / "model.pt", cfg, VQVAE(cfg))
    with pytest.raises(UserError, match="is not a vqlog training state"):
        read_state(tmp_path / "model.pt")  # a model file is not a training state
    saved = []
    data = prepare("synthetic", cfg)
    fit(cfg, data, checkpoint_every=5, on_checkpoint=saved.append)
    buffer = io.BytesIO()
    write_state(buffer, saved[0])
    (tmp_path / "state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="another configuration"):
        fit(tiny(lr=1e-4), data, resume=read_state(tmp_path / "state.pt"))


def test_a_state_saved_on_a_gpu_resumes_on_the_cpu(tiny, tmp_path):
    """A retry may land on any host. The batch sampler's generator is the CPU's on every device,
    so its state resumes anywhere; a state from a version that sampled on the GPU (a CUDA
    generator's 16-byte state, one CUDA RNG state per visible GPU) resumes too, with the sampler
    reseeded for that step: the same on every retry."""
    import torch

    cfg = tiny(iteration=12)
    data = prepare("synthetic", cfg)
    straight = fit(cfg, data)
    saved, stop = [], StopAfter(5)
    with pytest.raises(TrainingStopped):
        fit(cfg, data, on_checkpoint=saved.append, should_stop=stop, progress=stop.progress)
    state = saved[0]
    assert state["rng"]["sampler"].numel() == torch.Generator().get_state().numel()
    assert state["rng"]["cuda"] is None  # trained on the CPU
    write_state(tmp_path / "cpu.pt", state)
    write_state(tmp_path / "gpu.pt", {**state, "rng": {
        **state["rng"], "sampler": torch.zeros(16, dtype=torch.uint8),
        "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}})
    resumed = fit(cfg, data, resume=read_state(tmp_path / "cpu.pt"))
    assert repr(resumed.train_points) == repr(straight.train_points)
    first = fit(cfg, data, resume=read_state(tmp_path / "gpu.pt"))
    again = fit(cfg, data, resume=read_state(tmp_path / "gpu.pt"))
    assert first.resumed_at == 5 and first.iterations_run == 12
    assert repr(first.train_points) == repr(again.train_points)


# ------------------------------------------------------------------------- real workers

ITERATION = 600  # 4-8 s per trial here: long enough to be stopped in the middle


def one_config_spec(folder, name: str, **budget):
    """One fixed configuration (nothing left to chance but the RNGs), no pruning."""
    return write_spec(folder, name, budget={"iteration": ITERATION, "eval_every": 50, **budget},
                      pruner="none", sampler="random",
                      space={"batch": [8], "lr": [5.0e-3], "embedding_dim": [8],
                             "embedding_num": [16]})


def straight_value(folder, uri: str, storage: str) -> float:
    """The final val MSE of the same trial run once, uninterrupted, in a study of its own."""
    spec = one_config_spec(folder, "straight")
    worker = Worker(["--trials", "1", "--config", str(spec), "--storage", storage,
                     "--tracking-uri", uri], folder / "straight", "straight")
    assert worker.wait(180) == 0, worker.output()
    (trial,) = study_trials(storage, "straight")
    return trial.value


def check_resumed(uri: str, storage: str, study: str, expected: float) -> tuple:
    """One finished trial, a retry of the FAIL one that resumed from its checkpoint, with the
    uninterrupted value; its run's curves whole and without a repeated step; one table row; no
    checkpoint left once the retry is COMPLETE."""
    from mlflow.tracking import MlflowClient

    trials = study_trials(storage, study)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], states(trials)
    first, retry = trials
    assert retried_from(retry) == first.number
    assert retry.value == pytest.approx(expected, rel=1e-6, abs=0)
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in mlflow_runs(uri, study)}
    run = runs[retry.number]
    assert run.data.tags["vqlog.retry_of"] == str(first.number)
    resumed_at = int(run.data.tags["vqlog.resumed_at"])
    assert 50 <= resumed_at < ITERATION
    client = MlflowClient(tracking_uri=uri)
    for key, every in (("train/loss", 4), ("val/mse", 50)):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(every, ITERATION + 1, every)), key  # whole, once each
    # Nothing resumes a COMPLETE trial, nor one whose retry is over: no checkpoint is kept.
    assert not has_checkpoint(uri, study)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    return first, retry, resumed_at


@pytest.mark.slow
def test_a_killed_trial_resumes_from_its_checkpoint_on_the_sqlite_default(tmp_path, cli):
    """SIGKILL at a random moment after the first checkpoint, then the same command again, in
    the same folder, on the embedded defaults (./optuna.db, ./mlflow.db, ./mlartifacts)."""
    spec = one_config_spec(tmp_path, "resume")
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    args = ["--trials", "1", "--config", str(spec)]
    # A grace period that the rerun's start-up (3 to 8 s on a loaded machine, more beside a
    # test of several workers) stays well inside: it finds the dead worker's trial still
    # RUNNING, says it waits, then fails and retries it.
    beats = {**FAST_HEARTBEAT, "VQLOG_HEARTBEAT_GRACE": "30"}
    worker = Worker(args, tmp_path, "first", env=beats)
    try:
        wait_until(lambda: has_checkpoint(uri, "resume"), 120, "a checkpoint", alive=[worker])
        time.sleep(rng("kill").uniform(0.0, 2.0))
        worker.signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        worker.kill()
    rerun = Worker(args, tmp_path, "rerun", env=beats)
    assert rerun.wait(180) == 0, rerun.output()
    assert ("waiting: 1 trial still RUNNING covers the target (a killed worker's trial is failed "
            "and retried once its heartbeat is 30 s old)") in rerun.stdout, rerun.output()
    expected = straight_value(tmp_path, uri, f"sqlite:///{tmp_path}/straight.db")
    _, retry, resumed_at = check_resumed(uri, storage, "resume", expected)
    # the trial's line; its seconds are those of the run it resumed too, as its iterations are
    assert re.search(rf"it, resumed @ {resumed_at}, \d+ s in all\)", rerun.stdout), rerun.output()
    code, out, err = cli("table", "--study", "resume", "--tracking-uri", uri, "--out", "-")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| Seq")]
    assert len(rows) == 1 and rows[0].startswith(f"| Seq{retry.number + 1} ★ |"), out
    assert f"resumed @ {resumed_at}; " in rows[0]


@pytest.mark.slow
def test_sigterm_checkpoints_the_trial_and_exits_143_and_the_rerun_resumes(tmp_path,
                                                                            mlflow_store):
    spec = one_config_spec(tmp_path, "preempted")
    uri, storage = mlflow_store(), f"sqlite:///{tmp_path}/optuna.db"
    args = ["--trials", "1", "--config", str(spec), "--storage", storage, "--tracking-uri", uri]
    worker = Worker(args, tmp_path, "first")
    try:
        wait_until(lambda: has_checkpoint(uri, "preempted"), 120, "a checkpoint", alive=[worker])
        time.sleep(rng("term").uniform(0.0, 2.0))
        worker.preempt()
    finally:
        worker.kill()
    (first, queued) = study_trials(storage, "preempted")
    assert first.state.name == "FAIL" and queued.state.name == "WAITING"
    assert first.user_attrs["fail_reason"] == "stopped (SIGTERM); resumes on rerun"
    (run,) = mlflow_runs(uri, "preempted")
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
    assert "Stopped (SIGTERM): the running trial was checkpointed at iteration" in worker.stdout
    assert "Traceback" not in worker.stderr
    # no Ctrl-C where a scheduler sent the signal (and a second SIGTERM is no faster)
    assert "SIGTERM: stopping after a checkpoint of the running trial\n" in worker.stderr
    assert "Ctrl-C" not in worker.stderr
    stopped_at = int(re.search(r"checkpointed at iteration (\d+)", worker.stdout).group(1))
    # the table's iteration cell says what ran (it said the budget, ITERATION)
    assert run.data.metrics["iterations_run"] == stopped_at < ITERATION

    rerun = Worker(args, tmp_path, "rerun")  # no grace period to wait: the retry is queued
    assert rerun.wait(180) == 0, rerun.output()
    # its first line after the study's says so (with no trial finished, it said nothing)
    assert rerun.stdout.splitlines()[1] == ("resuming: 0 of 1 trials finished; 1 cut-off trial "
                                            "is queued again, to go on from its last checkpoint "
                                            "if it has one"), rerun.output()
    expected = straight_value(tmp_path, uri, f"sqlite:///{tmp_path}/straight.db")
    check_resumed(uri, storage, "preempted", expected)


@pytest.mark.slow
def test_a_retry_on_another_host_resumes_through_the_tracking_server(tmp_path, pg_storage,
                                                                     mlflow_server):
    """Two workers in separate folders (no file of one is visible to the other), one study on
    PostgreSQL and one `mlflow server` with proxied artifacts: the second worker finds the
    checkpoint the first wrote through the server and resumes from it."""
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    host_a.mkdir()
    host_b.mkdir()
    spec_a, spec_b = one_config_spec(host_a, "hosts"), one_config_spec(host_b, "hosts")
    with mlflow_server(tmp_path / "server") as server:
        common = ["--trials", "1", "--storage", pg_storage, "--tracking-uri", server.url]
        first = Worker([*common, "--config", str(spec_a)], host_a, "a", env=FAST_HEARTBEAT)
        try:
            wait_until(lambda: has_checkpoint(server.url, "hosts"), 120, "a checkpoint",
                       alive=[first])
            time.sleep(rng("host").uniform(0.0, 2.0))
            first.signal(signal.SIGKILL)
            first.wait(30)
        finally:
            first.kill()
        time.sleep(3.5)
        second = Worker([*common, "--config", str(spec_b)], host_b, "b", env=FAST_HEARTBEAT)
        assert second.wait(180) == 0, second.output()
        expected = straight_value(tmp_path, server.url, f"sqlite:///{tmp_path}/straight.db")
        check_resumed(server.url, pg_storage, "hosts", expected)
    assert not list(host_a.rglob("*.pt")) and not list(host_b.rglob("*.pt"))  # all on the server
    assert "Seq2    COMPLETE" in second.stdout


def test_an_unreadable_checkpoint_in_a_retry_chain_is_passed_over_for_a_readable_one(tiny,
                                                                                      tmp_path):
    """The latest checkpoint cut short (a kill during its upload): the retry started over from
    iteration 0, though the trial before it had left a good one. Only where none can be read
    does the retry start over, with a warning that names the run's artifact, not a temporary
    file."""
    from mlflow.tracking import MlflowClient

    from vqlog.tracking.artifacts import CHECKPOINT, latest_checkpoint

    cfg = tiny()
    saved = []
    fit(cfg, prepare("synthetic", cfg), checkpoint_every=5, on_checkpoint=saved.append)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("chain", artifact_location=(tmp_path / "artifacts").as_uri())
    for number, write in ((0, lambda p: write_state(p, saved[0])),
                          (1, lambda p: p.write_bytes(b"PK\x03\x04 cut short"))):
        run = client.create_run(exp, tags={"vqlog.role": "trial",
                                           "optuna.trial_number": str(number)})
        folder = tmp_path / f"up{number}" / "checkpoint"
        folder.mkdir(parents=True)
        write(folder / "latest.pt")
        client.log_artifact(run.info.run_id, str(folder / "latest.pt"), "checkpoint")
    state = latest_checkpoint(client, exp, [1, 0])  # the retry's history, the latest first
    assert state is not None and state["step"] == saved[0]["step"]
    with pytest.raises(UserError, match=rf"^Seq2's {CHECKPOINT} is not a vqlog training state"):
        latest_checkpoint(client, exp, [1])
