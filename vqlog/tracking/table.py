"""The experiment table: MLflow trial runs -> markdown in the research log's own columns.

`render_table` is a pure function of `TrialRow`s; `fetch_rows` reads them from MLflow, so any worker
(or `vqlog table`) can regenerate `results/<study>.md` at any time. See the README, "The
experiment table". Columns, in the log's order:

    | run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity |

followed, as an extension, by one column per other param that varies within the table (in
`Config` field order), so a sweep over the log's params alone gives exactly the log's columns.
The Chinese log uses the same English column names; `lang="zh"` changes headings and labels only.
"""

from __future__ import annotations

import os
import re
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from vqlog.config import known_keys
from vqlog.errors import one_line
from vqlog.files import write_text
from vqlog.oscillation import check_lang
from vqlog.tracking.cells import TEXT, legend, metric, row_cells
from vqlog.tracking.rows import TrialRow, fetch_rows

if TYPE_CHECKING:  # mlflow is slow to import; only the MLflow-facing functions need it
    from mlflow import MlflowClient

LOG_COLUMNS = ("run", "batch", "lr", "embedding_dim", "embedding_num", "iteration", "BN", "MLP",
               "En-De", "loss", "perplexity")
LOG_PARAMS = LOG_COLUMNS[1:9]  # the columns that are params as logged
SHOWN_STATES = ("COMPLETE", "PRUNED", "FAIL")  # finished trials; RUNNING (and anything else) is left out
DESCRIPTION_LIMIT = 8000  # characters: MLflow's limit on a tag value (the run's description)
BEST_MARK = " ★"  # after the run name of each table's best completed trial
TABLE_JSON = "experiment_table.json"  # the study run's table as an MLflow table
_PARAM_ORDER = {name: i for i, name in enumerate(known_keys())}
_KEYS: dict[tuple, tuple] = {}  # what a row's cells were rendered for, one object per value


# --- rendering (pure) -------------------------------------------------------------------------

class _Slot:
    """What a table works out about one row object, once: what its passes over all rows read
    (kept together here, so that a refresh need not touch the rows themselves, scattered over
    the heap), its place by the study's objective and among the best trials a description
    shows, and its cells, markdown line and JSON record as last rendered, with what for."""

    __slots__ = ("row", "number", "origin", "shown", "quantized", "queued", "best", "rank",
                 "key", "cells", "line", "layout", "record")

    def __init__(self, row: TrialRow) -> None:
        mse = metric(row, "final_val_mse")
        scored = row.state == "COMPLETE" and mse is not None
        self.row, self.number, self.queued = row, row.number, row.queued
        self.origin = row.number if row.retry_of is None else row.retry_of  # its retry chain
        self.shown = row.state in SHOWN_STATES  # finished
        self.quantized = row.params.get("quantizer") != "none"
        # the study's best by its own objective (as `study.worker.best_trial` picks it): the
        # lowest final val MSE among COMPLETE trials; on a tie the higher perplexity (a pareto
        # study's front), then the lower number
        self.best = (mse, -(metric(row, "max_val_perplexity") or 0.0), row.number) if scored \
            else None
        self.rank = (mse, row.number) if scored and not row.queued else None
        self.key = self.cells = self.line = self.layout = self.record = None


class RenderCache:
    """What a table has worked out about its rows, so that the next refresh works out only the
    rows that changed: a table of 10,000 trials then costs a few plain passes over its rows and
    joining its lines. A row's `_Slot` is keyed by the row object (`RowCache` hands out the same
    `TrialRow` while its run is unchanged) and dropped once its row has left the table."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._last: tuple | None = None  # (rows, lang, sections) of the last whole table
        self._counts: dict[bool, _ParamCounts] = {}  # per section (quantized or not)

    def sections(self, rows: Sequence[TrialRow], lang: str):
        """`_sections` of `rows`, worked out once for the refresh that renders, describes and
        publishes the same list of rows."""
        if self._last is None or self._last[0] is not rows or self._last[1] != lang:
            self._last = (rows, lang, _sections(rows, lang, self, whole=True))
        return self._last[2]

    def counts(self, quantized: bool) -> _ParamCounts:
        return self._counts.setdefault(quantized, _ParamCounts())

    def slots(self, rows: Iterable[TrialRow]) -> list[_Slot]:
        known, slots = self._slots, []
        for row in rows:
            slot = known.get(id(row))
            if slot is None or slot.row is not row:  # new, or an id reused by a newer row
                slot = known[id(row)] = _Slot(row)
            slots.append(slot)
        return slots

    def keep(self, rows: Sequence[TrialRow]) -> None:
        """Forget rows that are not in `rows` (the table's current ones), now and then."""
        if len(self._slots) > 2 * len(rows) + 100:
            live = {id(r) for r in rows}
            self._slots = {k: v for k, v in self._slots.items() if k in live}


class _ParamCounts:
    """How many of a whole table's rows have each param, and each of its values, kept as rows
    come and go between refreshes: the varying columns without a pass over every row's params."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}  # the rows counted (kept alive: their ids stay theirs)
        self._having: dict[str, int] = {}
        self._values: dict[str, dict[str, int]] = {}

    def varying(self, slots: list[_Slot]) -> set[str]:
        now = {id(slot): slot for slot in slots}
        for gone in self._slots.keys() - now.keys():
            self._count(self._slots[gone], -1)
        for new in now.keys() - self._slots.keys():
            self._count(now[new], 1)
        self._slots = now
        return {name for name, having in self._having.items()
                if having < len(now) or len(self._values[name]) > 1}

    def _count(self, slot: _Slot, step: int) -> None:
        for name, value in slot.row.params.items():
            values = self._values.setdefault(name, {})
            values[value] = values.get(value, 0) + step
            self._having[name] = self._having.get(name, 0) + step
            if not values[value]:
                del values[value]
            if not self._having[name]:
                del self._having[name], self._values[name]


def render_table(rows: Sequence[TrialRow], lang: str = "en", title: str | None = None,
                 note: str | None = None, cache: RenderCache | None = None) -> str:
    """Markdown: the tuning table, then the no-quantizer table, each only when it has rows;
    `note`, a line after the tables (render_description's count of the rows left out).
    `cache`: rows rendered before are not rendered again."""
    return _render(*(cache or RenderCache()).sections(rows, lang), lang, title, note)


def _render(finished: list[_Slot], sections: list[tuple], lang: str, title: str | None,
            note: str | None) -> str:
    parts = [f"# {title}"] if title else []
    for heading, header, body in sections:
        lines = [_line(header), _line(["---"] * len(header)), *(line for _, _, line in body)]
        parts += [f"## {heading}", "\n".join(lines)]
    if note:
        parts.append(note)
    if finished:
        starred = any(cells[0].endswith(BEST_MARK) for *_, body in sections for _, cells, _ in body)
        parts.append("\n".join(legend(lang)[0 if starred else 1:]))  # (★'s line first)
    elif not note:
        parts.append(TEXT[lang]["empty"])
    return "\n\n".join(parts) + "\n"


def render_description(rows: Sequence[TrialRow], lang: str = "en", title: str | None = None,
                       limit: int = DESCRIPTION_LIMIT, text: str | None = None,
                       cache: RenderCache | None = None) -> str:
    """The table as the study run's description in the MLflow UI, within MLflow's tag limit:
    the whole table when it fits, else the log's own (queued) rows and as many of the best
    trials (lowest final val MSE) as fit, whole rows only, and a line saying how many more rows
    `experiment_table.md` holds. `text`: the whole table, if already rendered."""
    cache = cache or RenderCache()
    text = text if text is not None else render_table(rows, lang, title, cache=cache)
    if len(text) <= limit:
        return text
    finished = cache.sections(rows, lang)[0]
    queued = [slot.row for slot in finished if slot.queued]
    ranks = [(slot.rank, slot.row) for slot in finished if slot.rank is not None]
    ranked = [r for _, r in sorted(ranks, key=lambda pair: pair[0])]  # (mse, number): unique

    # Each table's ★ row of the whole table, always shown: the ranks run across both tables, so
    # a cut could leave a table's best out and put the ★ on another of its rows.
    starred = [min(group, key=lambda slot: slot.best).row
               for group in ([s for s in finished if s.quantized == q and s.best is not None]
                             for q in (True, False)) if group]

    def fitted(k: int) -> str:
        picked = queued + starred + ranked[:k]
        shown = list({id(row): row for row in picked}.values())  # each row once, first place kept
        more = TEXT[lang]["more_rows"].format(n=len(finished) - len(shown))
        return _render(*_sections(shown, lang, cache), lang, title, more)

    def fits(k: int) -> bool:
        return len(fitted(k)) <= limit

    # The most rows that fit: the longest prefix of `ranked` (the text grows with k), found by
    # doubling k while it fits and then bisecting, so that only about as many rows as fit are
    # rendered; at least the best trial, so that the ★ stands where the table has it.
    low, high = min(1, len(ranked)), len(ranked)
    probe = max(1, low)
    while probe < high:
        probe = min(high, 2 * probe)
        if fits(probe):
            low = probe
        else:
            high = probe - 1
            break
    while low < high:
        k = (low + high + 1) // 2
        if fits(k):
            low = k
        else:
            high = k - 1
    described = fitted(low)
    if len(described) > limit:  # not even the log's rows and the best fit: the note alone
        more = TEXT[lang]["more_rows"].format(n=len(finished))
        described = render_table([], lang, title, note=more)
    return described


def table_records(rows: Sequence[TrialRow], lang: str = "en",
                  cache: RenderCache | None = None) -> list[dict[str, str]]:
    """The same table as records, column -> cell, with the table's heading under "table": what
    the study run logs as an MLflow table artifact (a sortable grid in the UI)."""
    _, sections = (cache or RenderCache()).sections(rows, lang)
    return [{"table": heading, **dict(zip(header, cells))}
            for heading, header, body in sections for _, cells, _ in body]


def table_json(rows: Sequence[TrialRow], lang: str = "en",
               cache: RenderCache | None = None) -> str:
    """`table_records` as the JSON of an MLflow table artifact: pandas' "split" orientation
    (columns, then one list of cells per row), which `MlflowClient.load_table` reads. Each
    row's record is encoded once (`cache`), the whole is what `json.dumps` writes."""
    import json

    cache = cache or RenderCache()
    _, sections = cache.sections(rows, lang)
    columns = ["table"] + list(dict.fromkeys(c for _, header, _ in sections for c in header))
    data = []
    for heading, header, body in sections:
        where = [columns.index(c) for c in header]
        layout = (heading, tuple(columns))
        for slot, cells, _ in body:
            if cells is not slot.cells:  # the best row's, with its mark: not kept
                data.append(_json_record(heading, cells, where, len(columns)))
                continue
            if slot.layout != layout:
                slot.record, slot.layout = _json_record(heading, cells, where, len(columns)), layout
            data.append(slot.record)
    return '{"columns": ' + json.dumps(columns, ensure_ascii=False) + ', "data": [' \
        + ", ".join(data) + "]}"


def _json_record(heading: str, cells: list[str], where: list[int], width: int) -> str:
    import json

    record: list[str | None] = [heading] + [None] * (width - 1)
    for i, cell in zip(where, cells):
        record[i] = cell
    return json.dumps(record, ensure_ascii=False)


def shown_rows(rows: Iterable[TrialRow], cache: RenderCache | None = None) -> list[TrialRow]:
    """The rows the table of `rows` shows (a retry chain is one row), by number."""
    return [slot.row for slot in _finished((cache or RenderCache()).slots(rows))]


def _finished(slots: list[_Slot]) -> list[_Slot]:
    """The rows a table shows: finished trials, a retry chain (a trial and its retries) as its
    latest finished one, by number."""
    latest: dict[int, _Slot] = {}
    for slot in slots:
        if slot.shown and (slot.origin not in latest or slot.number > latest[slot.origin].number):
            latest[slot.origin] = slot
    return sorted(latest.values(), key=attrgetter("number"))


def _sections(rows: Iterable[TrialRow], lang: str, cache: RenderCache, whole: bool = False
              ) -> tuple[list[_Slot], list[tuple]]:
    """The finished rows shown, and (heading, header cells, body) per table; the body is a
    (slot, cells, markdown line) triple per row. `whole`: the table's rows (not a description's
    few), whose param counts `cache` keeps from one refresh to the next."""
    check_lang(lang)
    text = TEXT[lang]
    finished = _finished(cache.slots(rows))
    tuning = [slot for slot in finished if slot.quantized]
    baseline = [slot for slot in finished if not slot.quantized]
    sections = [(heading, *_cells(group, lang, quantized,
                                  cache.counts(quantized) if whole else None))
                for heading, group, quantized in ((text["tuning"], tuning, True),
                                                  (text["baseline"], baseline, False)) if group]
    return finished, sections


def _cells(slots: list[_Slot], lang: str, quantized: bool, counts: _ParamCounts | None
           ) -> tuple[list[str], list[tuple[_Slot, list[str], str]]]:
    extras = _varying_extras([slot.row for slot in slots]) if counts is None \
        else _ordered(counts.varying(slots))
    best = min((slot.best for slot in slots if slot.best is not None), default=None)
    best_number = best[2] if best is not None else None
    key = _KEYS.setdefault((lang, quantized, extras), (lang, quantized, extras))
    body = []
    for slot in slots:
        if slot.key is not key:  # new, or the table's columns changed
            slot.cells = row_cells(slot.row, lang, quantized, extras)
            slot.line, slot.key, slot.layout = _line(slot.cells), key, None
        if slot.number == best_number:
            cells = [slot.cells[0] + BEST_MARK, *slot.cells[1:]]
            body.append((slot, cells, _line(cells)))
        else:
            body.append((slot, slot.cells, slot.line))
    return list(LOG_COLUMNS + extras), body


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_escape(c) for c in cells) + " |"


def _escape(cell: str) -> str:
    """One line, and a `|` that does not end the cell."""
    return one_line(cell).replace("|", r"\|")


def _varying_extras(rows: list[TrialRow]) -> tuple[str, ...]:
    """The params besides the log's that differ between rows (missing in a row counts as a
    value of its own), in one pass over the rows."""
    first: dict[str, str] = {}
    seen: dict[str, int] = {}
    varying: set[str] = set()
    for r in rows:
        for name, value in r.params.items():
            if name in first:
                seen[name] += 1
                if value != first[name]:
                    varying.add(name)
            else:
                first[name], seen[name] = value, 1
    varying.update(n for n, count in seen.items() if count < len(rows))
    return _ordered(varying)


def _ordered(varying: set[str]) -> tuple[str, ...]:
    """The extra columns: the log's params left out, then in `Config` field order."""
    varying = varying - set(LOG_PARAMS)
    return tuple(sorted(varying, key=lambda n: (_PARAM_ORDER.get(n, len(_PARAM_ORDER)), n)))


def table_path(folder: str | os.PathLike, study: str) -> Path:
    """`<folder>/<study>.md`, always inside `folder`: a name another tool wrote into a shared
    store may hold any character, so everything but letters, digits and '._-' becomes '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study)[:64].lstrip(".") or "_"
    return Path(folder) / f"{safe}.md"


def regenerate(client: MlflowClient, study: str, out_path: str | os.PathLike, lang: str = "en") -> str:
    """Fetch the study's trials from MLflow, render the table, write it atomically; return the markdown."""
    check_lang(lang)
    text = render_table(fetch_rows(client, study), lang=lang, title=study)
    write_text(out_path, text, crash_point="table.write")
    return text


LANG_TAG = "vqlog.lang"  # study run tag: the language of the table published on it (--lang)


def publish_table(client, parent_id: str, rows, study: str, lang: str, text: str,
                  cache: RenderCache | None = None, mark: bool = True, sweep: bool = True) -> None:
    """The table on the study run: `experiment_table.md` (the whole of it, `text`), the run's
    description in the MLflow UI (what fits MLflow's tag limit, in whole rows), and
    `experiment_table.json`, an MLflow table the UI shows as a sortable grid.

    The JSON is written in the layout `log_table` writes (pandas' "split" orientation) and
    marked as a table with MLflow's `mlflow.loggedArtifacts` tag, because `log_table` appends
    to an existing file: each refresh would add the whole table again. That tag never changes:
    `mark=False` leaves it as an earlier refresh set it (one request fewer). A sweep's (`sweep`)
    also sets the study run's `vqlog.lang` tag: the language of its table, which `vqlog table`
    keeps (a preview in another language never sets it)."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    client.log_text(parent_id, text, "experiment_table.md")
    client.set_tag(parent_id, "mlflow.note.content",
                   render_description(rows, lang, study, text=text, cache=cache))
    client.log_text(parent_id, table_json(rows, lang, cache), TABLE_JSON)
    if mark:
        client.set_tag(parent_id, MLFLOW_LOGGED_ARTIFACTS,
                       json.dumps([{"path": TABLE_JSON, "type": "table"}]))
        if sweep:
            client.set_tag(parent_id, LANG_TAG, lang)
