"""vqlog.data on real files under tmp_path: loading, splitting, windowing, errors."""

import io
import json
import pickle

import numpy as np
import pandas as pd
import pytest

from vqlog.config import Config
from vqlog.data import all_windows, make_splits, prepare, resample, split_bounds, window_starts
from vqlog.sources import SOURCES, Recording, describe_source, load_source, synthetic
from vqlog.errors import ConfigError, DataError, UserError


def ramp(n: int, start: float = 0.0, rate: float = 100.0, name: str = "ramp") -> Recording:
    """A recording whose values are their own sample index (plus `start`)."""
    return Recording(name, start + np.arange(n, dtype=np.float64), rate)


# --------------------------------------------------------------------------- sources


def test_ppg_loads_heartpys_three_recordings_with_rates_from_their_time_columns():
    recs = load_source("ppg")
    assert [r.name for r in recs] == ["ppg/data", "ppg/data2", "ppg/data3"]
    assert [r.signal.size for r in recs] == [2483, 15000, 68476]
    assert [r.sample_rate for r in recs] == pytest.approx([100.0, 116.988, 100.418], abs=1e-3)
    assert all(r.signal.dtype == np.float64 and r.signal.ndim == 1 for r in recs)


def test_synthetic_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b, c = load_source("synthetic", seed=3), load_source("synthetic", seed=3), synthetic(seed=4)
    assert len(a) == 4 and all(r.sample_rate == 100.0 and r.signal.size == 18000 for r in a)
    assert all(np.array_equal(x.signal, y.signal) for x, y in zip(a, b))
    assert not any(np.allclose(x.signal, y.signal) for x, y in zip(a, c))
    assert len({r.signal[:100].tobytes() for r in a}) == 4  # recordings differ from each other


def test_synthetic_pulses_beat_at_a_heart_rate():
    for rec in synthetic(seed=0):
        x = rec.signal - rec.signal.mean()
        freqs = np.fft.rfftfreq(x.size, 1 / rec.sample_rate)
        power = np.abs(np.fft.rfft(x * np.hanning(x.size)))
        band = (freqs > 0.7) & (freqs < 2.5)  # 42..150 bpm, above the baseline wander
        assert 45 <= 60 * freqs[band][np.argmax(power[band])] <= 110


def test_synthetic_rate_follows_sample_rate():
    (rec, *_) = load_source("synthetic", sample_rate=50)
    assert rec.sample_rate == 50 and rec.signal.size == 9000


def _npy(path, x):
    np.save(path, np.asarray(x))


def _csv_column(path, x):
    path.write_text("ppg\n" + "\n".join(map(str, x)) + "\n")


def _csv_column_no_header(path, x):
    path.write_text("\n".join(map(str, x)) + "\n")


def _csv_rows(path, x):
    pd.DataFrame(x, columns=[f"t{i}" for i in range(x.shape[1])]).to_csv(path, index=False)


def _csv_rows_no_header(path, x):
    np.savetxt(path, x, delimiter=",")


def _parquet(path, x):
    x = np.asarray(x)
    if x.ndim == 1:
        pd.DataFrame({"ppg": x}).to_parquet(path)
    else:
        pd.DataFrame(x, columns=[f"t{i}" for i in range(x.shape[1])]).to_parquet(path)


SIGNAL = np.sin(np.arange(40) / 3.0) * 5 + 500
ROWS = np.stack([SIGNAL, SIGNAL[::-1] * 2, SIGNAL + 7])  # (3, 40)


@pytest.mark.parametrize("suffix, write, data, n_recordings", [
    (".npy", _npy, SIGNAL, 1),
    (".npy", _npy, ROWS, 3),
    (".npy", _npy, SIGNAL[:, None], 1),  # a single column is one signal
    (".csv", _csv_column, SIGNAL, 1),
    (".csv", _csv_column_no_header, SIGNAL, 1),
    (".csv", _csv_rows, ROWS, 3),
    (".csv", _csv_rows_no_header, ROWS, 3),
    (".parquet", _parquet, SIGNAL, 1),
    (".parquet", _parquet, ROWS, 3),
])
def test_user_files_load_in_1d_and_2d_shapes(tmp_path, suffix, write, data, n_recordings):
    path = tmp_path / f"signal{suffix}"
    write(path, data)
    recs = load_source(str(path), sample_rate=250)
    expected = np.atleast_2d(data.T if data.ndim == 2 and data.shape[1] == 1 else data)
    assert len(recs) == n_recordings
    for rec, row in zip(recs, expected):
        np.testing.assert_allclose(rec.signal, row)
        assert rec.sample_rate == 250.0 and rec.signal.dtype == np.float64
    assert recs[0].name == (str(path) if n_recordings == 1 else f"{path}[0]")


def test_csv_rows_may_differ_in_length(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("1,2,3,4\n5,6,7\n\n8,9,10,11,12,\n")
    recs = load_source(str(path), sample_rate=10)
    assert [r.signal.tolist() for r in recs] == [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]


def test_a_blank_line_in_one_csv_column_is_a_missing_sample_not_a_dropped_one(tmp_path):
    """pandas writes a NaN as an empty cell, which in one column is the whole line: the blank
    lines were skipped and the signal joined across the gap (`vqlog encode` then put every later
    row at the wrong time, exit 0), where --channel, Parquet and .npy report the NaN. Blank lines
    before the first number and after the last are still no samples."""
    signal = np.sin(np.arange(600) / 7.0)
    signal[100:300] = np.nan
    path = tmp_path / "gap.csv"
    pd.DataFrame({"PLETH": signal}).to_csv(path, index=False)
    path.write_text("\n" + path.read_text() + "\n\n")
    with pytest.raises(DataError, match=r"gap.csv: 200 of 600 samples are NaN or Inf \(first at "
                                        r"sample 100\); fill or drop them first"):
        load_source(str(path), sample_rate=100)
    with pytest.raises(DataError, match=r"gap.csv:PLETH: 200 of 600 samples"):  # as a table
        load_source(str(path), sample_rate=100, channel="PLETH")


@pytest.mark.parametrize("header, row", [("ppg", "{v}"), ("time,ppg", "{i},{v}")])
def test_a_blank_line_is_a_missing_sample_with_channel_too(tmp_path, header, row):
    """With --channel a CSV went through pandas' defaults, which skip blank lines: one blank
    line in the middle joined the signal across it, exit 0, where without --channel it is an
    Error. Blank lines after the last row are still no samples."""
    lines = [row.format(i=i, v=f"{v:.6f}") for i, v in enumerate(np.sin(np.arange(600) / 7.0))]
    path = tmp_path / "gap.csv"
    path.write_text("\n".join([header, *lines[:300], "", *lines[300:]]) + "\n\n")
    with pytest.raises(DataError, match=r"gap.csv:ppg: 1 of 601 samples are NaN or Inf \(first "
                                        r"at sample 300\)"):
        load_source(str(path), sample_rate=100, channel="ppg")
    path.write_text("\n".join([header, *lines[:300], "   ", *lines[300:]]) + "\n")  # spaces
    with pytest.raises(DataError, match=r"1 of 601 samples are NaN or Inf \(first at sample 300"):
        load_source(str(path), sample_rate=100, channel="ppg")
    path.write_text("\n\n" + "\n".join([header, *lines]) + "\n\n  \n\n")
    (rec,) = load_source(str(path), sample_rate=100, channel="ppg")
    assert rec.signal.size == 600
    quoted = f'{header},note\n' + "\n".join(f'{r},"a\n\nb"' for r in lines)  # one row each
    path.write_text(quoted + "\n")
    (rec,) = load_source(str(path), sample_rate=100, channel="ppg")
    assert rec.signal.size == 600 and np.isfinite(rec.signal).all()
    nan = row.format(i=600, v="nan")  # a missing sample written as such, last: still reported
    path.write_text("\n".join([header, *lines, nan]) + "\n")
    with pytest.raises(DataError, match=r"1 of 601 samples are NaN or Inf \(first at sample 600"):
        load_source(str(path), sample_rate=100, channel="ppg")


def test_parquet_list_column_is_one_signal_per_row(tmp_path):
    path = tmp_path / "lists.parquet"
    pd.DataFrame({"signal": [SIGNAL, SIGNAL[:30] * 2]}).to_parquet(path)
    recs = load_source(str(path), sample_rate=10)
    assert [r.signal.size for r in recs] == [40, 30]


def test_describe_source_names_every_source():
    assert all(describe_source(s) for s in SOURCES)
    assert "x.npy" in describe_source("x.npy")


# --------------------------------------------------------------------------- splits


def test_split_bounds_and_window_starts():
    assert split_bounds(1000) == [(0, 800), (800, 900), (900, 1000)]
    assert split_bounds(7, (0.5, 0.25, 0.25)) == [(0, 4), (4, 5), (5, 7)]
    assert window_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert window_starts(3, 4, 1).size == 0


def test_windows_have_the_right_shapes_and_counts():
    splits = make_splits(synthetic(seed=0), window=64, stride=32)
    for split, block in (("train", 14400), ("valid", 1800), ("test", 1800)):
        w = getattr(splits, split)
        assert w.dtype == np.float32 and w.shape == (4 * ((block - 64) // 32 + 1), 64)
        assert splits.info["windows"][split] == len(w)
    assert splits.sample_rate == 100.0
    json.dumps(splits.info)


def test_splits_come_from_disjoint_contiguous_index_ranges():
    recs = [ramp(1000), ramp(523, start=10_000, name="second")]
    s = make_splits(recs, window=20, stride=7, standardize=None)
    for w in (s.train, s.valid, s.test):
        assert np.all(np.diff(w, axis=1) == 1)  # each window: consecutive samples of one recording
    for lo, hi in ((0, 1000), (10_000, 10_523)):  # per recording: train < valid < test
        pick = [w[(w[:, 0] >= lo) & (w[:, 0] < hi)] for w in (s.train, s.valid, s.test)]
        assert pick[0].max() < pick[1].min() and pick[1].max() < pick[2].min()
    # the first train window starts at 0 and the valid windows at the 80% cut
    assert s.train[0, 0] == 0 and s.valid[0, 0] == 800
    # blocks 800/100/100 and 418/53/52 samples: (block - 20) // 7 + 1 windows each
    assert s.info["windows"] == {"train": 112 + 57, "valid": 12 + 5, "test": 12 + 5}


@pytest.mark.parametrize("source", ["synthetic", "ppg"])
def test_window_standardization_zscores_every_window(source):
    s = make_splits(load_source(source), window=128, stride=64, resample_hz=50)
    for w in (s.train, s.valid, s.test):
        np.testing.assert_allclose(w.mean(1), 0, atol=1e-5)
        flat = np.all(w == 0, axis=1)  # ppg/data2 reads 0 from 18.0 to 25.2 s (sensor dropout)
        np.testing.assert_allclose(w[~flat].std(1), 1, atol=1e-4)
        assert flat.sum() == (3 if source == "ppg" and w is s.train else 0)


def test_dataset_standardization_uses_train_statistics():
    s = make_splits([ramp(2000)], window=50, stride=25, standardize="dataset")
    assert s.train.mean() == pytest.approx(0, abs=1e-5)
    assert s.train.std() == pytest.approx(1, abs=1e-5)
    assert s.valid.mean() > 1  # later samples of a ramp: scaled by train's mean/std, not their own
    raw = make_splits([ramp(2000)], window=50, stride=25, standardize=None)
    np.testing.assert_allclose(s.test, (raw.test - s.info["mean"]) / s.info["std"], rtol=1e-5)


def test_flat_window_is_centred_not_divided_by_zero():
    x = np.r_[np.sin(np.arange(800) / 5.0), np.full(100, 3.0), np.sin(np.arange(100) / 5.0)]
    s = make_splits([Recording("flat", x, 10.0)], window=50, stride=50)
    assert np.isfinite(s.valid).all() and np.all(s.valid == 0)  # the valid block is all 3.0
    np.testing.assert_allclose(s.train.std(1), 1, atol=1e-4)


def test_resampling_changes_the_length_by_the_ratio():
    x = 500 + np.sin(2 * np.pi * 2.0 * np.arange(1000) / 100)
    for target, n in ((50, 500), (30, 300), (200, 2000)):
        y, rate = resample(x, 100.0, target)
        assert y.size == n and rate == target
    y, rate = resample(x, 100.0, 50)
    np.testing.assert_allclose(y, 500 + np.sin(2 * np.pi * 2.0 * np.arange(500) / 50), atol=0.05)
    y, rate = resample(x, 116.98775446533031, 50)  # data2's rate: a rational approximation
    assert rate == pytest.approx(50, rel=1e-3)
    assert y.size == pytest.approx(1000 * 50 / 116.988, abs=1)
    s = make_splits([ramp(1000), ramp(3000, rate=300.0)], window=10, stride=10, resample_hz=50)
    assert [r["samples"] for r in s.info["recordings"]] == [500, 500] and s.sample_rate == 50


def test_a_ratio_that_1000_cannot_approximate_is_refused_not_rounded():
    """1/1200 rounded to 1/1000: 30 kHz "resampled to 25 Hz" came out at 30 Hz, and every window
    held 1.2x the time the model was trained on."""
    from vqlog.errors import DataError

    x = np.random.default_rng(0).standard_normal(30000)
    with pytest.raises(DataError, match="cannot resample 30000 Hz to 25 Hz within 0.1%"):
        resample(x, 30000.0, 25)
    y, rate = resample(x, 25000.0, 25)  # 1/1000 exactly
    assert rate == 25 and y.size == 30


def test_common_sample_rate_only_when_recordings_share_it():
    assert make_splits([ramp(400), ramp(400)], window=10, stride=10).sample_rate == 100.0
    assert make_splits([ramp(400), ramp(400, rate=50.0)], window=10, stride=10).sample_rate is None


def test_short_recordings_feed_the_splits_they_fit_and_are_listed():
    s = make_splits([ramp(300, name="short"), ramp(3000)], window=50, stride=50)
    assert s.info["recordings"][0]["windows"] == {"train": 4, "valid": 0, "test": 0}
    assert s.info["dropped"] == ["short: valid block 30 < window 50",
                                 "short: test block 30 < window 50"]


def test_prepare_uses_the_config_and_records_the_source():
    config = Config(window=128, stride=128, resample_hz=25.0, seed=1)
    s = prepare("synthetic", config)
    assert s.train.shape[1] == 128 and s.sample_rate == 25.0
    assert s.info["source"] == "synthetic" and s.info["resample_hz"] == 25.0
    np.testing.assert_array_equal(s.train, prepare("synthetic", config).train)
    json.dumps(s.info)


def test_ppg_with_the_default_config():
    s = prepare("ppg", Config(window=256, stride=64, resample_hz=50.0))
    assert s.info["windows"] == {"train": 512, "valid": 57, "test": 57}
    assert s.sample_rate == 50.0


# --------------------------------------------------------------------------- errors


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        content(path)


BAD_FILES = [
    ("x.npy", lambda p: np.save(p, np.zeros((2, 3, 4)) + np.arange(4)),
     r"x\.npy: expected a 1-D .*got shape \(2, 3, 4\)"),
    ("x.npy", lambda p: np.save(p, np.array([1, "a"], dtype=object), allow_pickle=True),
     r"x\.npy holds Python objects"),
    ("x.npy", lambda p: p.write_bytes(pickle.dumps([1.0, 2.0])), r"x\.npy is not a \.npy array"),
    ("x.npy", lambda p: p.write_bytes(_npy_bytes(np.savez, a=np.arange(5))), r"not a \.npy array"),
    ("x.npy", lambda p: p.write_bytes(_npy_bytes(np.save, np.arange(1000.0))[:100]),
     r"x\.npy: cannot read as \.npy"),
    ("x.npy", lambda p: np.save(p, np.arange(5) * 1j), r"complex128 values, not real numbers"),
    ("x.npy", lambda p: np.save(p, np.array([])), r"x\.npy holds no samples"),
    ("x.npy", lambda p: np.save(p, np.where(np.arange(100) % 40 == 3, np.nan, np.arange(100.0))),
     r"x\.npy: 3 of 100 samples are NaN or Inf \(first at sample 3\)"),
    ("x.npy", lambda p: np.save(p, np.stack([np.arange(9.0), np.r_[np.arange(8.0), np.inf]])),
     r"x\.npy\[1\]: 1 of 9 samples are NaN or Inf \(first at sample 8\)"),
    ("x.npy", lambda p: np.save(p, np.full(500, 4.2)), r"x\.npy is constant \(std 0\)"),
    ("x.csv", "", r"x\.csv holds no samples"),
    ("x.csv", "value\n", r"x\.csv holds no samples"),
    ("x.csv", "value\n1\n2\nabc\n4\n", r"x\.csv, line 4: 'abc' is not a number"),
    ("x.csv", "1,2,3\n4,,6\n", r"x\.csv\[1\]: 1 of 3 samples are NaN"),
    ("x.csv", b"\xff\xfe\x00\x01garbage", r"cannot read as CSV"),
    ("x.parquet", lambda p: pd.DataFrame({"a": [1.0, 2.0], "label": ["u", "v"]}).to_parquet(p),
     r"column 'label' is .*not numeric"),
    ("x.parquet", "not parquet at all", r"x\.parquet: cannot read as Parquet"),
    ("x.txt", "1\n2\n", r"x\.txt: unsupported file type '\.txt'; use a \.npy, \.csv, \.parquet, \.edf or \.bdf file"),
]


def _npy_bytes(save, *args, **kwargs) -> bytes:
    buf = io.BytesIO()
    save(buf, *args, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("name, content, message", BAD_FILES)
def test_bad_files_raise_a_one_line_data_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    _write(path, content)
    with pytest.raises(DataError, match=message) as err:
        prepare(str(path), Config(window=8, stride=4, resample_hz=None), sample_rate=100)
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)


@pytest.mark.parametrize("source, sample_rate, message", [
    ("nope", None, r"unknown data source 'nope'; use one of ppg, synthetic or a path to a \.npy"),
    ("missing.csv", 100, r"data file not found: missing\.csv \(relative to the current "
                         r"folder, /.*\); check the path"),
    ("/no/such/missing.csv", 100, r"data file not found: /no/such/missing\.csv; check the path"),
    # a WFDB record's path (no suffix) in a folder that is not there: it said "unknown data
    # source", as for a misspelt source name
    ("no_such_dir/100", None, r"^data source no_such_dir/100: no folder no_such_dir \(relative to "
                              r"the current folder, /.*\); check the path$"),
    ("/no/such/100", None, r"^data source /no/such/100: no folder /no/such; check the path$"),
    # a mistyped record in a folder that is there, a file of another kind that is not there:
    # they too were an "unknown data source", as a misspelt ppg
    ("{tmp}/nosuch", None, r"^no data file or WFDB record at .*/nosuch; check the path \(a data "
                           r"file is a \.npy, \.csv, .*\)$"),
    ("sig.txt", 100, r"^no data file or WFDB record at sig\.txt \(relative to the current "
                     r"folder, /.*\); check the path"),
    ("ppg", 100, r"ppg recordings carry their own sample rates; drop --sample-rate"),
    ("synthetic", -5, r"sample rate must be a positive number of Hz, got -5"),
])
def test_bad_source_names_and_rates(source, sample_rate, message, tmp_path):
    with pytest.raises(DataError, match=message):
        load_source(source.format(tmp=tmp_path), sample_rate=sample_rate)


def test_user_file_without_a_sample_rate_says_to_pass_one(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(100.0))
    with pytest.raises(DataError, match=r"x\.npy: the sample rate .* pass --sample-rate"):
        load_source(str(path))
    with pytest.raises(DataError, match="is a directory"):
        load_source(str(tmp_path), sample_rate=10)


def test_too_short_for_a_window_names_the_split_lengths_and_a_fix(tmp_path):
    path = tmp_path / "short.npy"
    np.save(path, np.sin(np.arange(1000) / 7.0))
    message = (r"the valid split has no windows: .*shorter than window=256 samples "
               r"\(.*short\.npy 100\); use a smaller window \(at most 100\)")
    with pytest.raises(DataError, match=message):
        prepare(str(path), Config(window=256, stride=64, resample_hz=None), sample_rate=100)
    with pytest.raises(DataError, match=r"the train split has no windows"):
        make_splits([ramp(100)], window=256, stride=64)


def test_a_table_of_channels_read_as_rows_says_to_take_one_with_channel(tmp_path):
    """A CSV whose columns are channels (time, ppg), given without --channel, is read as one
    signal per row, of two samples each: the error says so first, names the table's columns,
    and then the window fix."""
    path = tmp_path / "two.csv"
    path.write_text("time,ppg\n" + "".join(f"{i / 100},{500 + 5 * np.sin(i / 7):.4f}\n" for i in range(500)))
    with pytest.raises(DataError, match=r"shorter than window=64 samples \(.*\); the file is read "
                                        r"as one signal per row \(500 rows\): if its columns are "
                                        r"channels, take one with --channel NAME\|INDEX \(its "
                                        r"columns: time, ppg\); otherwise use a smaller window "
                                        r"\(at most 2\)"):
        prepare(str(path), Config(window=64, stride=32, resample_hz=None), sample_rate=100)
    # and where a trained model cuts its windows (vqlog encode): it only said "the longest
    # recording has 2"
    with pytest.raises(DataError, match=r"the longest recording has 2; the file is read as one "
                                        r"signal per row \(500 rows\): .*\(its columns: time, "
                                        r"ppg\); otherwise give a longer recording$"):
        all_windows(str(path), Config(window=64, stride=32, resample_hz=None), sample_rate=100)
    recs = load_source(str(path), sample_rate=100, channel="ppg")  # the fix works
    assert len(recs) == 1 and recs[0].signal.size == 500


def test_a_table_of_channels_whose_row_fails_a_check_says_to_take_one_with_channel(tmp_path):
    """time,ppg rows start at (0, 0): the first row, read as a signal of two samples, is constant.
    That check came before the window's and gave no hint at --channel; it does now, and a NaN
    row likewise."""
    path = tmp_path / "time_ppg.csv"
    path.write_text("time,ppg\n" + "".join(f"{i / 100},{np.sin(i / 7):.4f}\n" for i in range(500)))
    with pytest.raises(DataError, match=r"time_ppg\.csv\[0\] is constant \(std 0\), nothing to "
                                        r"learn; the file is read as one signal per row \(500 "
                                        r"rows\): if its columns are channels, take one with "
                                        r"--channel NAME\|INDEX \(its columns: time, ppg\); "
                                        r"otherwise check the file or column$"):
        load_source(str(path), sample_rate=100)
    gap = tmp_path / "gap.csv"
    gap.write_text("time,ppg,ecg\n0.01,1.5,2\n0.02,,3\n0.03,2.5,1\n0.04,2.7,1\n")
    with pytest.raises(DataError, match=r"gap\.csv\[1\]: 1 of 3 samples are NaN .*; the file is "
                                        r"read as one signal per row \(4 rows\): .*\(its columns: "
                                        r"time, ppg, ecg\); otherwise fill or drop them first$"):
        load_source(str(gap), sample_rate=100)
    long_rows = tmp_path / "recordings.npy"  # 3 recordings of 500 samples, one with a NaN:
    rows = np.sin(np.arange(1500) / 7).reshape(3, 500)  # no channels to take
    rows[1, 7] = np.nan
    np.save(long_rows, rows)
    with pytest.raises(DataError, match=r"recordings\.npy\[1\]: 1 of 500 samples are NaN or Inf "
                                        r"\(first at sample 7\); fill or drop them first$"):
        load_source(str(long_rows), sample_rate=100)
    from vqlog.tables import rows_hint  # a record's stretches are no table's rows

    assert rows_hint(["rec:PLETH[0:500]", "rec:PLETH[900:2000]"]) == ""
    one = tmp_path / "one.csv"  # a single signal: no hint
    one.write_text("ppg\n" + "1\n" * 50)
    with pytest.raises(DataError, match=r"one\.csv is constant \(std 0\), nothing to learn; check "
                                        r"the file or column$"):
        load_source(str(one), sample_rate=100)


def test_the_hint_names_a_parquet_tables_columns_and_none_of_a_headerless_csv(tmp_path):
    import pandas as pd

    rows = np.sin(np.arange(500 * 3) / 7).reshape(500, 3)
    table = tmp_path / "three.parquet"
    named_index = pd.Index(np.arange(500) / 100, name="time")  # stored, read back as the index
    pd.DataFrame(rows, columns=[f"ch{i}" for i in range(3)], index=named_index).to_parquet(table)
    with pytest.raises(DataError, match=r"take one with --channel NAME\|INDEX \(its columns: "
                                        r"ch0, ch1, ch2\); otherwise"):
        prepare(str(table), Config(window=64, stride=32, resample_hz=None), sample_rate=100)
    wide = tmp_path / "wide.csv"  # more columns than the line shows
    wide.write_text(",".join(f"c{i}" for i in range(12)) + "\n"
                    + "".join(",".join(str(v) for v in range(i, i + 12)) + "\n" for i in range(50)))
    with pytest.raises(DataError, match=r"\(its columns: c0, c1, c2, c3, c4, c5, c6, c7, \.\.\. 4 "
                                        r"more\)"):
        prepare(str(wide), Config(window=64, stride=32, resample_hz=None), sample_rate=100)
    bare = tmp_path / "bare.csv"  # no header row: no names to give
    np.savetxt(bare, rows, delimiter=",")
    with pytest.raises(DataError, match=r"take one with --channel NAME\|INDEX; otherwise"):
        prepare(str(bare), Config(window=64, stride=32, resample_hz=None), sample_rate=100)


def test_constant_train_split_under_dataset_standardization():
    x = np.r_[np.zeros(800), np.arange(200.0)]
    with pytest.raises(DataError, match="train split is constant"):
        make_splits([Recording("r", x, 10.0)], window=10, stride=10, standardize="dataset")


def test_bad_arguments_name_the_key():
    with pytest.raises(ConfigError, match="standardize must be one of window, dataset"):
        make_splits([ramp(400)], window=10, stride=10, standardize="bogus")
    with pytest.raises(ConfigError, match="stride must be an integer >= 1"):
        make_splits([ramp(400)], window=10, stride=0)
    with pytest.raises(DataError, match="no recordings"):
        make_splits([], window=10, stride=10)


def test_a_worker_reads_its_data_once_and_keeps_the_last_variants_only(tmp_path):
    """A space that searched `stride` or `resample_hz` as a range made a new variant of the
    windows almost every trial: each read the file again and was kept for the worker's life."""
    import dataclasses

    from vqlog.data import DataCache

    path = tmp_path / "sig.npy"
    np.save(path, np.sin(np.arange(20_000) / 7.0))
    cache = DataCache(str(path), 100.0)
    cfg = Config(window=64, resample_hz=None)
    first = cache.get(dataclasses.replace(cfg, stride=64))
    np.save(path, np.sin(np.arange(40_000) / 7.0))  # read once: the sweep's data stays its own
    half = cache.get(dataclasses.replace(cfg, stride=32))
    assert len(half.train) == 2 * len(first.train) - 1, (len(half.train), len(first.train))
    one = first.train.nbytes + first.valid.nbytes + first.test.nbytes  # at stride 64
    cache.KEEP_BYTES = 10 * one  # variants at strides 40-51 hold 1.3 to 1.6 times as much
    kept = {stride: cache.get(dataclasses.replace(cfg, stride=stride)) for stride in range(40, 52)}
    held = 0  # the last ones made stay, up to the budget (from the last: a miss makes room)
    while cache.get(dataclasses.replace(cfg, stride=51 - held)) is kept[51 - held]:
        held += 1
    assert 5 <= held <= 8, held
    # A source larger than the budget is not held beside its windows: read again for a new one.
    big = DataCache(str(path), 100.0)
    big.KEEP_BYTES = 40_000 * 8 - 1  # under the recording (float64)
    first = big.get(dataclasses.replace(cfg, stride=64))
    np.save(path, np.sin(np.arange(20_000) / 7.0))
    half = big.get(dataclasses.replace(cfg, stride=32))
    assert len(half.train) < len(first.train), (len(half.train), len(first.train))
