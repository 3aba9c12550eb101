"""How much a training-loss curve oscillates: one scale-free score and a verbal label like the log's.

The log judged its `train/loss` curves by eye ("震荡严重", "前期震荡明显改善"); this module
measures the same thing. Pure functions, numpy only.

The score
---------
For a curve x_0 .. x_{n-1} (each point the mean of `log_every` training iterations):

    y_i = log(x_i)                                  (every finite value positive: a loss)
    y_i = x_i / median_j |x_j|                      (otherwise: not a positive loss)
    t_i = a_0 of the least-squares fit  y_{i+u} ~ a_0 + a_1 u + a_2 u^2,  |u| <= k,
          k = min(h, i, n-1-i),  h = window // 2    (a centred Savitzky-Golay trend)
    score = mean over 2 <= i <= n-3 of |y_i - t_i|
    score = 0.0 when y is monotone (no up-and-down at all)

i.e. the mean absolute deviation of the log-loss from its local quadratic trend. On log scale a
deviation is a relative one: 0.05 reads "the loss sits about 5% off its local trend".

Why this form:
- log makes it independent of the loss scale (x -> c*x adds log c to y, which the trend
  absorbs), and an exponential decay is a straight line, which the trend follows exactly.
- A local quadratic follows a steep early decay as well as a flat tail, so noise counts the same
  in both (a moving median hides noise wherever the trend falls faster than the noise swings).
  On smooth but non-monotone curves its curvature residue stays below ~1e-3; a monotone curve is
  by definition not oscillating and scores exactly 0.0.
- The window is fixed in points (default 41 = 410 iterations at log_every=10), not a fraction of
  the curve, so a pruned trial, a full run and the first third of a run are measured on the same
  time scale and can be compared (`early_oscillation_score`). Swings with a period up to about 20
  points count fully; slower waves are taken as trend. The window shrinks symmetrically at the
  ends; the two points at each end (a quadratic through <= 3 points fits exactly) are left out.
- The mean of |residual| counts isolated loss spikes, which a reader of the curve also calls
  oscillation, with a weight linear (not squared) in their size.

A curve that only rises is not oscillating either, but "stable" would misread a diverging run:
`rise_score` = log(median of the last fifth of the points / median of the first fifth) tells it
apart, and a rise above RISE_THRESHOLD puts "loss rising" before the band's label.

Degenerate input: NaN/Inf points are dropped (a diverged tail is a failure, reported as such, not
oscillation). Fewer than `MIN_POINTS` finite points -> NaN ("too short to judge"; its label is "").
A curve with non-positive values is scored linearly, in units of its median absolute value (the
same scale-free reading for small swings); an all-zero curve scores 0.0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from vqlog.errors import UserError

MIN_POINTS = 5  # below this a curve is too short to tell a trend from a swing: score NaN
DEFAULT_WINDOW = 41  # points in the local-quadratic trend (odd): 410 iterations at log_every=10

# Upper bounds (exclusive) of the bands; a score at or above THRESHOLDS["mild"] is "severe".
# Calibrated on hand-made curves (tests/test_oscillation.py): a decay 0.02 + exp(-t/80) over 500
# points times (1 + u), u uniform in ±p, scores about p/2: ±1% -> 0.005, ±5% -> 0.024,
# ±20% -> 0.096; with Gaussian noise of sd p about 0.8 p: 1% -> 0.008, 5% -> 0.040, 20% -> 0.15;
# a sawtooth whose loss climbs 30% over 10 points and drops back -> 0.076 (0.062 on 50 points).
# 0.01 keeps 1% noise of either kind "stable" with margin; 0.05 keeps 5% noise of either kind
# "mild" and puts the 30% sawtooth and 20% noise in "severe". Read as: the loss sits on average
# < 1% off its local trend (stable), 1-5% (mild), >= 5% (severe).
THRESHOLDS: dict[str, float] = {"stable": 0.01, "mild": 0.05}

# "Much higher": the early score (first third) at least this many times the overall score.
# As the overall score averages early and late, early >= 2x overall means early >= 4x late.
EARLY_RATIO = 2.0

# "Loss rising": the last fifth of the curve sits at least 10% above its first fifth (medians). A
# training loss falls far below its start; one that ends above it diverged or is diverging.
RISE_THRESHOLD = math.log(1.1)

# Every label, in the log's two languages. Keys: the band of the overall score, or a band
# combined with how the first third of training compares with the whole.
LABELS: dict[str, dict[str, str]] = {
    "rising": {"en": "loss rising", "zh": "损失上升"},  # before the band's label; see rise_score
    "stable": {"en": "stable", "zh": "平稳"},
    "mild": {"en": "mild oscillation", "zh": "轻微震荡"},
    "severe": {"en": "severe oscillation", "zh": "震荡严重"},
    # overall stable, early third in a worse band and >= EARLY_RATIO x overall
    "early_then_stable": {"en": "early oscillation, later stable", "zh": "前期震荡，后期平稳"},
    # overall mild, early third severe and >= EARLY_RATIO x overall (the log's Seq3)
    "early_improved": {"en": "early oscillation clearly improved", "zh": "前期震荡明显改善"},
    # overall in a worse band than the early third and >= EARLY_RATIO x early: it grew later
    "mild_later": {"en": "mild oscillation, worse later", "zh": "轻微震荡，后期加剧"},
    "severe_later": {"en": "severe oscillation, worse later", "zh": "震荡严重，后期加剧"},
}
LANGS = ("en", "zh")
_RANK = {"stable": 0, "mild": 1, "severe": 2}


def oscillation_score(values: Sequence[float], window: int = DEFAULT_WINDOW) -> float:
    """Mean |log(loss) - local quadratic trend of log(loss)|; see the module docstring.

    0.0 for a smooth monotone curve, unchanged when the curve is multiplied by a positive
    constant, larger for larger swings; NaN for fewer than MIN_POINTS finite points.
    """
    if window < 5 or window % 2 == 0:
        raise ValueError(f"window must be an odd number >= 5, got {window}")
    x = np.asarray(values, dtype=float).ravel()  # (n,)
    x = x[np.isfinite(x)]
    if x.size < MIN_POINTS:
        return math.nan
    if np.all(x > 0):
        y = np.log(x)
    else:
        scale = np.median(np.abs(x)) or np.mean(np.abs(x))
        if scale == 0:
            return 0.0
        y = x / scale
    step = np.diff(y)  # (n-1,)
    if np.all(step <= 0) or np.all(step >= 0):
        return 0.0
    residual = (y - _quadratic_trend(y, window // 2))[2:-2]  # (n-4,) the ends fit exactly
    return float(np.mean(np.abs(residual)))


def rise_score(values: Sequence[float]) -> float:
    """log(median of the last fifth / median of the first fifth) of the finite points: above 0
    when the loss ends higher than it began. NaN for fewer than MIN_POINTS finite points or a
    curve with a value <= 0 (not a loss to take the log of)."""
    x = np.asarray(values, dtype=float).ravel()  # (n,)
    x = x[np.isfinite(x)]
    if x.size < MIN_POINTS or not np.all(x > 0):
        return math.nan
    fifth = max(1, x.size // 5)
    return float(math.log(np.median(x[-fifth:]) / np.median(x[:fifth])))


def early_oscillation_score(values: Sequence[float], window: int = DEFAULT_WINDOW) -> float:
    """The score over the first third of the curve (the contract's `early_loss_oscillation`)."""
    points = list(values)
    return oscillation_score(points[: len(points) // 3], window)


def band(score: float | None) -> str | None:
    """The band of a score by THRESHOLDS: "stable", "mild" or "severe"; None if missing or NaN."""
    if score is None or math.isnan(score):
        return None
    if score < THRESHOLDS["stable"]:
        return "stable"
    if score < THRESHOLDS["mild"]:
        return "mild"
    return "severe"


def label_key(score: float | None, early_score: float | None = None) -> str | None:
    """The LABELS key for an overall score and, optionally, the score of the first third."""
    overall = band(score)
    if overall is None:
        return None
    early = band(early_score)
    if early is None:
        return overall
    if _RANK[early] > _RANK[overall] and early_score >= EARLY_RATIO * score:
        return "early_then_stable" if overall == "stable" else "early_improved"
    if _RANK[overall] > _RANK[early] and score >= EARLY_RATIO * early_score:
        return f"{overall}_later"
    return overall


def oscillation_label(score: float | None, early_score: float | None = None, lang: str = "en",
                      rise: float | None = None) -> str:
    """The verbal label of LABELS in `lang` ("en" or "zh"); "" when the score is NaN or missing.
    A `rise` (rise_score) above RISE_THRESHOLD puts "loss rising" first, in place of "stable"."""
    check_lang(lang)
    key = label_key(score, early_score)
    label = "" if key is None else LABELS[key][lang]
    if rise is None or math.isnan(rise) or rise <= RISE_THRESHOLD:
        return label
    rising = LABELS["rising"][lang]
    if key in (None, "stable"):
        return rising
    return rising + (", " if lang == "en" else "，") + label


def check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise UserError(f"unknown language '{lang}': choose one of {', '.join(LANGS)}")


def _quadratic_trend(y: np.ndarray, half: int) -> np.ndarray:
    """Centred Savitzky-Golay (degree 2) value at each i over y[i-k .. i+k], k = min(half, i, n-1-i)."""
    n = y.size
    out = y.copy()  # k < 2: a quadratic through <= 3 points is the points themselves
    if n >= 2 * half + 1:
        out[half : n - half] = sliding_window_view(y, 2 * half + 1) @ _sg_weights(half)  # (n-2h,)
    for i in sorted(set(range(min(half, n))) | set(range(max(n - half, 0), n))):
        k = min(i, n - 1 - i)
        if k >= 2:
            out[i] = y[i - k : i + k + 1] @ _sg_weights(k)
    return out


def _sg_weights(m: int) -> np.ndarray:
    """Weights of the centre value of a least-squares quadratic over 2m+1 equally spaced points.

    Closed form (Savitzky & Golay 1964): c_u = 3 (3m^2 + 3m - 1 - 5u^2) / ((4m^2 - 1)(2m + 3)).
    """
    u = np.arange(-m, m + 1)  # (2m+1,)
    return 3.0 * (3 * m * m + 3 * m - 1 - 5 * u * u) / ((4 * m * m - 1) * (2 * m + 3))
