"""The experiment table: exact markdown from hand-built rows, and a round trip through a real MLflow store."""

import re

import pytest

from vqlog.errors import UserError
from vqlog.tracking.rows import TrialRow, fetch_rows, rows_from_runs
from vqlog.tracking.table import LOG_COLUMNS, regenerate, render_table

# The log's Seq1 as logged by MLflow (Config.to_params(), stringified).
SEQ1 = {"batch": "64", "lr": "0.001", "embedding_dim": "512", "embedding_num": "256", "iteration": "10000",
        "BN": "False", "MLP": "relu", "En-De": "s4d-all", "quantizer": "vq", "commitment": "0.25",
        "downsample": "4", "seed": "0"}
LOG_HEADER = "| run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity |"


def row(number, state="COMPLETE", fail_reason=None, metrics=None, **params):
    return TrialRow(number, state, {**SEQ1, **params}, metrics or {}, fail_reason)


ROWS = [
    # out of order on purpose: the table sorts by trial number
    row(1, embedding_num="512", iteration="12000",
        metrics={"final_val_mse": 0.0398, "best_val_mse": 0.0352, "loss_oscillation": 0.07,
                 "early_loss_oscillation": 0.06, "max_val_perplexity": 118.2,
                 "max_val_perplexity_step": 3000, "final_val_perplexity": 95.0, "iterations_run": 12000}),
    row(0, metrics={"final_val_mse": 0.0412, "best_val_mse": 0.0381, "loss_oscillation": 0.08,
                    "max_val_perplexity": 60.4, "max_val_perplexity_step": 2000,
                    "final_val_perplexity": 41.2, "iterations_run": 10000}),
    row(2, "PRUNED", batch="128", BN="True", MLP="linear", iteration="8000", quantizer="vq_ema",
        commitment="0.1", lr="0.00031622776601683794",
        metrics={"final_val_mse": 0.052, "best_val_mse": 0.0301, "loss_oscillation": 0.03,
                 "early_loss_oscillation": 0.08, "max_val_perplexity": 3.2, "max_val_perplexity_step": 500,
                 "final_val_perplexity": 2.14, "iterations_run": 1200}),
    row(3, "FAIL", "diverged: loss is NaN at iteration 420"),
    row(4, "FAIL", "RuntimeError: shape mismatch | got (64, 3)\nwhile decoding"),
    row(5, "RUNNING", metrics={"best_val_mse": 0.001}),
    row(6, quantizer="none", metrics={"final_val_mse": 0.0051, "best_val_mse": 0.0049,
                                      "loss_oscillation": 0.004, "iterations_run": 10000}),
]

EXPECTED_EN = """\
# study-a

## Hyper-parameter tuning (trained on train, evaluated on valid)

| run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity | quantizer | commitment |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| Seq1 | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | 0.0412 (best 0.0381), severe oscillation | max 60.4 @ 2000, final 41.2 | vq | 0.25 |
| Seq2 ★ | 64 | 1e-3 | 512 | 512 | 12000 | no | +relu | s4d-all | 0.0398 (best 0.0352), severe oscillation | max 118 @ 3000, final 95 | vq | 0.25 |
| Seq3 | 128 | 3.2e-4 | 512 | 256 | 1200 | yes | linear | s4d-all | pruned @ 1200; 0.052 (best 0.0301), early oscillation clearly improved | max 3.2 @ 500, final 2.14 | vq_ema | 0.1 |
| Seq4 | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | failed: diverged @ 420 |  | vq | 0.25 |
| Seq5 | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | failed: RuntimeError: shape mismatch \\| got (64, 3) while decoding |  | vq | 0.25 |

## How well S4D itself works (no quantizer)

| run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| Seq7 ★ | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | 0.0051 (best 0.0049), stable | — |

- ★ best of its table by the study's objective: lowest final val MSE among completed trials (a tie goes to the higher perplexity).
- loss: final val MSE (best val MSE), then the train/loss oscillation label (score `loss_oscillation`): \
stable < 0.01 ≤ mild oscillation < 0.05 ≤ severe oscillation; "early …" and "… worse later" compare \
the first third of training with the whole; "loss rising" first: its last fifth ends above 1.1x its \
first fifth (score `loss_rise`).
- perplexity: codebook perplexity on the whole valid set, its maximum @ iteration and the final value.
"""

EXPECTED_ZH = """\
## 超参调整 (based on train，test on valid)

| run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity | quantizer | commitment |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| Seq1 | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | 0.0412（最佳 0.0381），震荡严重 | 最高60.4 (2000轮)，最终41.2 | vq | 0.25 |
| Seq2 ★ | 64 | 1e-3 | 512 | 512 | 12000 | no | +relu | s4d-all | 0.0398（最佳 0.0352），震荡严重 | 最高118 (3000轮)，最终95 | vq | 0.25 |
| Seq3 | 128 | 3.2e-4 | 512 | 256 | 1200 | yes | linear | s4d-all | 提前停止 (1200轮)；0.052（最佳 0.0301），前期震荡明显改善 | 最高3.2 (500轮)，最终2.14 | vq_ema | 0.1 |
| Seq4 | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | 失败：发散 (420轮) |  | vq | 0.25 |
| Seq5 | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | 失败：RuntimeError: shape mismatch \\| got (64, 3) while decoding |  | vq | 0.25 |

## s4d本身的工作效果

| run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| Seq7 ★ | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | 0.0051（最佳 0.0049），平稳 | — |

- ★ 按研究目标本表最佳：已完成试验中最终 val MSE 最低（相同时取 perplexity 较高者）。
- loss：最终 val MSE（最佳 val MSE），再加 train/loss 震荡标签（分数 `loss_oscillation`）：\
平稳 < 0.01 ≤ 轻微震荡 < 0.05 ≤ 震荡严重；“前期…”与“…后期加剧”比较训练前三分之一与全程；前置“损失上升”：最后五分之一高于最初五分之一的 1.1 倍（分数 `loss_rise`）。
- perplexity：整个 valid 集上的 codebook perplexity，最高值 (轮数) 与最终值。
"""


def test_render_en():
    assert render_table(ROWS, title="study-a") == EXPECTED_EN


def test_render_zh():
    assert render_table(ROWS, lang="zh") == EXPECTED_ZH


def body_rows(markdown):
    """The data rows of every table, as lists of cells."""
    lines = [l for l in markdown.splitlines() if l.startswith("| ") and not l.startswith(("| run ", "| --- "))]
    return [[c.strip() for c in l[2:-2].split(" | ")] for l in lines]


def test_only_the_log_params_varying_gives_exactly_the_log_columns():
    rows = [row(0, batch="32", BN="True"), row(1, batch="64", lr="0.0001", MLP="linear")]
    header = [l for l in render_table(rows).splitlines() if l.startswith("| run ")]
    assert header == [LOG_HEADER]
    assert LOG_HEADER == "| " + " | ".join(LOG_COLUMNS) + " |"


def test_extra_columns_follow_config_order_then_unknown_params_by_name():
    rows = [row(0, downsample="2", commitment="0.5", zeta="a", alpha="x"),
            row(1, downsample="8", commitment="0.30000000000000004", zeta="b", alpha="y")]
    markdown = render_table(rows)
    assert LOG_HEADER[:-1] + "| commitment | downsample | alpha | zeta |" in markdown
    assert [r[-4:] for r in body_rows(markdown)] == [["0.5", "2", "x", "a"], ["0.3", "8", "y", "b"]]


def test_a_param_some_rows_lack_or_share_is_a_column_exactly_when_it_varies():
    """Brute force as the oracle: a param is a column when two rows differ in it, a row without
    it counting as a value of its own."""
    import random

    rng = random.Random(5)
    rows = []
    for n in range(60):
        extra = {name: rng.choice(["1", "2"]) for name in ("dropout", "alpha") if rng.random() < 0.8}
        if n % 3:
            extra["zeta"] = "same"
        extra["downsample"] = "4"  # the same in every row: never a column
        rows.append(row(n, **extra))
    for lo, hi in [(0, 60), (0, 2), (1, 2), (3, 4), (0, 1)]:
        part = rows[lo:hi]
        names = {k for r in part for k in r.params} - set(LOG_COLUMNS)
        varying = {k for k in names if len({r.params.get(k) for r in part}) > 1}
        header = next(l for l in render_table(part).splitlines() if l.startswith("| run "))
        assert set(header[2:-2].split(" | ")) - set(LOG_COLUMNS) == varying, (lo, hi)


@pytest.mark.parametrize("lr, shown", [
    ("0.001", "1e-3"), ("0.0001", "1e-4"), ("0.00031622776601683794", "3.2e-4"),
    ("0.0015", "1.5e-3"), ("0.00999", "1e-2"), ("0.002", "2e-3"), ("1e-05", "1e-5"),
])
def test_lr_is_shown_compactly_like_the_log(lr, shown):
    assert body_rows(render_table([row(0, lr=lr)]))[0][2] == shown


def test_best_mark_follows_the_objective_the_lowest_final_val_mse_among_completed_trials():
    """Not the lowest best val MSE (Seq1's 0.001 was passing): the objective is the final one,
    as for the summary, the registered model and `vqlog best`. A tie goes to the higher
    perplexity (the Pareto front of a pareto study), then to the earlier trial."""
    rows = [row(0, metrics={"final_val_mse": 0.02, "best_val_mse": 0.001}),
            row(1, metrics={"final_val_mse": 0.01, "max_val_perplexity": 10.0}),
            row(2, metrics={"final_val_mse": 0.01, "max_val_perplexity": 30.0}),
            row(3, "PRUNED", metrics={"final_val_mse": 0.001}),
            row(4, "COMPLETE", metrics={"final_val_mse": float("nan")}),
            row(5, metrics={"final_val_mse": 0.01, "max_val_perplexity": 30.0})]
    assert [r[0] for r in body_rows(render_table(rows))] == [
        "Seq1", "Seq2", "Seq3 ★", "Seq4", "Seq5", "Seq6"]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_no_completed_trial_means_no_mark_and_no_legend_for_it(lang):
    text = render_table([row(0, "PRUNED", metrics={"best_val_mse": 0.01})], lang=lang)
    assert "★" not in text  # nor the legend's line about a mark no row has
    assert "- loss" in text  # the rest of the legend
    assert "- ★ " in render_table([row(0, metrics={"final_val_mse": 0.01})], lang=lang)


def test_pruned_and_failed_without_numbers():
    rows = [row(0, "PRUNED"), row(1, "FAIL"), row(2, "FAIL", "x" * 200)]
    cells = body_rows(render_table(rows))
    assert [c[5] for c in cells] == ["10000", "10000", "10000"]  # no iterations_run: the param
    assert [c[9:11] for c in cells] == [["pruned", ""], ["failed", ""], ["failed: " + "x" * 79 + "…", ""]]


@pytest.mark.parametrize("reason", [
    "diverged: loss is NaN at iteration 420", "loss became inf at iteration 420",
    "DivergedError: Infinity at iteration 420",
])
def test_nan_inf_reasons_read_diverged(reason):
    assert body_rows(render_table([row(0, "FAIL", reason)]))[0][9] == "failed: diverged @ 420"


def test_nan_reason_without_iteration():
    assert body_rows(render_table([row(0, "FAIL", "NaN in encoder")]))[0][9] == "failed: diverged"


def test_missing_oscillation_score_gives_numbers_only():
    rows = [row(0, metrics={"final_val_mse": 1.234e-5, "best_val_mse": 1e-5})]
    assert body_rows(render_table(rows))[0][9:11] == ["1.23e-5 (best 1e-5)", ""]


def test_pipes_and_newlines_are_escaped_in_every_cell():
    rows = [row(0, **{"En-De": "a|b\nc", "my|param": "1"}), row(1, **{"my|param": "2"})]
    header, _, first, _ = render_table(rows).splitlines()[2:6]
    assert header.endswith("| perplexity | my\\|param |")
    assert "| a\\|b c |" in first
    assert len(re.split(r"(?<!\\)\|", first)) == len(re.split(r"(?<!\\)\|", header)) == 14


def test_running_and_unknown_states_are_left_out():
    rows = [row(0, "RUNNING"), row(1, "WAITING"), row(2)]
    assert [r[0] for r in body_rows(render_table(rows))] == ["Seq3"]


def test_no_finished_trials():
    assert render_table([row(0, "RUNNING")], title="s") == "# s\n\nNo finished trials yet.\n"
    assert render_table([], lang="zh") == "暂无已完成的试验。\n"


def test_only_baseline_rows_give_only_the_second_table():
    markdown = render_table([row(0, quantizer="none")])
    assert "Hyper-parameter tuning" not in markdown
    assert markdown.startswith("## How well S4D itself works (no quantizer)\n\n" + LOG_HEADER)


def test_unknown_language_is_a_user_error():
    with pytest.raises(UserError, match="unknown language 'de'"):
        render_table(ROWS, lang="de")


# --- a real MLflow store ---------------------------------------------------------------------

def _log_trial(client, experiment_id, parent_id, number, state, status, params, metrics,
               start_time, fail_reason=None):
    from mlflow.entities import Metric, Param

    tags = {"vqlog.role": "trial", "mlflow.parentRunId": parent_id, "optuna.study": "s4d-vq",
            "optuna.trial_number": str(number), "optuna.state": state}
    if fail_reason:
        tags["vqlog.fail_reason"] = fail_reason
    run = client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=f"Seq{number + 1}")
    run_id = run.info.run_id
    curve = [Metric("train/loss", 1.0 / (1 + step), 0, step) for step in range(0, 100, 10)]
    client.log_batch(run_id, metrics=curve + [Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, status=status)


@pytest.fixture(scope="module")
def populated_store(tmp_path_factory):
    """A real SQLite-backed MLflow store holding one study: a parent and its trial runs."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.create_experiment("s4d-vq", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"vqlog.role": "study"}, run_name="s4d-vq")
    pid = parent.info.run_id
    done = {"final_val_mse": 0.041, "best_val_mse": 0.038, "loss_oscillation": 0.08,
            "early_loss_oscillation": 0.09, "max_val_perplexity": 118.4, "max_val_perplexity_step": 3000,
            "final_val_perplexity": 95.2, "iterations_run": 10000, "train_seconds": 12.5}
    params = {**SEQ1, "BN": False, "lr": 0.001}  # MLflow stringifies: "False", "0.001"
    _log_trial(client, exp, pid, 0, "COMPLETE", "FINISHED", params, done, 1_000)
    _log_trial(client, exp, pid, 1, "PRUNED", "KILLED", {**params, "embedding_num": 512},
               {**done, "best_val_mse": 0.05, "final_val_mse": 0.06, "iterations_run": 1200}, 2_000)
    # trial 2 logged twice (a retried worker): the later run wins
    _log_trial(client, exp, pid, 2, "FAIL", "FAILED", params, {}, 3_000, "OSError: disk full")
    _log_trial(client, exp, pid, 2, "FAIL", "FAILED", params, {}, 4_000,
               "diverged: loss is NaN at iteration 420")
    _log_trial(client, exp, pid, 3, "COMPLETE", "FINISHED", {**params, "quantizer": "none"},
               {"final_val_mse": 0.0051, "best_val_mse": 0.0049, "loss_oscillation": 0.004,
                "iterations_run": 10000}, 5_000)
    client.create_run(exp, start_time=6_000, run_name="Seq5",
                      tags={"vqlog.role": "trial", "mlflow.parentRunId": pid,
                            "optuna.trial_number": "4", "optuna.state": "RUNNING"})
    client.set_terminated(pid, status="FINISHED")
    return client


def test_rows_from_a_real_mlflow_store(populated_store):
    rows = fetch_rows(populated_store, "s4d-vq", page_size=2)  # 6 trial runs: three pages
    assert [(r.number, r.state) for r in rows] == [(0, "COMPLETE"), (1, "PRUNED"), (2, "FAIL"),
                                                   (3, "COMPLETE"), (4, "RUNNING")]
    assert rows[0].params["BN"] == "False" and rows[0].params["lr"] == "0.001"
    assert rows[0].metrics["best_val_mse"] == 0.038
    assert rows[2].fail_reason == "diverged: loss is NaN at iteration 420"


def test_rows_from_runs_skips_the_parent_run(populated_store):
    experiment = populated_store.get_experiment_by_name("s4d-vq")
    runs = populated_store.search_runs([experiment.experiment_id])
    assert len(runs) == 7
    assert [r.number for r in rows_from_runs(runs)] == [0, 1, 2, 3, 4]


def test_regenerate_writes_the_table_from_mlflow(populated_store, tmp_path):
    out = tmp_path / "results" / "s4d-vq.md"
    text = regenerate(populated_store, "s4d-vq", out)
    assert out.read_text(encoding="utf-8") == text
    assert text.startswith("# s4d-vq\n\n## Hyper-parameter tuning (trained on train, evaluated on valid)\n\n"
                           + LOG_HEADER + "\n| --- |")
    assert body_rows(text) == [
        ["Seq1 ★", "64", "1e-3", "512", "256", "10000", "no", "+relu", "s4d-all",
         "0.041 (best 0.038), severe oscillation", "max 118 @ 3000, final 95.2"],
        ["Seq2", "64", "1e-3", "512", "512", "1200", "no", "+relu", "s4d-all",
         "pruned @ 1200; 0.06 (best 0.05), severe oscillation", "max 118 @ 3000, final 95.2"],
        ["Seq3", "64", "1e-3", "512", "256", "10000", "no", "+relu", "s4d-all", "failed: diverged @ 420", ""],
        ["Seq4 ★", "64", "1e-3", "512", "256", "10000", "no", "+relu", "s4d-all",
         "0.0051 (best 0.0049), stable", "—"],
    ]
    assert "## How well S4D itself works (no quantizer)" in text
    zh = regenerate(populated_store, "s4d-vq", out, lang="zh")
    assert "| Seq1 ★ | 64 | 1e-3 | 512 | 256 | 10000 | no | +relu | s4d-all | 0.041（最佳 0.038），震荡严重 |" in zh
    assert out.read_text(encoding="utf-8") == zh


def test_unknown_study_is_a_user_error_naming_it(populated_store):
    with pytest.raises(UserError, match="no MLflow experiment named 'nope' at sqlite:///"):
        fetch_rows(populated_store, "nope")


def test_a_trial_and_its_retries_are_one_row_the_latest_finished():
    """Seq1 stopped, its retry Seq3 stopped again, Seq5 resumed and completed: one row, Seq5's,
    saying where it resumed; a retry still running leaves the last finished one shown."""
    import dataclasses

    done = {"final_val_mse": 0.05, "best_val_mse": 0.04}
    rows = [row(0, "FAIL", "stopped (SIGTERM); resumes on rerun"),
            row(1, metrics=done),
            dataclasses.replace(row(2, "FAIL", "stopped (SIGTERM); resumes on rerun"), retry_of=0,
                                resumed_at=400),
            dataclasses.replace(row(4, metrics=done), retry_of=0, resumed_at=900)]
    cells = body_rows(render_table(rows))
    assert [c[0] for c in cells] == ["Seq2 ★", "Seq5"]
    # the row names the trial it goes on (the log's own Seq1 is no longer a row of its own)
    assert cells[1][9] == "Seq1 resumed @ 900; 0.05 (best 0.04)"
    running = [*rows[:3], dataclasses.replace(row(4, "RUNNING"), retry_of=0)]
    cells = body_rows(render_table(running))
    assert [c[0] for c in cells] == ["Seq2 ★", "Seq3"]
    # a retry stopped again said only "failed: stopped ..."
    assert cells[1][9] == "Seq1 resumed @ 400; failed: stopped (SIGTERM); resumes on rerun"
    zh = body_rows(render_table(rows, lang="zh"))
    assert zh[1][9].startswith("Seq1从900轮继续；")
    # a retry with no checkpoint to go on (killed before its first): it starts over
    fresh = [rows[0], dataclasses.replace(row(2, metrics=done), retry_of=0)]
    assert body_rows(render_table(fresh))[0][9] == "retry of Seq1; 0.05 (best 0.04)"
