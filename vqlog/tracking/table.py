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

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from vqlog.config import known_keys
from vqlog.errors import one_line
from vqlog.files import write_text
from vqlog.oscillation import LABELS, LANGS, THRESHOLDS, check_lang, oscillation_label
from vqlog.tracking.rows import TrialRow, fetch_rows, run_name

if TYPE_CHECKING:  # mlflow is slow to import; only the MLflow-facing functions need it
    from mlflow import MlflowClient

LOG_COLUMNS = ("run", "batch", "lr", "embedding_dim", "embedding_num", "iteration", "BN", "MLP",
               "En-De", "loss", "perplexity")
LOG_PARAMS = LOG_COLUMNS[1:9]  # the columns that are params as logged
SHOWN_STATES = ("COMPLETE", "PRUNED", "FAIL")  # finished trials; RUNNING (and anything else) is left out
DESCRIPTION_LIMIT = 8000  # characters: MLflow's limit on a tag value (the run's description)
BEST_MARK = " ★"  # after the run name of each table's best completed trial
_PARAM_ORDER = {name: i for i, name in enumerate(known_keys())}
# Every piece of text the table shows: key -> (English, the log's Chinese).
_WORDS = {
    "tuning": ("Hyper-parameter tuning (trained on train, evaluated on valid)",
               "超参调整 (based on train，test on valid)"),
    "baseline": ("How well S4D itself works (no quantizer)", "s4d本身的工作效果"),
    "empty": ("No finished trials yet.", "暂无已完成的试验。"),
    "loss": ("{final} (best {best})", "{final}（最佳 {best}）"),
    "loss_best": ("best {best}", "最佳 {best}"),
    "ppl_max_at": ("max {max} @ {step}", "最高{max} ({step}轮)"),
    "ppl_max": ("max {max}", "最高{max}"),
    "ppl_final": ("final {final}", "最终{final}"),
    "join": (", ", "，"),
    "state_join": ("; ", "；"),
    "colon": (": ", "："),
    "pruned": ("pruned", "提前停止"),
    "pruned_at": ("pruned @ {it}", "提前停止 ({it}轮)"),
    "failed": ("failed", "失败"),
    "diverged": ("diverged", "发散"),
    "diverged_at": ("diverged @ {it}", "发散 ({it}轮)"),
    "resumed_at": ("resumed @ {it}", "从{it}轮继续"),
    "more_rows": ("… and {n} more rows: the whole table is experiment_table.md, an artifact of "
                  "this run.", "……另有 {n} 行：完整的表是本运行的文件 experiment_table.md。"),
    "legend": ((
        "- ★ best of its table by the study's objective: lowest final val MSE among completed "
        "trials (a tie goes to the higher perplexity).",
        "- loss: final val MSE (best val MSE), then the train/loss oscillation label "
        "(score `loss_oscillation`): {stable} < {a} ≤ {mild} < {b} ≤ {severe}; \"early …\" and "
        "\"… worse later\" compare the first third of training with the whole.",
        "- perplexity: codebook perplexity on the whole valid set, its maximum @ iteration and "
        "the final value.",
    ), (
        "- ★ 按研究目标本表最佳：已完成试验中最终 val MSE 最低（相同时取 perplexity 较高者）。",
        "- loss：最终 val MSE（最佳 val MSE），再加 train/loss 震荡标签"
        "（分数 `loss_oscillation`）：{stable} < {a} ≤ {mild} < {b} ≤ {severe}；"
        "“前期…”与“…后期加剧”比较训练前三分之一与全程。",
        "- perplexity：整个 valid 集上的 codebook perplexity，最高值 (轮数) 与最终值。",
    )),
}
_TEXT = {lang: {key: words[i] for key, words in _WORDS.items()} for i, lang in enumerate(LANGS)}
_NAN_INF = re.compile(r"\b(nan|inf|infinity|diverged?)\b", re.IGNORECASE)
_AT_ITERATION = re.compile(r"iteration\s+(\d+)", re.IGNORECASE)
_MAX_REASON = 80  # characters of a failure reason shown in a cell
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
            cells = _row_cells(row, lang, quantized, extras)
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
        parts.append("\n".join(_legend(lang)))
    elif not note:
        parts.append(_TEXT[lang]["empty"])
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
                     and _metric(r, "final_val_mse") is not None),
                    key=lambda r: (_metric(r, "final_val_mse"), r.number))

    def fitted(k: int) -> str:
        shown = queued + ranked[:k]
        more = _TEXT[lang]["more_rows"].format(n=len(finished) - len(shown))
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
        more = _TEXT[lang]["more_rows"].format(n=len(finished))
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
    text = _TEXT[lang]
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
            cells = _row_cells(row, lang, quantized, extras)
            line = _line(cells)
        if row.number == best:
            cells = [cells[0] + BEST_MARK, *cells[1:]]
            line = _line(cells)
        body.append((cells, line))
    return list(LOG_COLUMNS + extras), body


def _row_cells(row: TrialRow, lang: str, quantized: bool, extras: tuple[str, ...]) -> list[str]:
    """A row's cells, each one line, without the best mark."""
    p = row.params
    cells = [
        run_name(row.number),
        p.get("batch", ""),
        _lr(p.get("lr")),
        p.get("embedding_dim", ""),
        p.get("embedding_num", ""),
        _iteration(row),
        _yes_no(p.get("BN")),
        "+relu" if p.get("MLP") == "relu" else p.get("MLP", ""),  # the log writes "+relu"
        p.get("En-De", ""),
        _loss_cell(row, lang),
        _perplexity_cell(row, lang) if quantized else "—",
    ]
    return [one_line(c) for c in cells + [_param(p.get(name)) for name in extras]]


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
        mse = _metric(r, "final_val_mse")
        if r.state == "COMPLETE" and mse is not None:
            scored.append((mse, -(_metric(r, "max_val_perplexity") or 0.0), r.number))
    return min(scored)[2] if scored else None


def _loss_cell(row: TrialRow, lang: str) -> str:
    text = _TEXT[lang]
    if row.state == "FAIL":
        return _failed(row.fail_reason, text)
    final, best = _metric(row, "final_val_mse"), _metric(row, "best_val_mse")
    if final is not None:
        numbers = text["loss"].format(final=_sig(final), best=_sig(best)) if best is not None else _sig(final)
    else:
        numbers = text["loss_best"].format(best=_sig(best)) if best is not None else ""
    label = oscillation_label(_metric(row, "loss_oscillation"), _metric(row, "early_loss_oscillation"), lang)
    body = text["join"].join(part for part in (numbers, label) if part)
    resumed = text["resumed_at"].format(it=row.resumed_at) if row.resumed_at else ""
    state = ""
    if row.state == "PRUNED":
        iterations = _metric(row, "iterations_run")
        state = (text["pruned_at"].format(it=round(iterations)) if iterations is not None
                 else text["pruned"])
    return text["state_join"].join(part for part in (state, resumed, body) if part)


def _failed(reason: str | None, text: dict) -> str:
    if not reason:
        return text["failed"]
    reason = one_line(reason)
    if _NAN_INF.search(reason):  # "loss is NaN at iteration 420" and the like
        at = _AT_ITERATION.search(reason)
        reason = text["diverged_at"].format(it=at.group(1)) if at else text["diverged"]
    elif len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 1] + "…"
    return text["failed"] + text["colon"] + reason


def _perplexity_cell(row: TrialRow, lang: str) -> str:
    text = _TEXT[lang]
    if row.state == "FAIL":
        return ""
    peak, step = _metric(row, "max_val_perplexity"), _metric(row, "max_val_perplexity_step")
    final = _metric(row, "final_val_perplexity")
    parts = []
    if peak is not None:
        parts.append(text["ppl_max_at"].format(max=_ppl(peak), step=round(step)) if step is not None
                     else text["ppl_max"].format(max=_ppl(peak)))
    if final is not None:
        parts.append(text["ppl_final"].format(final=_ppl(final)))
    return text["join"].join(parts)


def _legend(lang: str) -> tuple[str, ...]:
    words = {key: LABELS[key][lang] for key in ("stable", "mild", "severe")}
    return tuple(line.format(a=f"{THRESHOLDS['stable']:g}", b=f"{THRESHOLDS['mild']:g}", **words)
                 for line in _TEXT[lang]["legend"])


def _metric(row: TrialRow, key: str) -> float | None:
    value = row.metrics.get(key)
    return float(value) if value is not None and math.isfinite(value) else None


def _iteration(row: TrialRow) -> str:
    """Iterations actually trained (pruned trials stop early), else the configured number."""
    run = _metric(row, "iterations_run")
    return str(round(run)) if run is not None else row.params.get("iteration", "")


def _sig(x: float) -> str:
    """3 significant digits, exponent without padding: 0.041, 0.0412, 1.23e-5."""
    s = f"{x:.3g}"
    if "e" in s:
        mantissa, exponent = s.split("e")
        s = f"{mantissa}e{int(exponent)}"
    return s


def _ppl(x: float) -> str:
    """Perplexity: whole numbers from 100 up (118), else 3 significant digits (95.3, 1.72)."""
    return f"{x:.0f}" if x >= 100 else _sig(x)


def _lr(value: str | None) -> str:
    """The log's compact form with 2 significant digits: 0.001 -> 1e-3, 0.00031623 -> 3.2e-4."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return value or ""
    if x == 0 or not math.isfinite(x):
        return _sig(x)
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _yes_no(value: str | None) -> str:
    if value is None:
        return ""
    return {"true": "yes", "false": "no"}.get(value.lower(), value)


def _param(value: str | None) -> str:
    """An extra column's param: booleans as yes/no, floats to 3 significant digits, else as logged."""
    if value is None:
        return ""
    if value.lower() in ("true", "false"):
        return _yes_no(value)
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return _sig(float(value))
    except ValueError:
        return value


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
