"""Signals in: the recordings of a named source or a user file, each checked finite and
non-constant, at its own sample rate.

  ppg        the three real PPG recordings heartpy ships (`heartpy/data/`), rates read from their
             time columns: data.csv 100 Hz (2483 samples, no time column; heartpy documents 100 Hz),
             data2.csv 116.99 Hz (15000 samples; `timer` in ms, a steady 8.5479 ms step; it
             reads 0 from 18.0 to 25.2 s, a sensor dropout whose windows standardize to zeros),
             data3.csv 100.42 Hz (68476 samples over 681.9 s; see `_rate_from_times`).
  synthetic  seeded PPG-like pulses (systolic peak, dicrotic notch, drifting heart rate and
             amplitude, baseline wander, noise): 4 recordings of 3 minutes at 100 Hz.
  a path     .npy / .csv / .parquet; a 1-D signal is one recording, a 2-D table one per row
             (a single column is one signal). User files need their sample rate (`--sample-rate`).

`vqlog.data` turns recordings into windows.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqlog import records, tables
from vqlog.errors import DataError, RateError

SOURCES = ("ppg", "synthetic")
SUFFIXES = (".npy", ".csv", ".parquet")
SYNTHETIC_HZ = 100.0  # default rate of the synthetic source
SYNTHETIC_MIN_HZ = 5.0  # below it the pulses are aliased noise, and 0.01 Hz made none


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__/__hash__ would compare arrays
class Recording:
    name: str  # e.g. "ppg/data2", or "path.npy[3]" for row 3 of a file
    signal: np.ndarray  # 1-D float64
    sample_rate: float  # Hz
    offset: float = 0.0  # seconds from its source's start to its first sample (a stretch of a record)


# --------------------------------------------------------------------------- sources


def load_source(source: str, sample_rate: float | None = None, seed: int = 0,
                channel: str | None = None) -> list[Recording]:
    """Recordings of a named source or a user file; every one checked finite and non-constant.
    `channel` picks one signal of a WFDB record, an EDF/BDF file or a CSV/Parquet table."""
    if sample_rate is not None:
        sample_rate = _check_rate(sample_rate, source)
    if channel is not None:
        channel = str(channel)  # an index given as an int from Python: vqlog.sweep(channel=1)
    if source in SOURCES and channel is not None:
        raise DataError(f"the {source} source has one channel; drop --channel")
    if source == "ppg":
        if sample_rate is not None:
            raise RateError("the ppg recordings carry their own sample rates",
                            "drop --sample-rate (use resample_hz to change the rate)", "given")
        recordings = _load_ppg()
    elif source == "synthetic":
        if sample_rate is not None and sample_rate < SYNTHETIC_MIN_HZ:
            raise DataError(f"the synthetic pulses need a sample rate of at least "
                            f"{SYNTHETIC_MIN_HZ:g} Hz (55-95 beats a minute), got {sample_rate:g}")
        recordings = synthetic(seed=seed, sample_rate=sample_rate or SYNTHETIC_HZ)
    elif records.is_wfdb_record(source):
        recordings = split_gaps(_own_rate(records.read_wfdb(source, channel), source, sample_rate))
    else:
        path = _resolve(source)
        if path.suffix.lower() in records.EDF_SUFFIXES:
            *read, starts = records.read_edf(path, channel)
            rec = _own_rate(read, source, sample_rate)
            recordings = [Recording(rec.name + at, x, rec.sample_rate, onset)
                          for at, x, onset in records.stretches(rec.signal, starts, rec.name)]
        else:
            recordings = _load_file(path, sample_rate, channel)
    for rec in recordings:
        try:
            check_signal(rec)
        except DataError as exc:  # a row of two samples: perhaps the table's columns are channels
            short = rec.signal.size < len(recordings)  # a tall table, not one of long signals
            hint = tables.rows_hint([r.name for r in recordings]) if short else ""
            what, _, fix = str(exc).rpartition("; ")
            raise DataError(f"{what}; {hint}; otherwise {fix}" if hint and what else str(exc)
                            ) from None
    return recordings


def _own_rate(read: tuple[np.ndarray, float, str], source: str,
              sample_rate: float | None) -> Recording:
    signal, rate, name = read
    if sample_rate is not None:
        raise RateError(f"{source} carries its own sample rate ({rate:g} Hz)",
                        "drop --sample-rate (use resample_hz to change the rate)", "given")
    return Recording(f"{source}:{name}", signal, rate)


def split_gaps(rec: Recording) -> list[Recording]:
    """A WFDB channel's stretches between gaps, one recording each: WFDB reads missing samples
    (a segment of a multi-segment record without the channel, a gap segment, a sample stored as
    the format's invalid value) as NaN. A record with no gap is one recording, as it was."""
    x = rec.signal
    finite = np.isfinite(x)
    if finite.all():
        return [rec]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))
    runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    if not runs:
        raise DataError(f"{rec.name}: every one of its {x.size} samples is missing (NaN)")
    # A sample or a flat few between two gaps (scattered invalid samples, as in MIMIC's records)
    # hold no window and nothing to learn: left out, where check_signal refused the record.
    kept = [(a, b) for a, b in runs if b - a >= 2 and np.ptp(x[a:b]) > 0]
    if not kept:
        raise DataError(f"{rec.name}: between its gaps (NaN) every stretch is flat or a single "
                        "sample; check the record or pick another --channel")
    return [Recording(f"{rec.name}[{a}:{b}]", x[a:b], rec.sample_rate,
                      rec.offset + a / rec.sample_rate) for a, b in kept]


def describe_source(source: str) -> str:
    if source == "ppg":
        return "heartpy's 3 example PPG recordings (100, 117.0, 100.4 Hz)"
    if source == "synthetic":
        return "synthetic PPG-like pulses (4 x 3 min at 100 Hz, seeded)"
    return f"file {source}"


def _load_ppg() -> list[Recording]:
    import pandas as pd

    # find_spec locates the package without importing it: heartpy's __init__ needs
    # pkg_resources, which recent setuptools no longer ships, and we only read its data files.
    spec = importlib.util.find_spec("heartpy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the ppg source needs the heartpy package (pip install heartpy); "
                        "or pass a .npy/.csv/.parquet file instead")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    try:
        data = pd.read_csv(folder / "data.csv", header=None)[0].to_numpy(np.float64)
        data2 = pd.read_csv(folder / "data2.csv")
        data3 = pd.read_csv(folder / "data3.csv")
        stamps = pd.to_datetime(data3["datetime"], format="ISO8601")
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read heartpy's data files in {folder} ({tables.why(exc)}); "
                        "reinstall heartpy") from None
    seconds3 = (stamps - stamps.iloc[0]).dt.total_seconds()
    return [
        Recording("ppg/data", data, 100.0),
        Recording("ppg/data2", data2["hr"].to_numpy(np.float64),
                  _rate_from_times(data2["timer"].to_numpy(np.float64) / 1e3)),
        Recording("ppg/data3", data3["hr"].to_numpy(np.float64),
                  _rate_from_times(seconds3.to_numpy(np.float64))),
    ]


def _rate_from_times(seconds: np.ndarray) -> float:
    """Samples per second as (count - 1) / duration.

    Not the median interval: data3's timestamps tick in ~15.6 ms steps (a Windows clock), so
    36% of its intervals read 0 ms and the median (15 ms) would claim 66.7 Hz; the
    count over the duration gives the true 100.4 Hz. For data2 (steady steps) both agree.
    """
    return (len(seconds) - 1) / float(seconds[-1] - seconds[0])


def synthetic(seed: int = 0, sample_rate: float = SYNTHETIC_HZ, n: int = 4,
              seconds: float = 180.0) -> list[Recording]:
    """`n` PPG-like recordings, deterministic for `seed`."""
    rngs = np.random.default_rng(seed).spawn(n)
    return [Recording(f"synthetic/{i}", _pulse_train(rng, sample_rate, seconds), sample_rate)
            for i, rng in enumerate(rngs)]


def _pulse_train(rng: np.random.Generator, fs: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * fs)) / fs
    resp = 2 * np.pi * rng.uniform(0.2, 0.35) * t + rng.uniform(0, 2 * np.pi)  # breathing phase
    bpm = rng.uniform(55, 95) + rng.uniform(1, 4) * np.sin(resp)  # sinus arrhythmia
    for _ in range(3):  # slow heart-rate drift
        bpm += rng.uniform(1, 6) * _sine(rng, t, 0.003, 0.03)
    beats = np.cumsum(bpm / 60 / fs)  # heartbeat phase, in beats
    frac = beats % 1.0

    def bump(centre: float, width: float) -> np.ndarray:  # Gaussian in wrapped beat phase
        d = np.abs(frac - centre)
        return np.exp(-0.5 * (np.minimum(d, 1 - d) / width) ** 2)

    pulse = (bump(0.18, 0.06) + rng.uniform(0.3, 0.6) * bump(0.48, 0.08)  # systolic, diastolic
             - rng.uniform(0.05, 0.12) * bump(0.36, 0.02))  # dicrotic notch
    per_beat = rng.normal(1.0, 0.06, int(beats[-1]) + 1)[beats.astype(int)]
    amplitude = per_beat * (1 + 0.15 * np.sin(resp + 1.0))  # respiratory amplitude modulation
    wander = sum(rng.uniform(0.1, 0.3) * _sine(rng, t, 0.02, 0.3) for _ in range(2))
    return amplitude * pulse + wander + rng.normal(0, rng.uniform(0.01, 0.04), t.size)


def _sine(rng: np.random.Generator, t: np.ndarray, low: float, high: float) -> np.ndarray:
    """A unit sine of random frequency in [low, high] Hz and random phase."""
    return np.sin(2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 2 * np.pi))


# --------------------------------------------------------------------------- user files


KINDS = ".npy, .csv, .parquet, .edf or .bdf file, or a WFDB record (its path without extension)"


def _resolve(source: str) -> Path:
    path = Path(source).expanduser()
    suffixes = SUFFIXES + records.EDF_SUFFIXES
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise DataError(f"{source}: unsupported file type '{path.suffix}'; use a {KINDS}")
        if not os.access(path, os.R_OK):
            raise DataError(f"cannot read {source}: permission denied for this user")
        return path
    if path.exists():
        raise DataError(f"{source} is a directory; pass a {KINDS}")
    where = "" if path.is_absolute() else f" (relative to the current folder, {Path.cwd()})"
    if path.suffix.lower() in suffixes:
        raise DataError(f"data file not found: {source}{where}; check the path")
    if not path.parent.is_dir():  # a WFDB record's path, or a typo, in a folder that is not there
        raise DataError(f"data source {source}: no folder {path.parent}{where}; check the path")
    beside = sorted(p.name for p in path.parent.glob(f"{glob.escape(path.name)}.*"))
    data_files = [name for name in beside if Path(name).suffix.lower() in suffixes]
    if data_files:  # `--data sig` for sig.npy: a name without its extension
        raise DataError(f"data file not found: {source}{where}; did you mean "
                        f"{' or '.join(str(path.parent / name) for name in data_files[:3])}?")
    if beside:  # a record's signal files (100.dat), without its header
        raise DataError(f"WFDB record {source}: its header {source}.hea is missing; give the "
                        "record's path without extension, beside its .hea and signal files")
    if path.suffix or len(path.parts) > 1:  # a path, not a source's name: a missing file
        raise DataError(f"no data file or WFDB record at {source}{where}; check the path (a "
                        f"data file is a {KINDS})")
    raise DataError(f"unknown data source '{source}'; use one of {', '.join(SOURCES)} "
                    f"or a path to a {KINDS}")


def _load_file(path: Path, sample_rate: float | None, channel: str | None = None
               ) -> list[Recording]:
    if sample_rate is None:
        raise RateError(f"{path}: the sample rate of a data file is unknown",
                        "pass --sample-rate HZ", "unknown")  # a sweep's spec may give it too
    suffix = path.suffix.lower()
    if channel is not None:
        if suffix == ".npy":
            raise DataError(f"{path}: --channel picks a column of a CSV or Parquet table or a "
                            "channel of a WFDB record or EDF/BDF file, not of a .npy array")
        signal, name = tables.read_column(path, channel)
        return [Recording(f"{path}:{name}", signal, sample_rate)]
    rows = tables.read_table(path)
    if isinstance(rows, np.ndarray):
        if rows.ndim == 2 and rows.shape[1] == 1:
            rows = rows[:, 0]  # a single column is one signal, as in a CSV
        if rows.ndim == 1:
            return [Recording(str(path), rows.astype(np.float64), sample_rate)]
        if rows.ndim != 2:
            raise DataError(f"{path}: expected a 1-D signal or a 2-D array with one signal "
                            f"per row, got shape {rows.shape}; reshape it before saving")
    if len(rows) == 0:
        raise DataError(f"{path} holds no samples; pass a file with signal data")
    return [Recording(f"{path}[{i}]", np.asarray(row, np.float64), sample_rate)
            for i, row in enumerate(rows)]


# --------------------------------------------------------------------------- checks


def _check_rate(rate: float, source: str) -> float:
    number = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not number or not 0 < rate < float("inf"):
        raise DataError(f"{source}: sample rate must be a positive number of Hz, got {rate!r}")
    return float(rate)


def check_signal(rec: Recording) -> None:
    x = rec.signal
    if not isinstance(x, np.ndarray) or x.ndim != 1:
        raise DataError(f"{rec.name}: a recording must be a 1-D signal, got shape {np.shape(x)}")
    if x.size == 0:
        raise DataError(f"{rec.name} holds no samples; remove it or pass another file")
    bad = ~np.isfinite(x)
    if bad.any():
        raise DataError(f"{rec.name}: {int(bad.sum())} of {x.size} samples are NaN or Inf "
                        f"(first at sample {int(np.argmax(bad))}); fill or drop them first")
    if x.size < 2 or np.ptp(x) == 0:
        raise DataError(f"{rec.name} is constant (std 0), nothing to learn; "
                        "check the file or column")
    if not np.isfinite(np.ptp(x)) or np.abs(x).max() > 1e150:  # z-scoring squares them
        raise DataError(f"{rec.name}: values up to {np.abs(x).max():.3g} overflow the "
                        "standardization's squares; rescale the signal (e.g. to its units)")
