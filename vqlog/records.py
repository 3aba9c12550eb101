"""Multi-channel recordings in the field's own formats, each channel at its own sample rate:
PhysioNet's WFDB records (read with the `wfdb` package) and EDF/BDF files (read with `edfio`).

`--data` names a WFDB record by its path without extension (`data/100` for `data/100.hea` and
its signal files) and an EDF/BDF file by its path; `--channel` picks one signal by name or by
0-based index, and may be left out when there is only one. The rate is the record's own.
`vqlog.sources` calls these; they return (signal, rate, name of the channel), and for EDF/BDF
where the stretches of a discontinuous (EDF+D) file start.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np

from vqlog.errors import DataError, one_line

EDF_SUFFIXES = (".edf", ".bdf")


def is_wfdb_record(source: str) -> bool:
    """Whether `source` names a WFDB record: `<source>.hea` exists (or `source` is the header)."""
    path = Path(source).expanduser()
    return path.suffix.lower() == ".hea" or Path(f"{path}.hea").is_file()


def pick_channel(names: list[str], channel: str | None, where: str) -> int:
    """The index of `channel` (a name, or a 0-based index) among `names`."""
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    if channel is None:
        if len(names) == 1:
            return 0
        raise DataError(f"{where} has {len(names)} channels ({listing}); choose one with "
                        "--channel NAME|INDEX (data.channel in a spec)")
    channel = str(channel)  # an int index from Python
    if channel in names:
        return names.index(channel)
    if channel.strip().isdigit() and channel.isascii() and int(channel) < len(names):  # not "²"
        return int(channel)
    raise DataError(f"{where}: no channel {channel!r}; its channels are {listing}")


def read_wfdb(source: str, channel: str | None) -> tuple[np.ndarray, float, str]:
    """One channel of a WFDB record, in physical units, at its own rate: a channel with several
    samples per frame keeps them all (fs x samples per frame), not wfdb's per-frame average.
    A multi-segment record (MIMIC's layout) is read across its segments; its channels are those
    of its layout header (a variable layout) or of its segments (a fixed one)."""
    record = source[:-4] if source.lower().endswith(".hea") else source
    path = str(Path(record).expanduser())  # `~` in a spec file, where no shell expands it
    if not Path(f"{path}.hea").is_file():
        raise DataError(f"WFDB record {record}: its header {record}.hea is missing; give the "
                        "record's path without extension, beside its .hea and signal files")
    with warnings.catch_warnings():  # wfdb's own deprecation warnings of pandas calls
        warnings.filterwarnings("ignore", module="wfdb")
        import wfdb

        try:
            index = pick_channel(wfdb_channels(path), channel, f"WFDB record {record}")
            data = wfdb.rdrecord(path, channels=[index], physical=True, smooth_frames=False)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - wfdb raises many kinds on broken records
            raise DataError(f"WFDB record {record} cannot be read ({one_line(exc, 200)}); "
                            "check its header and signal files") from None
    rate = float(data.fs) * data.samps_per_frame[0]
    return np.asarray(data.e_p_signal[0], np.float64), rate, data.sig_name[0]


def wfdb_channels(record: str) -> list[str]:
    """The channel names of a WFDB record; for a multi-segment record, those of the first
    segment header that has any (the layout header of a variable layout comes first)."""
    import wfdb

    header = wfdb.rdheader(record)
    if header.sig_name is not None:
        return list(header.sig_name)
    segments = wfdb.rdheader(record, rd_segments=True).segments or []
    return next((list(seg.sig_name) for seg in segments if seg is not None and seg.sig_name), [])


def read_edf(path: Path, channel: str | None
             ) -> tuple[np.ndarray, float, str, list[tuple[int, float]]]:
    """One signal of an EDF or BDF file, in physical units (annotations are not signals), and
    where its contiguous stretches start: (first sample, seconds from the file's start time),
    one for a continuous file; an EDF+D file with gaps between its data records has more."""
    import edfio

    try:
        with open(path, "rb") as f:  # by the header, not the suffix: BDF's starts 0xFF BIOSEMI
            bdf = f.read(8) == b"\xffBIOSEMI"
        with warnings.catch_warnings(record=True) as said:  # edfio's, with its file and line
            warnings.simplefilter("always")
            edf = (edfio.read_bdf if bdf else edfio.read_edf)(path)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise DataError(f"{path} is not a readable EDF or BDF file "
                        f"({one_line(exc, 200)})") from None
    for warning in said:  # e.g. a file cut short: "header indicates 120 data records, but ..."
        logging.getLogger("vqlog").warning("vqlog: %s: %s", path, one_line(warning.message, 300))
    signals = list(edf.signals)
    if not signals:
        raise DataError(f"{path} holds no signals")
    index = pick_channel([s.label for s in signals], channel, str(path))
    signal = signals[index]
    data = np.asarray(signal.data, np.float64)
    starts = [(0, 0.0)]
    n_records = edf.num_data_records  # edfio's count: a file cut short has fewer than it says
    if edf.reserved.startswith(("EDF+D", "BDF+D")) and n_records >= 1:
        # EDF+D: its records' onsets say where the gaps are (EDF+C and EDF are continuous)
        onsets = record_onsets(path, bdf, n_records)
        per_record = data.size // n_records
        step = edf.data_record_duration
        starts = [(r * per_record, onset) for r, onset in enumerate(onsets)
                  if r == 0 or abs(onset - onsets[r - 1] - step) > 1e-6 + 1e-4 * step]
    return data, float(signal.sampling_frequency), signal.label, starts


def record_onsets(path: Path, bdf: bool, n_records: int) -> list[float]:
    """Each data record's onset in seconds, from its time-keeping annotation: the first TAL of
    the annotation signal in the record ("+onset", then 21 and a duration or 20), as the EDF+
    specification lays the file out. edfio reads them only to tell whether a file is
    continuous, and its bytes of annotation text must be UTF-8; these are numbers only."""
    width = 3 if bdf else 2  # bytes a sample
    with open(path, "rb") as f:
        head = f.read(256)
        header_bytes, n = int(head[184:192]), int(head[252:256])
        fields = f.read(n * 256)
        labels = [fields[16 * i:16 * i + 16].decode("ascii", "replace").strip() for i in range(n)]
        at = n * (16 + 80 + 8 * 5 + 80)  # label ... prefiltering, then samples a record
        samples = [int(fields[at + 8 * i:at + 8 * i + 8]) for i in range(n)]
        annotations = next((i for i, label in enumerate(labels)
                            if label in ("EDF Annotations", "BDF Annotations")), None)
        if annotations is None:
            raise DataError(f"{path} says EDF+D but has no annotation signal to place its "
                            "records in time")
        record = width * sum(samples)
        before, size = width * sum(samples[:annotations]), width * samples[annotations]
        onsets = []
        for r in range(n_records):
            f.seek(header_bytes + r * record + before)
            tal = f.read(size)
            try:
                onsets.append(float(re.match(rb"[+-][0-9.]+", tal).group()))
            except (AttributeError, ValueError):
                raise DataError(f"{path}: data record {r} has no time-keeping annotation; the "
                                "file is not valid EDF+D") from None
    return onsets


def stretches(signal: np.ndarray, starts: list[tuple[int, float]], name: str
              ) -> list[tuple[str, np.ndarray, float]]:
    """An EDF/BDF signal cut at `read_edf`'s starts: (the part's place in the file as a name
    suffix, its samples, its onset); a flat or 1-sample part is left out. One part keeps the
    signal's name."""
    if len(starts) == 1:
        return [("", signal, starts[0][1])]
    ends = [a for a, _ in starts[1:]] + [signal.size]
    kept = [(f"[{a}:{b}]", signal[a:b], onset) for (a, onset), b in zip(starts, ends)
            if b - a >= 2 and np.ptp(signal[a:b]) > 0]
    if not kept:
        raise DataError(f"{name}: every stretch between its gaps is flat or a single sample")
    return kept
