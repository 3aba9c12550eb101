"""Multi-channel recordings in the field's own formats, each channel at its own sample rate:
PhysioNet's WFDB records (read with the `wfdb` package) and EDF/BDF files (read with `edfio`).

`--data` names a WFDB record by its path without extension (`data/100` for `data/100.hea` and
its signal files) and an EDF/BDF file by its path; `--channel` picks one signal by name or by
0-based index, and may be left out when there is only one. The rate is the record's own.
`vqlog.sources` calls these; they return (signal, rate, name of the channel).
"""

from __future__ import annotations

import logging
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
    if channel.strip().isdigit() and int(channel) < len(names):
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


def read_edf(path: Path, channel: str | None) -> tuple[np.ndarray, float, str]:
    """One signal of an EDF or BDF file, in physical units (annotations are not signals)."""
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
    return np.asarray(signal.data, np.float64), float(signal.sampling_frequency), signal.label
