"""`vqlog trials`: every trial of a study, from its MLflow runs, as a table, JSON or CSV."""

from __future__ import annotations

import argparse
import json
import sys
import math

from vqlog.cli import TRACKING_HELP, add_debug, default_if_empty, url_arg

SHOWN = ("number", "run", "state", "metrics.final_val_mse", "metrics.best_val_mse",
         "metrics.max_val_perplexity", "metrics.iterations_run")


def trials_command_parser(sub) -> None:
    p = sub.add_parser("trials", help="list a study's trials (table, json or csv)")
    p.add_argument("--study", type=default_if_empty,
                   help="study name (default: the tracking store's only vqlog study)")
    p.add_argument("--tracking-uri", default=None, type=url_arg, help=TRACKING_HELP)
    p.add_argument("--format", default="table", choices=("table", "json", "csv"))
    add_debug(p)
    p.set_defaults(func=trials_command)


def trials_command(args: argparse.Namespace) -> int:
    from vqlog.api import results

    study = args.study or _only_study(args.tracking_uri)
    df = results(study, tracking_uri=args.tracking_uri)
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        records = [{k: _json(v) for k, v in row.items()} for row in df.to_dict("records")]
        print(json.dumps(records, indent=2))
    elif len(df):
        print(_text_table(df))
    else:  # the study run is there, no trial has started yet
        print(f"no trial runs yet in study '{study}'", file=sys.stderr)
    return 0


def _only_study(tracking_uri: str | None) -> str:
    """The tracking store's one vqlog study, for a command given no --study."""
    from vqlog.errors import UserError
    from vqlog.tracking.client import existing_store, open_client
    from vqlog.tracking.runs import study_names

    client = open_client(existing_store(tracking_uri))
    names = study_names(client)
    if len(names) != 1:
        raise UserError(f"several studies in {client.describe} ({', '.join(names)}); choose one "
                        "with --study" if names else f"no vqlog study in the MLflow store "
                        f"{client.describe}; run vqlog-sweep first")
    return names[0]


def _json(value):
    import pandas as pd

    # pd.NA: a missing value of a nullable integer column (retry_of, resumed_at)
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _text_table(df) -> str:
    """The trials, with the summary metrics and the params that vary between them; a last line
    gives the params that are the same in every trial."""
    params = [c for c in df.columns if c.startswith("params.")]
    varying = [c for c in params if df[c].nunique(dropna=False) > 1]
    columns = [c for c in SHOWN if c in df.columns] + varying
    cells = [[c.split(".", 1)[-1] for c in columns]]
    for _, row in df.iterrows():
        cells.append([_cell(row[c]) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    same = [f"{c.split('.', 1)[1]}={_cell(df[c].iloc[0])}" for c in params
            if c not in varying and len(df)]
    if same:
        lines.append(f"same in every trial: {', '.join(same)}")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    import numpy as np

    if isinstance(value, (bool, np.bool_)):  # BN: yes or no, as a spec, --set and the table say
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
