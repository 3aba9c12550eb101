"""The cells of one trial's row in the experiment table: the log's words in English and in the
log's Chinese, and how each value is written (3 significant digits, the log's compact lr,
"pruned @ 150", "failed: diverged @ 420", "max 25.9 @ 250, final 25.8")."""

from __future__ import annotations

import math
import re

from vqlog.errors import one_line
from vqlog.oscillation import LABELS, LANGS, THRESHOLDS, oscillation_label
from vqlog.tracking.rows import TrialRow, run_name

# Every piece of text the table shows: key -> (English, the log's Chinese).
WORDS = {
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
    "resumed_at": ("{name} resumed @ {it}", "{name}从{it}轮继续"),  # a retry: the trial it goes on
    "retry_of": ("retry of {name}", "重试{name}"),  # ... from the start (no checkpoint to go on)
    "more_rows": ("… and {n} more rows: the whole table is experiment_table.md, an artifact of "
                  "this run.", "……另有 {n} 行：完整的表是本运行的文件 experiment_table.md。"),
    "legend": ((
        "- ★ best of its table by the study's objective: lowest final val MSE among completed "
        "trials (a tie goes to the higher perplexity).",
        "- loss: final val MSE (best val MSE), then the train/loss oscillation label "
        "(score `loss_oscillation`): {stable} < {a} ≤ {mild} < {b} ≤ {severe}; \"early …\" and "
        "\"… worse later\" compare the first third of training with the whole; \"{rising}\" first: "
        "its last fifth ends above 1.1x its first fifth (score `loss_rise`).",
        "- perplexity: codebook perplexity on the whole valid set, its maximum @ iteration and "
        "the final value.",
    ), (
        "- ★ 按研究目标本表最佳：已完成试验中最终 val MSE 最低（相同时取 perplexity 较高者）。",
        "- loss：最终 val MSE（最佳 val MSE），再加 train/loss 震荡标签"
        "（分数 `loss_oscillation`）：{stable} < {a} ≤ {mild} < {b} ≤ {severe}；"
        "“前期…”与“…后期加剧”比较训练前三分之一与全程；"
        "前置“{rising}”：最后五分之一高于最初五分之一的 1.1 倍（分数 `loss_rise`）。",
        "- perplexity：整个 valid 集上的 codebook perplexity，最高值 (轮数) 与最终值。",
    )),
}
TEXT = {lang: {key: words[i] for key, words in WORDS.items()} for i, lang in enumerate(LANGS)}
_NAN_INF = re.compile(r"\b(nan|inf|infinity|diverged?)\b", re.IGNORECASE)
_AT_ITERATION = re.compile(r"iteration\s+(\d+)", re.IGNORECASE)
_MAX_REASON = 80  # characters of a failure reason shown in a cell


def row_cells(row: TrialRow, lang: str, quantized: bool, extras: tuple[str, ...]) -> list[str]:
    """A row's cells, each one line, without the best mark."""
    p = row.params
    cells = [
        run_name(row.number),
        p.get("batch", ""),
        lr(p.get("lr")),
        p.get("embedding_dim", ""),
        p.get("embedding_num", ""),
        iteration(row),
        yes_no(p.get("BN")),
        "+relu" if p.get("MLP") == "relu" else p.get("MLP", ""),  # the log writes "+relu"
        p.get("En-De", ""),
        loss_cell(row, lang),
        perplexity_cell(row, lang) if quantized else "—",
    ]
    return [one_line(c) for c in cells + [param(p.get(name)) for name in extras]]


def loss_cell(row: TrialRow, lang: str) -> str:
    text = TEXT[lang]
    original = run_name(row.retry_of) if row.retry_of is not None else None
    resumed = "" if original is None else \
        text["retry_of"].format(name=original) if not row.resumed_at else \
        text["resumed_at"].format(name=original, it=row.resumed_at)
    if row.state == "FAIL":  # a retry cut off again says which trial it is too
        return text["state_join"].join(p for p in (resumed, _failed(row.fail_reason, text)) if p)
    final, best = metric(row, "final_val_mse"), metric(row, "best_val_mse")
    if final is not None:
        numbers = text["loss"].format(final=sig(final), best=sig(best)) if best is not None else sig(final)
    else:
        numbers = text["loss_best"].format(best=sig(best)) if best is not None else ""
    label = oscillation_label(metric(row, "loss_oscillation"), metric(row, "early_loss_oscillation"),
                              lang, rise=metric(row, "loss_rise"))
    body = text["join"].join(part for part in (numbers, label) if part)
    state = ""
    if row.state == "PRUNED":
        iterations = metric(row, "iterations_run")
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


def perplexity_cell(row: TrialRow, lang: str) -> str:
    text = TEXT[lang]
    if row.state == "FAIL":
        return ""
    peak, step = metric(row, "max_val_perplexity"), metric(row, "max_val_perplexity_step")
    final = metric(row, "final_val_perplexity")
    parts = []
    if peak is not None:
        parts.append(text["ppl_max_at"].format(max=ppl(peak), step=round(step)) if step is not None
                     else text["ppl_max"].format(max=ppl(peak)))
    if final is not None:
        parts.append(text["ppl_final"].format(final=ppl(final)))
    return text["join"].join(parts)


def legend(lang: str) -> tuple[str, ...]:
    words = {key: LABELS[key][lang] for key in ("stable", "mild", "severe", "rising")}
    return tuple(line.format(a=f"{THRESHOLDS['stable']:g}", b=f"{THRESHOLDS['mild']:g}", **words)
                 for line in TEXT[lang]["legend"])


def metric(row: TrialRow, key: str) -> float | None:
    value = row.metrics.get(key)
    return float(value) if value is not None and math.isfinite(value) else None


def iteration(row: TrialRow) -> str:
    """Iterations actually trained (pruned trials stop early), else the configured number."""
    run = metric(row, "iterations_run")
    return str(round(run)) if run is not None else row.params.get("iteration", "")


def sig(x: float) -> str:
    """3 significant digits, exponent without padding: 0.041, 0.0412, 1.23e-5."""
    s = f"{x:.3g}"
    if "e" in s:
        mantissa, exponent = s.split("e")
        s = f"{mantissa}e{int(exponent)}"
    return s


def ppl(x: float) -> str:
    """Perplexity: whole numbers from 100 up (118), else 3 significant digits (95.3, 1.72)."""
    return f"{x:.0f}" if x >= 100 else sig(x)


def lr(value: str | None) -> str:
    """The log's compact form with 2 significant digits: 0.001 -> 1e-3, 0.00031623 -> 3.2e-4."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return value or ""
    if x == 0 or not math.isfinite(x):
        return sig(x)
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def yes_no(value: str | None) -> str:
    if value is None:
        return ""
    return {"true": "yes", "false": "no"}.get(value.lower(), value)


def param(value: str | None) -> str:
    """An extra column's param: booleans as yes/no, floats to 3 significant digits, else as logged."""
    if value is None:
        return ""
    if value.lower() in ("true", "false"):
        return yes_no(value)
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return sig(float(value))
    except ValueError:
        return value
