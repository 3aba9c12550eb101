"""train.fit on the real synthetic source with a tiny model: schedule of evaluations, determinism,
early stopping, divergence, optimizer groups, learning-rate shape and the summary contract."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from vqlog.data import Splits, prepare
from vqlog.errors import DivergedError, UserError
from vqlog.model.s4d import ssm_parameters
from vqlog.model.vqvae import VQVAE
from vqlog.oscillation import oscillation_score
from vqlog import metrics
from vqlog.train import SSM_MAX_LR, TrainingRun, build_optimizer, fit, lr_factor, train_step

# The summary metrics of the MLflow contract (README, "MLflow layout") plus the ones the CLI and table read.
SUMMARY_KEYS = {"best_val_mse", "final_val_mse", "max_val_perplexity", "max_val_perplexity_step",
                "final_val_perplexity", "loss_oscillation", "early_loss_oscillation", "loss_rise",
                "iterations_run", "train_seconds"}

@pytest.fixture(scope="module")
def data(tiny) -> Splits:
    """Windows of the synthetic source (~900 train / 112 valid at window 32)."""
    return prepare("synthetic", tiny())


# --------------------------------------------------------------------------- the loop


def test_evaluates_every_eval_every_steps_and_at_the_end(data, tiny):
    result = fit(tiny(), data)
    assert [e.step for e in result.evals] == [5, 10, 12]
    assert [p.step for p in result.train_points] == [4, 8, 12]
    # each evaluation carries the train points logged since the previous one
    assert [[p.step for p in e.train_points] for e in result.evals] == [[4], [8], [12]]
    assert result.iterations_run == 12 and not result.stopped_early
    assert result.seconds > 0 and isinstance(result.model, VQVAE)
    for e in result.evals:
        assert math.isfinite(e.val_mse) and e.val_mse > 0
        assert 1 <= e.val_perplexity <= 16
        assert e.val_usage == pytest.approx(1 - e.val_dead_codes / 16)


def test_train_point_averages_the_steps_since_the_last_one(data, tiny):
    """log_every changes what is logged, not the training: its points are the means of the
    per-step points of log_every=1, and progress sees every step, with a point at logged ones."""
    every_step = fit(tiny(iteration=6, log_every=1), data).train_points
    seen = []
    result = fit(tiny(iteration=6, log_every=4), data, progress=lambda s, p: seen.append((s, p)))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [p.step for s, p in seen if p is not None] == [4, 6]
    assert [p.step for p in result.train_points] == [4, 6]
    for point, steps in zip(result.train_points, (every_step[:4], every_step[4:])):
        for key in ("loss", "mse", "commitment", "perplexity"):
            assert getattr(point, key) == pytest.approx(np.mean([getattr(p, key) for p in steps]))


def run_curves(cfg, data):
    r = fit(cfg, data)
    return [p.loss for p in r.train_points], [e.val_mse for e in r.evals]


@pytest.mark.parametrize("quantizer", ["vq", "vq_ema", "fsq", "none"])
def test_same_seed_same_run_other_seed_other_run(data, quantizer, tiny):
    cfg = tiny(quantizer=quantizer, iteration=8, eval_every=4)
    a, b = run_curves(cfg, data), run_curves(cfg, data)
    assert a == b  # exactly: same init, same batches, same k-means
    c = run_curves(dataclasses.replace(cfg, seed=1), data)
    assert c[0] != a[0] and c[1] != a[1]


@pytest.mark.parametrize("stop_at", [1, 2])
def test_on_eval_returning_true_stops_early(data, stop_at, tiny):
    seen = []

    def on_eval(record):
        seen.append(record.step)
        return len(seen) == stop_at

    result = fit(tiny(), data, on_eval=on_eval)
    assert result.stopped_early
    assert seen == [5, 10][:stop_at]
    assert result.iterations_run == 5 * stop_at == result.evals[-1].step
    assert len(result.evals) == stop_at
    assert result.summary()["iterations_run"] == 5 * stop_at


def test_on_eval_returning_none_runs_to_the_end(data, tiny):
    result = fit(tiny(), data, on_eval=lambda r: None)
    assert not result.stopped_early and result.iterations_run == 12


def test_huge_inputs_diverge_at_the_first_iteration(data, tiny):
    huge = Splits(data.train * 1e30, data.valid, data.test, data.sample_rate, data.info)
    with pytest.raises(DivergedError, match="iteration 1") as exc:
        fit(tiny(), huge)
    assert exc.value.iteration == 1
    assert not isinstance(exc.value, UserError)  # a failed trial, not bad input


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_absurd_lr_diverges_with_the_iteration(data, grad_clip, tiny):
    with pytest.raises(DivergedError, match=r"(nan|inf) at iteration \d+") as exc:
        fit(tiny(lr=1e6, warmup=0, grad_clip=grad_clip, iteration=20), data)
    assert 1 < exc.value.iteration <= 20
    assert f"iteration {exc.value.iteration}" in str(exc.value)


def unchecked_steps_that_diverge(data, cfg, steps: int, nan_from: int) -> TrainingRun:
    """`steps` steps as fit makes them on a GPU (no per-step check), the weights NaN from step
    `nan_from` on, as a step that diverged would leave them."""
    run = TrainingRun(cfg, torch.device("cpu"))
    x = torch.as_tensor(data.train[: cfg.batch])
    for step in range(1, steps + 1):
        if step == nan_from:
            with torch.no_grad():
                run.model.encoder.in_proj.weight.fill_(float("nan"))
        out, mse, loss = train_step(run.model, run.opt, x, cfg.grad_clip, step, check=False)
        run.accumulate(out, mse, loss, step)
    return run


@pytest.mark.parametrize("quantizer", ["vq", "vq_ema", "fsq"])
def test_an_unchecked_divergence_is_caught_at_the_next_train_point(data, quantizer, tiny):
    # The NaN goes on through the weights, the codebook included, for the rest of the logged
    # steps: nothing may fail on the way (a NaN code's index out of range, an FSQ index below 0)
    # before log_point's one host sync names the first bad iteration.
    run = unchecked_steps_that_diverge(data, tiny(quantizer=quantizer, log_every=6), 6, 3)
    with pytest.raises(DivergedError, match="at iteration 3"):
        run.log_point(6)


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_an_evaluation_between_train_points_names_the_divergence(data, quantizer, tiny):
    run = unchecked_steps_that_diverge(data, tiny(quantizer=quantizer, log_every=10), 4, 2)
    with pytest.raises(DivergedError, match="iteration 2") as exc:
        run.evaluation(4, torch.as_tensor(data.valid))
    assert exc.value.iteration == 2


def test_train_perplexity_counts_every_code_of_the_steps(data, tiny):
    cfg = tiny(quantizer="vq", log_every=2)
    run = TrainingRun(cfg, torch.device("cpu"))
    expected = []
    for step in (1, 2):
        x = torch.as_tensor(data.train[step * cfg.batch:(step + 1) * cfg.batch])
        out, mse, loss = train_step(run.model, run.opt, x, cfg.grad_clip, step)
        run.accumulate(out, mse, loss, step)
        expected.append(metrics.perplexity(metrics.code_histogram(out.quant.indices,
                                                                  run.model.codebook_size)))
    assert run.log_point(2).perplexity == pytest.approx(sum(expected) / 2, rel=1e-12)


def test_grad_clip_zero_means_no_clipping(data, tiny):
    """Clipping to norm 0 would zero every gradient; with no weight decay nothing would move."""
    cfg = tiny(grad_clip=0.0, weight_decay=0.0, iteration=3, quantizer="none")
    torch.manual_seed(cfg.seed)
    before = VQVAE(cfg).encoder.in_proj.weight.detach().clone()  # fit builds the same init
    after = fit(cfg, data).model.encoder.in_proj.weight.detach()
    assert not torch.equal(before, after)


def test_wrong_window_is_a_user_error(data, tiny):
    with pytest.raises(UserError, match="window is 64"):
        fit(tiny(window=64), data)


def test_learns_on_synthetic_pulses(data, tiny):
    cfg = tiny(iteration=150, eval_every=25, log_every=10, warmup=10, quantizer="vq")
    result = fit(cfg, data)
    first, final = result.evals[0].val_mse, result.final_val_mse
    assert final < 0.6 * first, [e.val_mse for e in result.evals]
    assert result.best_val_mse <= final


# --------------------------------------------------------------------------- optimizer and schedule


@pytest.mark.parametrize("lr", [1e-4, 1e-3, 5e-3])
@pytest.mark.parametrize("quantizer", ["vq", "vq_ema", "fsq", "none"])
def test_ssm_parameters_have_their_own_group(lr, quantizer, tiny):
    model = VQVAE(tiny(quantizer=quantizer, n_layers=2))
    opt = build_optimizer(model, tiny(lr=lr, weight_decay=0.1))
    ssm = {id(p) for p in ssm_parameters(model)}
    assert len(ssm) == 3 * 4  # log_dt, log_A_real, A_imag in 2 encoder + 2 decoder layers
    ssm_groups = [g for g in opt.param_groups if {id(p) for p in g["params"]} & ssm]
    assert len(ssm_groups) == 1
    group = ssm_groups[0]
    assert {id(p) for p in group["params"]} == ssm
    assert group["lr"] == min(lr, SSM_MAX_LR) <= 1e-3 and group["weight_decay"] == 0
    # every trainable parameter in exactly one group; the others train at the config's lr
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all(g["lr"] == lr for g in opt.param_groups if g is not group)


def test_weight_decay_only_on_matrices(tiny):
    """Conv weights and S4D's C (as in state-spaces/s4) decay; biases, norms, D and the codebook don't."""
    model = VQVAE(tiny(quantizer="vq"))
    opt = build_optimizer(model, tiny(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups if g["weight_decay"] > 0)
    names = sorted(n for n, p in model.named_parameters() if id(p) in decayed)
    assert names and all(n.endswith((".weight", ".C")) and "norm" not in n for n in names)
    assert "encoder.in_proj.weight" in names and "decoder.blocks.0.s4d.kernel.C" in names
    assert id(model.quantizer.codebook) not in decayed
    assert all(p.ndim >= 2 for p in model.parameters() if id(p) in decayed)


@pytest.mark.parametrize("warmup, iteration", [(10, 100), (1, 50), (0, 40), (30, 20)])
def test_lr_factor_warms_up_linearly_then_follows_a_cosine(warmup, iteration, tiny):
    cfg = tiny(warmup=warmup, iteration=iteration)
    f = [lr_factor(s, cfg) for s in range(iteration + 1)]
    assert all(0 <= x <= 1 for x in f)
    for s in range(min(warmup, iteration)):
        assert f[s] == pytest.approx((s + 1) / warmup)
    if warmup < iteration:
        assert f[warmup] == pytest.approx(1.0)  # peak right after the warm-up
        assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # then never rises
        mid = warmup + (iteration - warmup) / 2
        if mid == int(mid):
            assert f[int(mid)] == pytest.approx(0.5)  # cosine: half way down at half way
        assert f[iteration] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- summary


def test_on_start_marks_where_the_training_time_begins(data, tiny):
    """`vqlog train` timed its evaluation lines from before the model was built, and its summary
    from the first step (`10 s` on the last line, then `time 8.7 s`). `on_start` comes once,
    after the model is built and before the first step, where `seconds` starts counting."""
    import time

    events = []
    result = fit(tiny(iteration=6, eval_every=3), data,
                 on_start=lambda: events.append(("start", time.perf_counter())),
                 progress=lambda step, point: events.append((step, None)))
    ended = time.perf_counter()
    assert [e for e, _ in events] == ["start", 1, 2, 3, 4, 5, 6]
    assert 0 < result.seconds <= ended - events[0][1]


@pytest.mark.parametrize("quantizer", ["vq", "none"])
def test_summary_has_the_contract_keys_and_consistent_values(data, quantizer, tiny):
    result = fit(tiny(quantizer=quantizer, iteration=20, log_every=2), data)
    s = result.summary()
    assert SUMMARY_KEYS <= set(s)
    assert all(isinstance(v, float) for v in s.values())
    vals = [e.val_mse for e in result.evals]
    assert s["best_val_mse"] == min(vals) and s["final_val_mse"] == vals[-1]
    assert s["iterations_run"] == 20.0 and s["train_seconds"] == result.seconds > 0
    losses = [p.loss for p in result.train_points]
    assert s["loss_oscillation"] == pytest.approx(oscillation_score(losses), nan_ok=True)
    assert math.isfinite(s["loss_oscillation"])  # 10 points: enough to judge
    if quantizer == "none":
        for key in ("max_val_perplexity", "max_val_perplexity_step", "final_val_perplexity"):
            assert math.isnan(s[key]), key
    else:
        ppl = [e.val_perplexity for e in result.evals]
        assert s["max_val_perplexity"] == max(ppl) and s["final_val_perplexity"] == ppl[-1]
        peak = result.evals[ppl.index(max(ppl))]
        assert s["max_val_perplexity_step"] == float(peak.step)


def test_summary_of_no_evaluations_is_nan(tiny):
    from vqlog.train import FitResult

    s = FitResult(config=tiny()).summary()
    assert SUMMARY_KEYS <= set(s)
    for key in ("best_val_mse", "final_val_mse", "max_val_perplexity", "max_val_perplexity_step",
                "final_val_perplexity", "loss_oscillation"):
        assert math.isnan(s[key]), key
    assert s["iterations_run"] == 0.0


@pytest.mark.parametrize("device", ["cuda:²", "cuda:x", "cpu:0", "gpu"])
def test_a_device_that_is_not_one_is_a_user_error(device):
    """`cuda:²` passed str.isdigit and failed in int(): ValueError, exit 1."""
    from vqlog.api import placed_gpus
    from vqlog.train import resolve_device

    with pytest.raises(UserError, match=f"--device must be auto, cpu or cuda, got '{device}'"):
        resolve_device(device)
    assert placed_gpus(device, None) is None
