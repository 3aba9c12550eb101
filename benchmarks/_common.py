"""Shared pieces of the benchmarks: the machine record, interleaved timing, tables and JSON.

Every figure a benchmark reports is a ratio between variants measured in one run, interleaved
round by round (A B A B ...), so that load from other processes on a shared machine hits every
variant alike; a round's ratio compares neighbours in time, and the table shows medians.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
# The tests' server launcher is shared with the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu", threads: int | None = None) -> dict:
    """What the figures were measured on: CPU, cores, memory, load, library versions, date."""
    import torch

    info = {
        "date": _dt.date.today().isoformat(),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("optuna", "mlflow"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            pass
    return info


def interleave(variants: dict[str, Callable[[], object]], rounds: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant, called once per round in turn (A B C A B C ...)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def round_ratios(slow: Sequence[float], fast: Sequence[float]) -> list[float]:
    """slow[i] / fast[i] for each round: neighbours in time, so shared load mostly cancels."""
    return [s / f for s, f in zip(slow, fast)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> tuple[float, float]:
    """(min, max), to show how noisy the rounds were next to the median."""
    return min(xs), max(xs)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table with aligned columns; floats as given (format them before)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """benchmarks/results/<name>.json (or `out`)."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_device_result(name: str, device: str, info: dict, payload: dict,
                        out: str | Path | None = None) -> Path:
    """benchmarks/results/<name>[-<device>].json (or `out`) for a benchmark run on `device`:
    its command, the machine `info` taken as it began with the load at the end, `payload`, and
    when it finished."""
    flag = "" if device == "cpu" else f" --device {device}"
    return write_json(name + ("" if device == "cpu" else f"-{device}"), {
        "benchmark": name, "command": f"python benchmarks/bench_{name}.py{flag}",
        "machine": {**info, "load_average_end": machine()["load_average_1_5_15"]},
        **payload, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, out)


def set_threads(threads: int) -> None:
    """torch intra-op threads, set explicitly: on a shared 2-core machine two spinning OpenMP
    threads per process made steps up to 50x slower than one."""
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """A local `mlflow server` (SQLite backend, proxied artifacts under `folder`) on a free port,
    the tests' own launcher (tests/_servers.py); yields its URL once /health answers."""
    from _servers import mlflow_server as launch

    with launch(folder) as server:
        yield server.url
