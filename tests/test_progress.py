"""A sweep's trial line reads any objective value: a diverging trial's 3e9 printed as
`2957148160.0000`, and a value under 5e-5 as `0.0000`, the same as a perfect one."""

import optuna
import pytest
from optuna.trial import TrialState

from vqlog.study.progress import TrialProgress, best_text


def finished(number: int, mse: float) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=mse,
        user_attrs={"final_val_mse": mse, "iterations_run": 300, "train_seconds": 21.0})
    trial.number = number
    return trial


@pytest.mark.parametrize("mse, shown", [
    (0.0412, "0.0412"), (0.041234, "0.04123"), (2957148160.0, "2.957e+09"), (2.5e-5, "2.5e-05")])
def test_a_trial_line_shows_four_significant_digits(mse, shown):
    lines = []
    progress = TrialProgress(total=3, out=lines.append, bar=False)
    trial = finished(6, mse)
    progress.trial_line(best_text(trial), trial)
    assert lines == [f"Seq7    COMPLETE  val mse {shown}  (300 it, 21 s)  | best {shown} (Seq7)"]


@pytest.mark.parametrize("finished_, retries, running, said", [
    (0, 0, 2, []),  # workers started together on a new study: nothing was cut off
    (0, 0, 0, []),
    (3, 0, 0, ["resuming: 3 of 5 trials finished"]),
    (3, 0, 2, ["resuming: 3 of 5 trials finished; 2 trials are RUNNING: another worker's, or "
               "ones cut off by a kill, which are queued again once their heartbeat is 20 s old"]),
    (0, 1, 1, ["resuming: 0 of 5 trials finished; 1 cut-off trial is queued again, to go on "
               "from its last checkpoint if it has one; 1 trial is RUNNING: another worker's, "
               "or one cut off by a kill, which is queued again once its heartbeat is 20 s old"]),
])
def test_the_resuming_line_counts_what_the_study_holds(finished_, retries, running, said,
                                                       monkeypatch):
    monkeypatch.delenv("VQLOG_HEARTBEAT_GRACE", raising=False)
    lines = []
    TrialProgress(total=5, out=lines.append, bar=False).resumed(finished_, retries, running)
    assert lines == said


def test_a_resumed_trials_seconds_are_those_of_all_its_runs():
    lines = []
    trial = finished(2, 0.05)
    trial.user_attrs["resumed_at"] = 205
    TrialProgress(total=3, out=lines.append, bar=False).trial_line("", trial)
    assert lines == ["Seq3    COMPLETE  val mse 0.05  (300 it, resumed @ 205, 21 s in all)"]
