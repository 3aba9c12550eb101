"""The field's formats, written with the libraries' own writers and read back through `--data`:
heartpy's real PPG as a 2-channel PhysioNet WFDB record (wfdb) and as EDF and BDF files (edfio),
and a named column of a CSV or Parquet table. Bad input is one `Error:` line, exit 2."""

import numpy as np
import pandas as pd
import pytest

from vqlog.errors import DataError
from vqlog.sources import load_source


@pytest.fixture(scope="module")
def ppg():
    """heartpy's data2 recording (15000 samples at 117.0 Hz) and data (2483 at 100 Hz)."""
    recordings = {r.name: r for r in load_source("ppg")}
    return recordings["ppg/data2"], recordings["ppg/data"]


def write_wfdb(folder, ppg_recording, name="ppg2") -> str:
    """A 2-channel record: the PPG and a slow ramp, 16-bit, at the PPG's rate."""
    import wfdb

    x = ppg_recording.signal
    ramp = np.linspace(-1.0, 1.0, x.size)
    wfdb.wrsamp(name, fs=ppg_recording.sample_rate, units=["adu", "mV"],
                sig_name=["PPG", "ramp"], p_signal=np.column_stack([x, ramp]), fmt=["16", "16"],
                write_dir=str(folder))
    return str(folder / name)


def write_edf(path, ppg_recording, bdf=False) -> str:
    """The PPG (whole seconds of it) and a ramp as EDF (16-bit) or BDF (24-bit) signals."""
    from edfio import Bdf, BdfSignal, Edf, EdfSignal

    rate = ppg_recording.sample_rate
    x = ppg_recording.signal[: int(ppg_recording.signal.size // rate * rate)]
    file, signal = (Bdf, BdfSignal) if bdf else (Edf, EdfSignal)
    file([signal(x, rate, label="PPG"),
          signal(np.linspace(-1.0, 1.0, x.size), rate, label="ramp")]).write(path)
    return str(path)


def test_a_wfdb_record_reads_back_by_channel_name_or_index_at_its_own_rate(tmp_path, ppg):
    data2, _ = ppg
    record = write_wfdb(tmp_path, data2)
    (by_name,) = load_source(record, channel="PPG")
    (by_index,) = load_source(record, channel="0")
    assert by_name.sample_rate == pytest.approx(data2.sample_rate, rel=1e-4)
    assert by_name.name == f"{record}:PPG"
    step = np.ptp(data2.signal) / 2**15  # 16-bit quantization of the record
    np.testing.assert_allclose(by_name.signal, data2.signal, atol=step)
    np.testing.assert_array_equal(by_name.signal, by_index.signal)
    (ramp,) = load_source(record + ".hea", channel="ramp")  # the header's path works too
    assert ramp.signal[0] == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.parametrize("suffix", [".edf", ".bdf"])
def test_an_edf_or_bdf_file_reads_back_by_channel(tmp_path, ppg, suffix):
    _, data = ppg
    path = write_edf(tmp_path / f"ppg{suffix}", data, bdf=suffix == ".bdf")
    (rec,) = load_source(path, channel="PPG")
    assert rec.sample_rate == 100.0 and rec.signal.size == 2400
    bits = 23 if suffix == ".bdf" else 15
    np.testing.assert_allclose(rec.signal, data.signal[:2400], atol=np.ptp(data.signal) / 2**bits)
    (ramp,) = load_source(path, channel="1")
    assert ramp.signal[-1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("bdf, suffix", [(False, ".bdf"), (True, ".edf")])
def test_an_edf_or_bdf_file_is_read_by_its_header_whatever_its_suffix(tmp_path, ppg, bdf, suffix):
    """An EDF saved as .bdf was decoded as 24-bit samples: a garbage signal, and exit 0."""
    _, data = ppg
    path = write_edf(tmp_path / f"named{suffix}", data, bdf=bdf)
    (rec,) = load_source(path, channel="PPG")
    bits = 23 if bdf else 15
    np.testing.assert_allclose(rec.signal, data.signal[:2400], atol=np.ptp(data.signal) / 2**bits)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_channel_names_a_column_of_a_table(tmp_path, ppg, suffix):
    data2, _ = ppg
    df = pd.DataFrame({"time": np.arange(data2.signal.size) / data2.sample_rate,
                       "PPG": data2.signal})
    path = tmp_path / f"table{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    (rec,) = load_source(str(path), sample_rate=117.0, channel="PPG")
    np.testing.assert_allclose(rec.signal, data2.signal)
    (first,) = load_source(str(path), sample_rate=117.0, channel="0")
    np.testing.assert_allclose(first.signal, df["time"].to_numpy())


def test_a_wfdb_channel_trains_and_sweeps(tmp_path, monkeypatch, ppg, cli, tiny, mlflow_store):
    monkeypatch.chdir(tmp_path)  # results/smoke.md goes here, not into the checkout
    data2, _ = ppg
    record = write_wfdb(tmp_path, data2)
    code, out, err = cli("train", "--data", record, "--channel", "PPG",
                         *tiny.args(iteration=4, eval_every=2))
    assert code == 0, err
    assert f"data: {record}:" in out and "at 50 Hz" in out
    code, out, err = cli.sweep("--config", "smoke", "--trials", "1", "--data", record,
                               "--channel", "PPG", "--storage", f"sqlite:///{tmp_path}/o.db",
                               "--tracking-uri", mlflow_store())
    assert code == 0, err
    assert f"data {record}" in out


def test_a_headerless_csvs_column_keeps_its_first_sample(tmp_path, ppg):
    """pandas read the first row of numbers as the column names: --channel 1 lost a sample and
    named the recording after it."""
    data2, _ = ppg
    path = tmp_path / "two.csv"
    np.savetxt(path, np.column_stack([np.arange(data2.signal.size), data2.signal]), delimiter=",")
    (rec,) = load_source(str(path), sample_rate=117.0, channel="1")
    assert rec.name == f"{path}:1" and rec.signal.size == data2.signal.size
    np.testing.assert_allclose(rec.signal, data2.signal)


def test_a_channel_index_may_be_an_int_from_python(tmp_path, ppg):
    """`vqlog.sweep(..., channel=1)`: a WFDB record said it could not be read, an EDF file
    raised AttributeError."""
    data2, data = ppg
    record = write_wfdb(tmp_path, data2)
    edf = write_edf(tmp_path / "ppg.edf", data)
    for source, name in ((record, "ramp"), (edf, "ramp")):
        (by_int,), (by_name,) = load_source(source, channel=1), load_source(source, channel=name)
        np.testing.assert_array_equal(by_int.signal, by_name.signal)


def test_a_sample_or_a_flat_stretch_between_gaps_is_left_out_not_an_error(tmp_path, ppg):
    """Scattered invalid samples (WFDB's invalid value, read as NaN) left single samples and flat
    bits between them, which check_signal refused as constant: the whole record was an error."""
    import wfdb

    data2, _ = ppg
    x = data2.signal.copy()
    x[[5000, 5002, 9000, 9004]] = np.nan  # x[5001] alone; x[9001:9004] made flat below
    x[9001:9004] = x[9001]
    wfdb.wrsamp("gappy", fs=data2.sample_rate, units=["adu"], sig_name=["PPG"],
                p_signal=x[:, None], fmt=["16"], write_dir=str(tmp_path))
    record = str(tmp_path / "gappy")
    parts = load_source(record)
    n = x.size
    assert [p.name for p in parts] == [f"{record}:PPG[0:5000]", f"{record}:PPG[5003:9000]",
                                       f"{record}:PPG[9005:{n}]"]
    # where a window comes from: the stretch's own sample and second, and the record's second
    from vqlog.config import Config
    from vqlog.data import indexed_windows

    cfg = Config(window=100, stride=100, resample_hz=None)
    _, where = indexed_windows(record, cfg)
    rate = data2.sample_rate
    second = next(w for w in where if w[0] == f"{record}:PPG[5003:9000]")
    assert second[1:3] == (0, rate) and second[3] == pytest.approx(5003 / rate)
    assert all(type(w[3]) is float for w in where)  # plain Python numbers, as the others
    third = [w for w in where if w[0] == f"{record}:PPG[9005:{n}]"][1]
    assert third[1] == 100 and third[3] == pytest.approx((9005 + 100) / rate)
    flat = np.full(n, np.nan)
    flat[100:200] = 3.0  # only a flat stretch between the gaps: nothing left
    wfdb.wrsamp("flat", fs=100, units=["adu"], sig_name=["PPG"], p_signal=flat[:, None],
                fmt=["16"], write_dir=str(tmp_path))
    with pytest.raises(DataError, match="between its gaps \\(NaN\\) every stretch is flat"):
        load_source(str(tmp_path / "flat"))


def test_a_truncated_edf_reads_its_whole_records_with_one_warning_line(tmp_path, ppg, caplog):
    """edfio's warning reached the terminal raw, two lines with its own file and line number."""
    import subprocess
    import sys

    _, data = ppg
    path = tmp_path / "cut.edf"
    write_edf(path, data)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - (len(raw) - 768) // 2])  # header 3 x 256 bytes, half the data
    with caplog.at_level("WARNING", logger="vqlog"):
        (rec,) = load_source(str(path), channel="PPG")
    assert 0 < rec.signal.size < 2400
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"vqlog: {path}: EDF header indicates 24 data records"), message
    code = f"from vqlog.sources import load_source; load_source({str(path)!r}, channel='PPG')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"vqlog: {path}: EDF header indicates"), out.stderr


def test_a_multi_segment_record_reads_across_its_segments_and_splits_at_its_gaps(tmp_path, ppg):
    """MIMIC's layout, written with wfdb's own writers: segments, a layout header, and a master
    header. A channel that a segment lacks is a gap, and each stretch between gaps a recording."""
    import wfdb

    data2, _ = ppg
    fs, x = data2.sample_rate, data2.signal
    half = x.size // 2
    ramp = np.linspace(-1.0, 1.0, x.size)
    wfdb.wrsamp("seg_1", fs=fs, units=["mV"], sig_name=["ramp"], p_signal=ramp[:half, None],
                fmt=["16"], write_dir=str(tmp_path))
    wfdb.wrsamp("seg_2", fs=fs, units=["adu", "mV"], sig_name=["PPG", "ramp"],
                p_signal=np.column_stack([x[half:], ramp[half:]]), fmt=["16", "16"],
                write_dir=str(tmp_path))
    wfdb.Record(record_name="seg_layout", n_sig=2, fs=fs, sig_len=0,
                file_name=["seg_layout.dat"] * 2, fmt=["16", "16"], adc_gain=[200.0, 200.0],
                baseline=[0, 0], units=["adu", "mV"], adc_res=[16, 16], adc_zero=[0, 0],
                init_value=[0, 0], checksum=[0, 0], block_size=[0, 0],
                sig_name=["PPG", "ramp"]).wrheader(write_dir=str(tmp_path))
    master = wfdb.MultiRecord(record_name="multi", n_sig=2, fs=fs, sig_len=x.size,
                              layout="variable", seg_name=["seg_layout", "seg_1", "seg_2"],
                              seg_len=[0, half, x.size - half])
    master.n_seg = 3  # a header field its constructor does not take
    master.wrheader(write_dir=str(tmp_path))
    record = str(tmp_path / "multi")
    (whole,) = load_source(record, channel="ramp")
    assert whole.name == f"{record}:ramp" and whole.signal.size == x.size
    assert whole.sample_rate == pytest.approx(fs, rel=1e-4)
    (ppg_part,) = load_source(record, channel="PPG")  # seg_1 has no PPG: one stretch, after it
    assert ppg_part.name == f"{record}:PPG[{half}:{x.size}]"
    np.testing.assert_allclose(ppg_part.signal, x[half:], atol=np.ptp(x) / 2**15)
    with pytest.raises(DataError, match="has 2 channels \\(0: PPG, 1: ramp\\)"):
        load_source(record)


def test_a_channel_with_several_samples_per_frame_keeps_its_own_rate(tmp_path, ppg):
    """wfdb averages such a channel to the frame rate unless asked not to: 4 samples a frame
    at 29.25 frames/s is the PPG at 117 Hz, all of its samples."""
    import wfdb

    data2, _ = ppg
    x = data2.signal[: data2.signal.size // 4 * 4]
    slow = np.linspace(-1.0, 1.0, x.size // 4)
    wfdb.wrsamp("mf", fs=data2.sample_rate / 4, units=["mV", "adu"], sig_name=["slow", "PPG"],
                e_p_signal=[slow, x], samps_per_frame=[1, 4], fmt=["16", "16"],
                write_dir=str(tmp_path))
    (rec,) = load_source(str(tmp_path / "mf"), channel="PPG")
    assert rec.sample_rate == pytest.approx(data2.sample_rate, rel=1e-4)
    np.testing.assert_allclose(rec.signal, x, atol=np.ptp(x) / 2**15)
    (frame_rate,) = load_source(str(tmp_path / "mf"), channel="slow")
    assert frame_rate.signal.size == slow.size


def test_a_record_path_in_a_spec_may_start_with_a_tilde(tmp_path, ppg, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_wfdb(tmp_path, ppg[0])
    (rec,) = load_source("~/ppg2", channel="PPG")
    assert rec.signal.size == ppg[0].signal.size


def test_a_csv_with_a_byte_order_mark_keeps_its_first_sample(tmp_path, ppg):
    """Excel's "CSV UTF-8" starts with a BOM, which made the first number read as a header."""
    x = ppg[0].signal[:3000]
    path = tmp_path / "excel.csv"
    path.write_text("\n".join(f"{v:.6f}" for v in x) + "\n", encoding="utf-8-sig")
    (rec,) = load_source(str(path), sample_rate=117.0)
    np.testing.assert_allclose(rec.signal, np.round(x, 6))


BAD = {  # name: (arguments after --data, fragment of the one Error line)
    "missing header": (["{f}/nohead"], "its header {f}/nohead.hea is missing"),
    "unknown channel": (["{f}/ppg2", "--channel", "ECG"], "no channel 'ECG'; its channels are 0: PPG, 1: ramp"),
    "channel needed": (["{f}/ppg2"], "has 2 channels (0: PPG, 1: ramp); choose one with --channel"),
    "too short": (["{f}/short", "--channel", "PPG"], "has no windows"),
    "own rate": (["{f}/ppg2", "--channel", "PPG", "--sample-rate", "50"], "carries its own sample rate"),
    "edf channel": (["{f}/ppg.edf", "--channel", "9"], "no channel '9'"),
    "not a digit": (["{f}/ppg.edf", "--channel", "²"], "no channel '²'"),  # isdigit, not int
    "no extension": (["{f}/x", "--sample-rate", "50"],  # was "its header x.hea is missing"
                     "data file not found: {f}/x; did you mean {f}/x.npy?"),
    "npy channel": (["{f}/x.npy", "--sample-rate", "50", "--channel", "0"], "not of a .npy array"),
    "npy columns": (["{f}/cols.npy", "--sample-rate", "50"],
                    "if its columns are channels, save one as a 1-D array (np.save(path, x[:, k]))"),
    "rate far too low": (["{f}/x.npy", "--sample-rate", "1e-300"], "(over 1000x up)"),
    "unwritable save": (["{f}/x.npy", "--sample-rate", "50", "--save", "/proc/model.pt"],
                        "cannot write /proc/model.pt: /proc is not writable"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_are_one_error_line_exit_2(tmp_path, ppg, cli, tiny, case):
    data2, data = ppg
    write_wfdb(tmp_path, data2)
    nohead = write_wfdb(tmp_path, data2, "nohead")
    (tmp_path / "nohead.hea").unlink()
    short = type(data2)(data2.name, data2.signal[:200], data2.sample_rate)
    write_wfdb(tmp_path, short, "short")
    write_edf(tmp_path / "ppg.edf", data)
    np.save(tmp_path / "x.npy", data.signal)
    np.save(tmp_path / "cols.npy", np.column_stack([data.signal, -2 * data.signal + 1]))
    args, fragment = BAD[case]
    code, out, err = cli("train", "--data", *[a.format(f=tmp_path) for a in args],
                         *tiny.args(iteration=2))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), err
    assert fragment.format(f=tmp_path) in lines[0], lines[0]
    assert nohead  # (written, then its header removed)


def test_a_spec_names_the_channel(tmp_path, ppg):
    from vqlog.errors import ConfigError
    from vqlog.study.spec import parse_sweep

    spec = parse_sweep({"name": "s", "data": {"source": "rec", "channel": "PPG"}})
    assert (spec.source, spec.channel) == ("rec", "PPG")
    assert parse_sweep({"name": "s", "data": {"source": "rec", "channel": 1}}).channel == "1"
    with pytest.raises(ConfigError, match="data.channel"):
        parse_sweep({"name": "s", "data": {"source": "rec", "channel": [1]}})
    with pytest.raises(DataError, match="one channel"):
        load_source("synthetic", channel="0")


@pytest.mark.parametrize("bdf", [False, True], ids=["edf", "bdf"])
def test_a_discontinuous_edf_plus_file_is_read_as_its_stretches_at_their_onsets(tmp_path, ppg,
                                                                               bdf):
    """EDF+D: data records with gaps in time between them (each record's onset is its
    time-keeping annotation). They were read as one signal, windows running across the gaps.
    Written with edfio, then made discontinuous as a recorder paused for 20 s would write it:
    the header says EDF+D and the later records' onsets move on by 20 s."""
    from edfio import Bdf, BdfSignal, Edf, EdfAnnotation, EdfSignal

    from vqlog.config import Config
    from vqlog.data import indexed_windows

    data2, _ = ppg
    rate = 100.0  # its samples, taken as 100 Hz: 10 one-second data records
    x = data2.signal[:1000]
    file, signal = (Bdf, BdfSignal) if bdf else (Edf, EdfSignal)
    path = tmp_path / ("paused.bdf" if bdf else "paused.edf")
    file([signal(x, rate, label="PPG")], annotations=[EdfAnnotation(0.5, None, "on")]).write(path)
    raw = bytearray(path.read_bytes())
    assert raw[192:197] == b"EDF+C" or raw[192:197] == b"BDF+C", raw[192:236]
    raw[196] = ord("D")  # EDF+C -> EDF+D
    header, width = int(raw[184:192]), 3 if bdf else 2
    per_record = int(rate)
    tal_size = (len(raw) - header) // 10 - width * per_record  # the annotation signal's bytes
    for r in range(6, 10):  # records 6 to 9 begin 20 s later than they would
        at = header + r * (width * per_record + tal_size) + width * per_record
        tal = f"+{r + 20}\x14\x14\x00".encode()
        raw[at:at + tal_size] = tal + bytes(tal_size - len(tal))
    path.write_bytes(bytes(raw))

    parts = load_source(str(path))
    cut = 6 * per_record
    assert [(p.name, p.offset) for p in parts] == [(f"{path}:PPG[0:{cut}]", 0.0),
                                                   (f"{path}:PPG[{cut}:{x.size}]", 26.0)]
    np.testing.assert_allclose(np.concatenate([p.signal for p in parts]), x, atol=0.05)
    _, where = indexed_windows(str(path), Config(window=100, stride=100, resample_hz=None))
    later = [w for w in where if w[0].endswith(f"[{cut}:{x.size}]")]
    assert later[0][1] == 0 and later[0][3] == pytest.approx(26.0)
    assert later[1][3] == pytest.approx(26.0 + 100 / rate)

    # An annotation text that is not UTF-8 (a Latin-1 "é"), and a file cut short in its last
    # record (edfio reads its 9 whole records, with a warning): the same two stretches.
    first = header + width * per_record  # record 0's annotations: "+0", then "+0.5" "on"
    text = raw.index(b"on\x14", first)
    raw[text] = 0xE9
    path.write_bytes(bytes(raw[:len(raw) - tal_size // 2]))
    parts = load_source(str(path))
    assert [(p.name, p.offset) for p in parts] == [(f"{path}:PPG[0:{cut}]", 0.0),
                                                   (f"{path}:PPG[{cut}:900]", 26.0)]
    # One stretch that begins 5 s into the file is placed there too; EDF+C is one recording.
    for r in range(10):
        at = header + r * (width * per_record + tal_size) + width * per_record
        tal = f"+{r + 5}\x14\x14\x00".encode()
        raw[at:at + tal_size] = tal + bytes(tal_size - len(tal))
    path.write_bytes(bytes(raw))
    (late,) = load_source(str(path))
    assert late.name == f"{path}:PPG" and late.offset == 5.0
    file([signal(x, rate, label="PPG")], annotations=[EdfAnnotation(0.5, None, "on")]).write(path)
    (whole,) = load_source(str(path))
    assert whole.name == f"{path}:PPG" and whole.offset == 0.0
