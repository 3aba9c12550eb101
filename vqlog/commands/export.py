"""`vqlog export`: the trained tokenizer out of a study, as a model file `vqlog.checkpoint.load`
reads (and `vqlog encode --model` takes)."""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile

from vqlog.cli import (STORAGE_HELP, TRACKING_HELP, add_debug, check_out_file, default_if_empty,
                       report_stream, url_arg)


def export_command_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trial's trained weights (the best one by default)")
    p.add_argument("--study", type=default_if_empty,
                   help="study name (default: the storage's only study)")
    p.add_argument("--trial", help="Optuna trial number (Seq<n+1> in the table) or Seq<k>; "
                                   "default: the study's best trial by its objective")
    p.add_argument("--storage", default=None, type=url_arg, help=STORAGE_HELP)
    p.add_argument("--tracking-uri", default=None, type=url_arg, help=TRACKING_HELP)
    p.add_argument("--out", required=True, help="the model file to write, e.g. model.pt")
    add_debug(p)
    p.set_defaults(func=export_command)


def trial_number(text: str | None) -> int | None:
    """--trial as an Optuna trial number: `7` is trial 7, `Seq8` is trial 7 too."""
    from vqlog.errors import UserError

    if text is None:
        return None
    match = re.fullmatch(r"(?:Seq)?(\d+)", text.strip(), re.IGNORECASE)
    if match is None or (text.strip().lower().startswith("seq") and int(match.group(1)) < 1):
        raise UserError(f"--trial must be a trial number or Seq<k>, got {text!r}")
    number = int(match.group(1))
    return number - 1 if text.strip().lower().startswith("seq") else number


def export_command(args: argparse.Namespace) -> int:
    from optuna.trial import TrialState

    from vqlog import checkpoint
    from vqlog.errors import UserError
    from vqlog.files import atomic_write
    from vqlog.study.storage import load_existing_study
    from vqlog.study.worker import best_trial
    from vqlog.tracking.artifacts import trial_runs, weights_of_run
    from vqlog.tracking.client import existing_store, open_client
    from vqlog.tracking.lineage import RUN_ID
    from vqlog.tracking.rows import run_name

    out = check_out_file(args.out, "--out", "model.pt")
    number = trial_number(args.trial)
    study = load_existing_study(args.storage, args.study)
    args.study = study.study_name  # given, or the storage's only one
    trials = study.get_trials(deepcopy=False)
    if number is None:
        trial = best_trial(study)
        if trial is None:
            raise UserError(f"study '{args.study}' has no COMPLETE trial yet: nothing to export")
    elif number >= len(trials):
        held = f"its trials are 0..{len(trials) - 1}" if trials else "it has no trial yet"
        raise UserError(f"study '{args.study}' has no trial {number} ({run_name(number)}); {held}")
    else:
        trial = trials[number]
    name = f"{run_name(trial.number)} (trial {trial.number}) of study '{args.study}'"
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"{name} is {trial.state.name}: only COMPLETE trials keep their weights")
    client = open_client(existing_store(args.tracking_uri))
    exp = client.get_experiment_by_name(args.study)
    if exp is None:
        raise UserError(f"no MLflow experiment '{args.study}' at {client.describe}; pass the "
                        "--tracking-uri the sweep used")
    # The run the trial names (its mlflow.run_id), as `vqlog best` and the registered model
    # take it; by number only for a trial that names none. By number alone, a store holding
    # another study of the same name (every spec's default is `seed`) gave that study's weights.
    run_ids = [r.info.run_id for r in trial_runs(client, exp.experiment_id, trial.number)
               if r.data.tags.get("optuna.state") == "COMPLETE"]
    named = trial.user_attrs.get(RUN_ID)
    if named is not None:
        run_ids = [named] if named in run_ids else []
    if not run_ids:
        raise UserError(f"{name} has no MLflow run with weights at {client.describe}"
                        + ("; pass the --tracking-uri the sweep used" if named else ""))
    with tempfile.TemporaryDirectory(prefix="vqlog-export-") as folder:
        path = weights_of_run(client, run_ids[0], folder, name)
        # a model file that loads, before anything is written; named as the user knows it
        cfg, _ = checkpoint.load(path, name=f"the weights file of {name}")
        with open(path, "rb") as src:
            atomic_write(out, lambda dst: shutil.copyfileobj(src, dst))
    print(f"exported {name}: val mse {trial.values[0]:.4g}, quantizer {cfg.quantizer} "
          f"(embedding_num {cfg.embedding_num}, embedding_dim {cfg.embedding_dim}), window "
          f"{cfg.window} -> {out}", file=report_stream(out))
    return 0
