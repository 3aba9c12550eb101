"""Recordings in, windows out: resample, split, cut windows, standardize.

`make_splits` cuts each recording into contiguous blocks (first 80% train, 10% valid, 10% test)
*before* windowing, so no window straddles two splits. Resampling runs on the whole recording
first, so the anti-aliasing filter (scipy's resample_poly: 10 x max(up, down) taps each side at
the upsampled rate) sees across each block edge: about 10 output samples when the rate goes
down (50 input samples from 125 Hz to 25 Hz), 10 x up/down when it goes up (50 from 10 Hz to
50 Hz: 1 s, a fifth of a 256-sample window). At window=256, 50 Hz, ppg/data (24.8 s) is too
short for valid/test windows and feeds train only; such gaps are listed in `info["dropped"]`.
The recordings come from `vqlog.sources`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

from vqlog.config import STANDARDIZE, Config
from vqlog.errors import ConfigError, DataError, RateError
from vqlog.sources import SYNTHETIC_HZ, Recording, check_signal, describe_source, load_source
from vqlog.tables import rows_hint

SPLITS = ("train", "valid", "test")
# Window z-scoring divides by max(std, STD_FLOOR * std of the whole recording): a flat window
# (sensor saturated, probe off) stays near zero instead of dividing by ~0 and blowing noise up.
STD_FLOOR = 1e-3
# The version of `digest` and the readers under it: a study that recorded another version's
# digest records this one's, as a change in how a file is read would otherwise refuse it.
DIGEST_VERSION = 1


@dataclass(frozen=True, eq=False)
class Splits:
    train: np.ndarray  # (n_train, window) float32
    valid: np.ndarray  # (n_valid, window) float32
    test: np.ndarray  # (n_test, window) float32
    sample_rate: float | None  # common rate; None if recordings keep different native rates
    info: dict  # JSON-serialisable: recordings, windows per split, standardization stats


# --------------------------------------------------------------------------- splits


def resample(x: np.ndarray, rate: float, target: float) -> tuple[np.ndarray, float]:
    """Polyphase resampling by a rational approximation of target/rate.

    Returns (signal, rate reached); the rate is within ~0.1% of target (denominator <= 1000).
    """
    from scipy.signal import resample_poly

    if not math.isfinite(target / rate):  # a rate of 1e-310 Hz
        raise RateError(f"cannot resample {rate:g} Hz to {target:g} Hz (over 1000x up)",
                        "check the sample rate, or use a lower resample_hz", "resample")
    ratio = Fraction(target / rate).limit_denominator(1000)
    if ratio == 0:
        raise RateError(f"cannot resample {rate:g} Hz to {target:g} Hz (over 1000x down)",
                        "use a higher resample_hz", "resample")
    if ratio > 1000:
        raise RateError(f"cannot resample {rate:g} Hz to {target:g} Hz (over 1000x up)",
                        "check the sample rate, or use a lower resample_hz", "resample")
    if abs(ratio - target / rate) > 1e-3 * (target / rate):  # 1/1200 rounds to 1/1000
        raise RateError(f"cannot resample {rate:g} Hz to {target:g} Hz within 0.1% (over 1000x "
                        "down)", "use a higher resample_hz", "resample")
    if ratio == 1:
        return x, rate
    # padtype="line": PPG sits on a large offset (~500 ADC units); zero padding rings at the edges
    y = resample_poly(x, ratio.numerator, ratio.denominator, padtype="line")
    return y, rate * ratio.numerator / ratio.denominator


def split_bounds(length: int, fractions=(0.8, 0.1, 0.1)) -> list[tuple[int, int]]:
    """Contiguous [start, end) blocks covering 0..length, one per split, sized by `fractions`."""
    cuts = [0, *(round(length * c) for c in np.cumsum(fractions)[:-1]), length]
    return list(zip(cuts[:-1], cuts[1:]))


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Start of every full window in a block of `length` samples; a shorter tail is dropped."""
    return np.arange(0, max(length - window + 1, 0), stride)


def make_splits(recordings: list[Recording], *, window: int, stride: int,
                resample_hz: float | None = None, standardize: str | None = "window",
                fractions=(0.8, 0.1, 0.1)) -> Splits:
    """Windows (n, window) float32 per split, cut from contiguous per-recording blocks.

    standardize: "window" z-scores each window (std floored, see STD_FLOOR), "dataset" applies
    the train windows' mean/std to every split, None keeps raw values (for inspection and tests).
    A recording whose block is shorter than a window gives that split no windows (listed in
    info["dropped"]); a split left with no windows at all is a DataError.
    """
    _check_args(window, stride, resample_hz, standardize, fractions)
    if not recordings:
        raise DataError("no recordings to split; the source holds no signals")
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    per_rec, dropped = [], []
    for rec in recordings:
        x, rate = _at_rate(rec, resample_hz)
        blocks, counts, floor = {}, {}, STD_FLOOR * x.std()
        for split, (a, b) in zip(SPLITS, split_bounds(x.size, fractions)):
            w = _windows(x[a:b], window, stride)  # (n, window)
            if standardize == "window":
                w = _zscore(w, floor)
            parts[split].append(w)
            blocks[split], counts[split] = b - a, len(w)
            if not len(w):
                dropped.append(f"{rec.name}: {split} block {b - a} < window {window}")
        per_rec.append({"name": rec.name, "native_rate": rec.sample_rate,
                        "native_samples": int(rec.signal.size), "rate": rate,
                        "samples": int(x.size), "blocks": blocks, "windows": counts})
    out = {s: np.concatenate(parts[s]) for s in SPLITS}  # (n_split, window) float64
    for split in SPLITS:
        if not len(out[split]):
            raise DataError(_too_short(split, per_rec, window))
    rates = {r["rate"] for r in per_rec}
    common = resample_hz if resample_hz is not None else (rates.pop() if len(rates) == 1 else None)
    info = {"sample_rate": common, "window": window, "stride": stride, "resample_hz": resample_hz,
            "standardize": standardize, "fractions": list(fractions),
            "windows": {s: len(out[s]) for s in SPLITS}, "recordings": per_rec, "dropped": dropped}
    if standardize == "dataset":
        mean, std = float(out["train"].mean()), float(out["train"].std())
        if std == 0:
            raise DataError("the train split is constant (std 0), nothing to learn; "
                            "check the recordings")
        out = {s: (w - mean) / std for s, w in out.items()}
        info.update(mean=mean, std=std)
    return Splits(*(out[s].astype(np.float32) for s in SPLITS), sample_rate=common, info=info)


def _at_rate(rec: Recording, resample_hz: float | None) -> tuple[np.ndarray, float]:
    check_signal(rec)
    if resample_hz is None:
        return rec.signal, rec.sample_rate
    return resample(rec.signal, rec.sample_rate, resample_hz)


def _zscore(w: np.ndarray, floor: float) -> np.ndarray:
    """Each window (row) to mean 0, std 1; the std floored (see STD_FLOOR)."""
    return (w - w.mean(1, keepdims=True)) / np.maximum(w.std(1, keepdims=True), floor)


def _windows(x: np.ndarray, window: int, stride: int) -> np.ndarray:
    starts = window_starts(x.size, window, stride)
    if not starts.size:
        return np.empty((0, window))
    return np.lib.stride_tricks.sliding_window_view(x, window)[starts]  # (n, window)


def _check_args(window, stride, resample_hz, standardize, fractions) -> None:
    for key, value in (("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    if resample_hz is not None and not resample_hz > 0:
        raise ConfigError(f"resample_hz must be > 0 or null, got {resample_hz!r}")
    if standardize is not None and standardize not in STANDARDIZE:
        raise ConfigError(f"standardize must be one of {', '.join(STANDARDIZE)}; "
                          f"got {standardize!r}")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")


def _too_short(split: str, per_rec: list[dict], window: int) -> str:
    lengths = ", ".join(f"{r['name']} {r['blocks'][split]}" for r in per_rec[:4])
    if len(per_rec) > 4:
        lengths += f", ... {len(per_rec) - 4} more"
    longest = max(r["blocks"][split] for r in per_rec)
    fix = (f"use a smaller window (at most {longest}) or a higher resample_hz (or "
           "resample_hz=null: the native rate)" if longest else "use longer recordings")
    rows = rows_hint([r["name"] for r in per_rec])
    if rows:  # short rows of a table are more often channels than signals: say that first
        fix = f"{rows}; otherwise {fix}"
    return (f"the {split} split has no windows: every recording's {split} block is shorter than "
            f"window={window} samples ({lengths}); {fix}")


def prepare(source: str, config: Config, sample_rate: float | None = None,
            channel: str | None = None, recordings: list[Recording] | None = None) -> Splits:
    """load_source (unless `recordings` are its result) + make_splits with the config's window,
    stride, resample_hz, standardize."""
    if recordings is None:
        recordings = load_source(source, sample_rate=sample_rate, seed=config.seed, channel=channel)
    splits = make_splits(recordings, window=config.window, stride=config.stride,
                         resample_hz=config.resample_hz, standardize=config.standardize)
    info = {"source": source, "description": describe_source(source), **splits.info}
    return Splits(splits.train, splits.valid, splits.test, splits.sample_rate, info)


def all_windows(source: str, config: Config, sample_rate: float | None = None,
                channel: str | None = None) -> np.ndarray:
    """Every window of every whole recording of `source` (no splits), cut and standardized as
    `config` says: (n, window) float32, what a trained model turns into tokens. "dataset"
    standardization uses these windows' own mean and std. DataError if none is long enough."""
    return indexed_windows(source, config, sample_rate, channel)[0]


def indexed_windows(source: str, config: Config, sample_rate: float | None = None,
                    channel: str | None = None
                    ) -> tuple[np.ndarray, list[tuple[str, int, float, float]]]:
    """`all_windows`, and where each window comes from: (recording, first sample, rate, second
    in the source). The sample counts from the recording's start at the rate the window was
    cut at; a WFDB stretch between gaps is its own recording, named with its place in the
    record, and the last element is the window's start in seconds from the record's start."""
    recordings = load_source(source, sample_rate=sample_rate, seed=config.seed, channel=channel)
    parts, index, longest = [], [], 0
    for rec in recordings:
        x, rate = _at_rate(rec, config.resample_hz)
        longest = max(longest, x.size)
        w = _windows(x, config.window, config.stride)  # (n, window)
        parts.append(_zscore(w, STD_FLOOR * x.std()) if config.standardize == "window" else w)
        index += [(rec.name, int(start), float(rate), float(rec.offset + start / rate))
                  for start in window_starts(x.size, config.window, config.stride)]
    out = np.concatenate(parts)
    if not len(out):
        where = f" at {config.resample_hz:g} Hz" if config.resample_hz else ""
        rows = rows_hint([rec.name for rec in recordings])
        raise DataError(f"{source} is shorter than one window: the model cuts windows of "
                        f"{config.window} samples{where}, and the longest recording has "
                        f"{longest}; " + (f"{rows}; otherwise give a longer recording" if rows
                                          else "give a longer recording"))
    if config.standardize == "dataset":
        out = (out - out.mean()) / (out.std() or 1.0)
    return out.astype(np.float32), index


def digest(recordings: list[Recording]) -> str:
    """sha256 over the recordings' sample rates and samples, in order: the same data read from
    another path or host gives the same digest; other samples, another channel or another
    --sample-rate give another."""
    h = hashlib.sha256()
    for rec in recordings:
        h.update(np.float64(rec.sample_rate).tobytes())
        h.update(np.int64(rec.signal.size).tobytes())
        h.update(np.ascontiguousarray(rec.signal, dtype=np.float64).tobytes())
    return h.hexdigest()


def _nbytes(splits: Splits) -> int:
    return splits.train.nbytes + splits.valid.nbytes + splits.test.nbytes


class DataCache:
    """Windows depend on a few config keys only: each variant is prepared once per worker, and
    the source is read once (once per seed for the synthetic pulses) where its recordings fit
    in KEEP_BYTES; a larger one is read again for each new variant rather than held beside its
    windows for the worker's life. The variants used last are kept, up to KEEP_BYTES of windows:
    a space that searches `resample_hz` or `stride` as a range makes a new one almost every
    trial, and kept them all, a copy of the data each, for the worker's life."""

    KEYS = ("window", "stride", "resample_hz", "standardize", "seed")  # seed: synthetic data
    KEEP_BYTES = 512 * 2**20  # a categorical space's windows and rates all stay, on most data

    def __init__(self, source: str, sample_rate: float | None, channel: str | None = None):
        self.source, self.sample_rate, self.channel = source, sample_rate, channel
        self._cache: dict[tuple, Splits] = {}  # least recently used first
        self._read: tuple[int | None, list] | None = None  # (seed, recordings) of the last read
        self._pinned = False  # hold the recordings whatever their size (`check`)
        self._digest: str | None = None

    def get(self, cfg: Config) -> Splits:
        key = tuple(getattr(cfg, k) for k in self.KEYS)
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # used last
            return self._cache[key]
        seed = cfg.seed if self.source == "synthetic" else None  # a file is the same every seed
        if self._read is not None and self._read[0] == seed:
            recordings = self._read[1]
        else:
            recordings = load_source(self.source, self.sample_rate, cfg.seed, self.channel)
            self._read = (seed, recordings) if self._pinned or self._fits(recordings) else None
        if self._digest is None:
            self._digest = digest(recordings)
        self._cache[key] = prepare(self.source, cfg, self.sample_rate, self.channel, recordings)
        while len(self._cache) > 1 and sum(map(_nbytes, self._cache.values())) > self.KEEP_BYTES:
            del self._cache[next(iter(self._cache))]  # the one used longest ago
        return self._cache[key]

    def check(self, spec, seed: int | None) -> None:
        """Load the data for a sweep spec's base config and every categorical window of its
        space, before any study exists."""
        base = spec.base_config(seed)
        self._pinned = True  # read once for all of them, whatever its size
        try:
            self.get(base)
            for p in spec.space:
                if p.name in self.KEYS and p.kind == "categorical":
                    for choice in p.choices:
                        self.get(Config.from_mapping({p.name: choice}, base=base))
        finally:
            self._pinned = False
            if self._read is not None and not self._fits(self._read[1]):
                self._read = None

    def _fits(self, recordings: list[Recording]) -> bool:
        return sum(rec.signal.nbytes for rec in recordings) <= self.KEEP_BYTES

    def identity(self) -> dict:
        """What a study records of its data (`vqlog.study.storage.DATA`): the source as given
        and the digest of its recordings; no digest for the synthetic source, which every seed
        makes anew (its rate instead)."""
        if self.source == "synthetic":
            return {"source": self.source, "channel": None, "version": DIGEST_VERSION,
                    "sample_rate": self.sample_rate or SYNTHETIC_HZ, "sha256": None}
        if self._digest is None:
            self._digest = digest(load_source(self.source, self.sample_rate, 0, self.channel))
        return {"source": self.source, "channel": self.channel, "version": DIGEST_VERSION,
                "sample_rate": self.sample_rate, "sha256": self._digest}


def check_same_data(recorded: dict | None, identity: dict | None, study: str,
                    finished: Callable[[], bool]) -> bool:
    """One study compares its trials on one dataset. `recorded`: what the study holds (None
    before its first sweep, or from an older vqlog); `identity`: this sweep's
    (`DataCache.identity`); `finished`: whether the study has a finished trial. Other data (another
    digest; where there is none, another source or rate) is a DataError once a trial has
    finished on the recorded data. Returns whether the study is to record `identity`: none
    recorded, one of another digest version (a reader vqlog changed), or other data that no
    finished trial used (a sweep started on the wrong file and stopped at once)."""
    if identity is None:
        return False
    if not recorded or recorded.get("version") != identity.get("version"):
        return True
    if recorded.get("sha256") and identity.get("sha256"):
        same = recorded["sha256"] == identity["sha256"]
    else:  # synthetic pulses: the source and their rate
        same = all(recorded.get(k) == identity.get(k) for k in ("source", "sample_rate"))
    if same:
        return False
    if not finished():
        return True
    raise DataError(f"study '{study}' ran its trials on other data ({_described(recorded)}) "
                    f"than this sweep's ({_described(identity)}): their scores would not "
                    "compare; give the study's data, or another --study name to start anew")


def _described(identity: dict) -> str:
    channel = f", channel {identity['channel']}" if identity.get("channel") is not None else ""
    rate = f" at {identity['sample_rate']:g} Hz" if identity.get("sample_rate") else ""
    sha = f", sha256 {identity['sha256'][:12]}" if identity.get("sha256") else ""
    return f"{identity.get('source')}{rate}{channel}{sha}"
