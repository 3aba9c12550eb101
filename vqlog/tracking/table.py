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
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

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
_PARAM_ORDER = {name: i for i, name in enumerate(known_keys())}
def _latest_of_each_retry_chain(rows: list[TrialRow]) -> list[TrialRow]:
    """A trial and its retries are one row: the latest finished one's."""
    latest: dict[int, TrialRow] = {}
    for row in rows:
        origin = row.number if row.retry_of is None else row.retry_of
        if origin not in latest or row.number > latest[origin].number:
            latest[origin] = row
    return list(latest.values())


# --- rendering (pure) -------------------------------------------------------------------------

class RenderCache:
    """The rendered cells of the rows a table has shown, so that the next refresh renders only
    the rows that changed: a table of 10,000 trials then costs little more than joining its
    lines. Entries are keyed by the row object (`RowCache` hands out the same `TrialRow` while
    its run is unchanged) and dropped once their row has left the table."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[TrialRow, list[str], str]] = {}
        self._last: tuple | None = None  # (rows, lang, sections) of the last whole table

    def sections(self, rows: Sequence[TrialRow], lang: str):
        """`_sections` of `rows`, worked out once for the refresh that renders, describes and
        publishes the same list of rows."""
        if self._last is None or self._last[0] is not rows or self._last[1] != lang:
            self._last = (rows, lang, _sections(rows, lang, self))
        return self._last[2]

    def get(self, row: TrialRow, lang: str, quantized: bool, extras: tuple[str, ...]):
        key = (id(row), lang, quantized, extras)
        entry = self._entries.get(key)
        if entry is None or entry[0] is not row:  # an id reused by a newer row
            cells = row_cells(row, lang, quantized, extras)
            entry = self._entries[key] = (row, cells, _line(cells))
        return entry[1], entry[2]

    def keep(self, rows: Sequence[TrialRow]) -> None:
        """Forget rows that are not in `rows` (the table's current ones), now and then."""
        if len(self._entries) > 4 * len(rows) + 100:
            live = {id(r) for r in rows}
            self._entries = {k: v for k, v in self._entries.items() if k[0] in live}


def render_table(rows: Sequence[TrialRow], lang: str = "en", title: str | None = None,
                 note: str | None = None, cache: RenderCache | None = None) -> str:
    """Markdown: the tuning table, then the no-quantizer table, each only when it has rows;
    `note`, a line after the tables (render_description's count of the rows left out).
    `cache`: rows rendered before are not rendered again."""
    sections = _sections(rows, lang) if cache is None else cache.sections(rows, lang)
    return _render(*sections, lang, title, note)


def _render(finished: list[TrialRow], sections: list[tuple], lang: str, title: str | None,
            note: str | None) -> str:
    parts = [f"# {title}"] if title else []
    for heading, header, body in sections:
        lines = [_line(header), _line(["---"] * len(header)), *(line for _, line in body)]
        parts += [f"## {heading}", "\n".join(lines)]
    if note:
        parts.append(note)
    if finished:
        parts.append("\n".join(legend(lang)))
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
    text = text if text is not None else render_table(rows, lang, title, cache=cache)
    if len(text) <= limit:
        return text
    finished = _finished(rows)
    queued = [r for r in finished if r.queued]
    ranked = sorted((r for r in finished if not r.queued and r.state == "COMPLETE"
                     and metric(r, "final_val_mse") is not None),
                    key=lambda r: (metric(r, "final_val_mse"), r.number))

    def fitted(k: int) -> str:
        shown = queued + ranked[:k]
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
    _, sections = _sections(rows, lang) if cache is None else cache.sections(rows, lang)
    return [{"table": heading, **dict(zip(header, cells))}
            for heading, header, body in sections for cells, _ in body]


def table_json(rows: Sequence[TrialRow], lang: str = "en",
               cache: RenderCache | None = None) -> str:
    """`table_records` as the JSON of an MLflow table artifact: pandas' "split" orientation
    (columns, then one list of cells per row), which `MlflowClient.load_table` reads."""
    import json

    _, sections = _sections(rows, lang) if cache is None else cache.sections(rows, lang)
    columns = ["table"] + list(dict.fromkeys(c for _, header, _ in sections for c in header))
    data = []
    for heading, header, body in sections:
        where = [columns.index(c) for c in header]
        for cells, _ in body:
            record: list[str | None] = [heading] + [None] * (len(columns) - 1)
            for i, cell in zip(where, cells):
                record[i] = cell
            data.append(record)
    return json.dumps({"columns": columns, "data": data}, ensure_ascii=False)


def _finished(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The rows a table shows: finished trials, a retry chain as its latest, by number."""
    return sorted(_latest_of_each_retry_chain([r for r in rows if r.state in SHOWN_STATES]),
                  key=lambda r: r.number)


def _sections(rows: Sequence[TrialRow], lang: str, cache: RenderCache | None = None
              ) -> tuple[list[TrialRow], list[tuple]]:
    """The finished rows shown, and (heading, header cells, body) per table; the body is a
    (cells, markdown line) pair per row."""
    check_lang(lang)
    text = TEXT[lang]
    finished = _finished(rows)
    tuning = [r for r in finished if r.params.get("quantizer") != "none"]
    baseline = [r for r in finished if r.params.get("quantizer") == "none"]
    sections = [(heading, *_cells(group, lang, quantized, cache))
                for heading, group, quantized in ((text["tuning"], tuning, True),
                                                  (text["baseline"], baseline, False)) if group]
    return finished, sections


def _cells(rows: list[TrialRow], lang: str, quantized: bool, cache: RenderCache | None
           ) -> tuple[list[str], list[tuple[list[str], str]]]:
    extras = _varying_extras(rows)
    best = _best_number(rows)
    body = []
    for row in rows:
        if cache is not None:
            cells, line = cache.get(row, lang, quantized, extras)
        else:
            cells = row_cells(row, lang, quantized, extras)
            line = _line(cells)
        if row.number == best:
            cells = [cells[0] + BEST_MARK, *cells[1:]]
            line = _line(cells)
        body.append((cells, line))
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
    varying -= set(LOG_PARAMS)
    return tuple(sorted(varying, key=lambda n: (_PARAM_ORDER.get(n, len(_PARAM_ORDER)), n)))


def _best_number(rows: list[TrialRow]) -> int | None:
    """The study's best by its own objective (as `study.worker.best_trial` picks it): the
    lowest final val MSE among COMPLETE trials; on a tie the higher perplexity (a pareto
    study's front), then the lower number."""
    scored = []
    for r in rows:
        mse = metric(r, "final_val_mse")
        if r.state == "COMPLETE" and mse is not None:
            scored.append((mse, -(metric(r, "max_val_perplexity") or 0.0), r.number))
    return min(scored)[2] if scored else None


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
