"""Invariants of the oscillation score and its labels, on hand-made loss curves."""

import math

import numpy as np
import pytest

from vqlog.errors import UserError
from vqlog.oscillation import (
    LABELS,
    THRESHOLDS,
    band,
    early_oscillation_score,
    label_key,
    oscillation_label,
    oscillation_score,
    rise_score,
)

N = 500  # points: 5000 iterations at log_every=10
T = np.arange(N)
DECAY = 0.02 + np.exp(-T / 80)  # a typical loss: steep drop, then a slow tail to a floor


def uniform_noise(p, seed=0, trend=DECAY):
    """The curve times (1 + u), u uniform in ±p."""
    return trend * (1 + np.random.default_rng(seed).uniform(-p, p, trend.size))


def gaussian_noise(p, seed=0, trend=DECAY):
    """The curve times (1 + p·z), z standard normal."""
    return trend * (1 + p * np.random.default_rng(seed).standard_normal(trend.size))


def sawtooth(swing=0.3, period=10, trend=DECAY):
    """The loss climbs by `swing` over `period` points, then drops back."""
    t = np.arange(trend.size)
    return trend * (1 + swing * (t % period) / (period - 1))


@pytest.mark.parametrize("curve", [
    DECAY,
    np.exp(-T / 80),                   # pure exponential: a straight line in log
    1 / (1 + T / 5) ** 0.7,            # power law
    np.linspace(5.0, 1.0, 50),         # linear ramp
    np.full(30, 0.3),                  # flat
    np.linspace(1.0, 2.0, 40),         # monotone rise: no up-and-down either
], ids=["decay", "exp", "power", "ramp", "flat", "rise"])
def test_smooth_monotone_curve_scores_zero_and_stable(curve):
    assert oscillation_score(curve) == 0.0
    assert oscillation_label(oscillation_score(curve)) == "stable"


@pytest.mark.parametrize("curve, rising", [
    (DECAY, False),
    (uniform_noise(0.2), False),
    (np.full(30, 0.3), False),                           # flat: neither
    (np.linspace(1.0, 2.0, 40), True),                   # the monotone rise above: not "stable"
    (np.geomspace(4.4e8, 1.06e14, 8), True),             # a diverging run (lr 30), pruned early
    (np.concatenate([DECAY, DECAY[-1] * np.geomspace(1, 400, 200)]), True),  # falls, then blows up
    (uniform_noise(0.05, trend=np.linspace(1.0, 1.5, 100)), True),  # rising under the noise
    (DECAY * np.linspace(1, 0.999, N), False),
])
def test_a_loss_that_ends_above_where_it_began_is_labelled_rising(curve, rising):
    """A rising curve scored 0 and read "stable" in the table (a diverging lr-30 trial did)."""
    label = oscillation_label(oscillation_score(curve), early_oscillation_score(curve),
                              rise=rise_score(curve))
    assert label.startswith("loss rising") == rising, label
    assert (rise_score(curve) > 0) == rising


@pytest.mark.parametrize("score, rise, en, zh", [
    (0.0, 0.5, "loss rising", "损失上升"),
    (0.08, 0.5, "loss rising, severe oscillation", "损失上升，震荡严重"),
    (0.03, math.log(1.1), "mild oscillation", "轻微震荡"),   # the threshold itself: not rising
    (0.03, math.nan, "mild oscillation", "轻微震荡"),
    (math.nan, 0.5, "loss rising", "损失上升"),
])
def test_rising_goes_before_the_band_in_both_languages(score, rise, en, zh):
    assert oscillation_label(score, rise=rise) == en
    assert oscillation_label(score, lang="zh", rise=rise) == zh


def test_rise_needs_a_positive_curve_of_enough_points():
    assert math.isnan(rise_score([1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(rise_score([1.0, -2.0, 3.0, 4.0, 5.0]))
    assert rise_score([1.0, 2.0, 3.0, 4.0, 8.0]) == pytest.approx(math.log(8.0))


def test_smooth_non_monotone_curve_stays_far_below_stable():
    """Decay, then a slow rise (e.g. a late lr bump): the local quadratic follows it."""
    curve = DECAY + 0.05 * np.exp(-((T - 400) / 60.0) ** 2)
    assert 0.0 < oscillation_score(curve) < THRESHOLDS["stable"] / 10


def test_trend_is_exact_on_a_log_parabola():
    """Down, then up: not monotone, but the local quadratic trend fits it exactly."""
    curve = np.exp((np.arange(200) - 120) ** 2 / 4000.0)
    assert oscillation_score(curve) < 1e-12


@pytest.mark.parametrize("c", [1e-4, 0.5, 7.5, 1e6])
def test_scale_invariant(c):
    curve = gaussian_noise(0.05)
    assert oscillation_score(c * curve) == pytest.approx(oscillation_score(curve), rel=1e-9)


def test_more_noise_scores_higher():
    scores = [oscillation_score(gaussian_noise(p, seed=3)) for p in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)


def test_bigger_sawtooth_scores_higher():
    scores = [oscillation_score(sawtooth(swing)) for swing in (0.05, 0.1, 0.3, 0.6)]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)


@pytest.mark.parametrize("curve, expected", [
    (uniform_noise(0.01), "stable"),
    (gaussian_noise(0.01), "stable"),
    (uniform_noise(0.05), "mild"),
    (gaussian_noise(0.05), "mild"),
    (uniform_noise(0.20), "severe"),
    (gaussian_noise(0.20), "severe"),
    (sawtooth(0.3), "severe"),
    (sawtooth(0.3, trend=DECAY[:50]), "severe"),          # a short run
    (uniform_noise(0.05, trend=0.02 + np.exp(-np.arange(1000) / 160)), "mild"),  # a long run
], ids=["u1%", "g1%", "u5%", "g5%", "u20%", "g20%", "saw30%", "saw30%-50pts", "u5%-1000pts"])
def test_calibrated_curves_land_in_their_bands(curve, expected):
    assert band(oscillation_score(curve)) == expected


@pytest.mark.parametrize("seed", range(5))
def test_calibration_holds_across_seeds(seed):
    assert band(oscillation_score(gaussian_noise(0.01, seed))) == "stable"
    assert band(oscillation_score(gaussian_noise(0.05, seed))) == "mild"
    assert band(oscillation_score(uniform_noise(0.20, seed))) == "severe"


@pytest.mark.parametrize("curve", [[], [1.0], [1.0, 2.0, 1.0, 2.0]])
def test_fewer_than_five_points_is_nan_with_no_label(curve):
    assert math.isnan(oscillation_score(curve))
    assert oscillation_label(oscillation_score(curve)) == ""


def test_five_points_are_enough():
    assert oscillation_score([1.0, 1.2, 0.9, 1.1, 0.8]) > 0


def test_nan_and_inf_points_are_dropped():
    curve = list(gaussian_noise(0.05)[:200])
    assert oscillation_score(curve + [math.nan, math.inf]) == oscillation_score(curve)
    assert math.isnan(oscillation_score([1.0, math.nan, 0.5, math.inf, 0.2, -math.inf]))


def test_non_positive_values_are_scored_linearly_and_scale_free():
    curve = np.array([0.0, 0.5, -0.2, 0.4, -0.1, 0.3, 0.0, 0.2])
    score = oscillation_score(curve)
    assert math.isfinite(score) and score > 0
    assert oscillation_score(3.0 * curve) == pytest.approx(score, rel=1e-12)
    assert oscillation_score(np.zeros(10)) == 0.0


def test_window_must_be_odd_and_at_least_five():
    with pytest.raises(ValueError, match="odd"):
        oscillation_score(DECAY, window=20)
    with pytest.raises(ValueError, match="odd"):
        oscillation_score(DECAY, window=3)


def test_early_score_is_the_score_of_the_first_third():
    curve = list(gaussian_noise(0.05))
    assert early_oscillation_score(curve) == oscillation_score(curve[: len(curve) // 3])


@pytest.mark.parametrize("score, early, key", [
    (0.005, None, "stable"),
    (0.03, None, "mild"),
    (0.08, None, "severe"),
    (0.005, 0.02, "early_then_stable"),   # early mild, >= 2x: oscillation settled
    (0.03, 0.08, "early_improved"),       # the log's Seq3
    (0.03, 0.04, "mild"),                 # same band: nothing to say about the early part
    (0.009, 0.011, "stable"),             # worse band but not much higher: no claim
    (0.03, 0.005, "mild_later"),
    (0.08, 0.03, "severe_later"),
    (0.08, 0.09, "severe"),
    (0.03, math.nan, "mild"),             # early part too short to judge
    (math.nan, 0.08, None),
])
def test_label_key(score, early, key):
    assert label_key(score, early) == key


@pytest.mark.parametrize("score, early, en, zh", [
    (0.005, None, "stable", "平稳"),
    (0.03, None, "mild oscillation", "轻微震荡"),
    (0.08, None, "severe oscillation", "震荡严重"),
    (0.005, 0.02, "early oscillation, later stable", "前期震荡，后期平稳"),
    (0.03, 0.08, "early oscillation clearly improved", "前期震荡明显改善"),
    (0.03, 0.005, "mild oscillation, worse later", "轻微震荡，后期加剧"),
    (0.08, 0.03, "severe oscillation, worse later", "震荡严重，后期加剧"),
])
def test_labels_in_both_languages(score, early, en, zh):
    assert oscillation_label(score, early) == en
    assert oscillation_label(score, early, lang="zh") == zh


def test_band_edges_follow_thresholds():
    assert band(THRESHOLDS["stable"] - 1e-12) == "stable"
    assert band(THRESHOLDS["stable"]) == "mild"
    assert band(THRESHOLDS["mild"]) == "severe"


def test_every_label_has_both_languages():
    assert all(set(words) == {"en", "zh"} for words in LABELS.values())


def test_unknown_language_is_a_user_error():
    with pytest.raises(UserError, match="unknown language 'fr': choose one of en, zh"):
        oscillation_label(0.01, lang="fr")
