"""User files: a signal, or a table of them, in a .npy array, a CSV or a Parquet file.

A 1-D array or a single column is one signal; a 2-D array or a table of several columns is read as
one signal per row, unless `--channel` picks a column (`read_column`). Where short rows were more
likely channels, `rows_hint` says how to take one.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from vqlog import records
from vqlog.errors import DataError, one_line

_ROW = re.compile(r".*\.(npy|csv|parquet)\[\d+\]", re.IGNORECASE)  # `x.csv[3]`: a table's row 3


def read_table(path: Path) -> np.ndarray | list[np.ndarray]:
    """The numbers of a .npy, .csv or .parquet file: an array, or a CSV's rows (they may differ
    in length)."""
    read = {".npy": _read_npy, ".csv": _read_csv, ".parquet": _read_parquet}
    return read[path.suffix.lower()](path)


def read_column(path: Path, channel: str) -> tuple[np.ndarray, str]:
    """One named (or 0-based indexed) column of a CSV (with a header row) or Parquet table."""
    import pandas as pd

    try:
        # A CSV's header row needs a non-numeric cell, as in _read_csv: pandas would take a first
        # row of numbers for the column names and drop that sample.
        header = bool(column_names(path))
        df = (pd.read_parquet(path) if path.suffix.lower() == ".parquet"
              else pd.read_csv(path, header="infer" if header else None))
        gaps = [] if path.suffix.lower() == ".parquet" else _blank_rows(path, header)
    except (OSError, ValueError, ImportError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as a table ({why(exc)})") from None
    index = records.pick_channel([str(c) for c in df.columns], channel, str(path))
    column = df.iloc[:, index]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise DataError(f"{path}: column {column.name!r} is {column.dtype}, not numeric")
    values = column.to_numpy(np.float64, na_value=np.nan)
    # pandas skips blank lines, which joined the signal across them: each is a missing sample
    # (NaN, reported), as in _read_csv
    if gaps and gaps[-1] <= values.size:  # (else rows counted otherwise than pandas did)
        values = np.insert(values, gaps, np.nan)
    return values, str(column.name)


def _blank_rows(path: Path, header: bool) -> list[int]:
    """Where the blank lines between a CSV's first number and its last stand among its rows of
    data (the index of the row each comes before); blank lines outside them are none. Rows as
    the csv module reads them, so a quoted cell over several lines is one row, as for pandas."""
    gaps, rows, pending = [], -1 if header else 0, 0  # rows of data so far; blank lines since
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        for row in csv.reader(f):
            # pandas skips an empty line and one of spaces, not `""` (a NaN, as pandas writes it)
            if not row or (len(row) == 1 and row[0] and not row[0].strip(" \t")):
                pending += rows > 0
                continue
            gaps += [rows] * pending
            rows, pending = rows + 1, 0
    return gaps


def column_names(path: Path | str) -> list[str]:
    """A CSV's header row (its first non-blank row, if a cell is not a number) or a Parquet
    table's columns; [] for none, or a file that cannot be read."""
    try:
        if str(path).lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)  # pandas' stored index is no column of the table
            index = (schema.pandas_metadata or {}).get("index_columns", [])
            return [n for n in schema.names if n not in index]
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next((row for row in csv.reader(f) if any(c.strip() for c in row)), [])
    except (OSError, ValueError, UnicodeDecodeError, csv.Error, ImportError):
        return []  # the reader says what is wrong
    cells = [c.strip() for c in first]
    return cells if any(c and not _is_number(c) for c in cells) else []


def _read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # np.load would try unpickling anything else
        raise DataError(f"{path} is not a .npy array (pickles and .npz archives are not loaded); "
                        "save the signal with np.save(path, np.asarray(signal, dtype=float))")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        if "Object arrays" in str(exc):
            raise DataError(f"{path} holds Python objects (pickled data), which are not "
                            "loaded; save a numeric array: np.save(path, np.asarray(x, float))"
                            ) from None
        raise DataError(f"{path}: cannot read as .npy ({why(exc)}); "
                        "re-save it with np.save") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path} holds {arr.dtype} values, not real numbers; save a float array")
    return arr


def _read_csv(path: Path) -> np.ndarray | list[np.ndarray]:
    """Comma-separated numbers: one column is one signal, otherwise one signal per row.

    One header row is allowed (it needs a non-numeric cell: pandas' default "0,1,2" header reads
    as data); blank lines between rows and trailing empty cells are skipped, so rows (signals)
    may differ in length; an empty cell inside a row becomes NaN and is reported as such. In one
    column, a blank line between the first number and the last is an empty cell (pandas writes
    a NaN so): NaN, reported, never dropped, which would join the signal across the gap.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM, as Excel writes
            reader = csv.reader(f)
            lines = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({why(exc)}); "
                        "save it as UTF-8 text") from None
    rows = []  # (record, line, cells) of the records with a cell
    for record, (line_num, row) in enumerate(lines):
        cells = [c.strip() for c in row]
        while cells and not cells[-1]:
            cells.pop()
        if cells:
            rows.append((record, line_num, cells))
    if rows and not all(_is_number(c) for c in rows[0][2] if c):
        rows = rows[1:]  # a header row
    signals = []
    for _, line_num, cells in rows:
        bad = next((c for c in cells if c and not _is_number(c)), None)
        if bad is not None:
            raise DataError(f"{path}, line {line_num}: {bad!r} is not a number; the CSV must hold "
                            "numbers only (one header row is allowed)")
        signals.append(np.array([float(c) if c else np.nan for c in cells]))
    if signals and all(s.size == 1 for s in signals):  # one column: one long signal
        signal = np.full(rows[-1][0] - rows[0][0] + 1, np.nan)
        signal[[record - rows[0][0] for record, _, _ in rows]] = np.concatenate(signals)
        return signal
    return signals


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_parquet(path: Path) -> np.ndarray | list[np.ndarray]:
    """Numeric columns (one column is one signal, several a signal per row), or one list column."""
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"{path}: cannot read as Parquet ({why(exc)}); "
                        "check the file") from None
    if len(df) and df.shape[1] == 1 and df.dtypes.iloc[0] == object and np.ndim(df.iloc[0, 0]) == 1:
        try:  # one signal per row, stored as a list column
            return [np.asarray(v, dtype=np.float64) for v in df.iloc[:, 0]]
        except (TypeError, ValueError):
            pass  # fall through to the column-type error
    for name, dtype in df.dtypes.items():
        if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_complex_dtype(dtype):
            raise DataError(f"{path}: column '{name}' is {dtype}, not numeric; "
                            "keep only signal columns")
    return df.to_numpy(dtype=np.float64, na_value=np.nan)


def rows_hint(names: list[str]) -> str:
    """For recordings that are the rows of one table (`x.npy[3]`): perhaps its columns were
    meant as channels; a CSV's header row or a Parquet table's columns are named."""
    if len(names) < 2 or not all(_ROW.fullmatch(name) for name in names):
        return ""  # (a record's stretches, `rec:PLETH[0:500]`, are no table's rows)
    path = names[0].rsplit("[", 1)[0]
    if path.lower().endswith(".npy"):
        take = "save one as a 1-D array (np.save(path, x[:, k]))"
    else:
        columns = [c for c in column_names(path) if c]
        shown = ", ".join(columns[:8]) + (f", ... {len(columns) - 8} more" if len(columns) > 8
                                          else "")
        take = "take one with --channel NAME|INDEX" + (f" (its columns: {shown})" if columns
                                                       else "")
    return (f"the file is read as one signal per row ({len(names)} rows): if its columns are "
            f"channels, {take}")


def why(exc: BaseException) -> str:
    return one_line(exc) or type(exc).__name__
