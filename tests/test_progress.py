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
