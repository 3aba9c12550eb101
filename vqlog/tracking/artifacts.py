"""What a trial leaves in MLflow besides curves: its latest training state while it runs, its final
weights once COMPLETE, and, for the study's best trial, a version of the registered model
`<study>` with the alias `best`.

Artifacts go through the tracking store, so a worker on another host finds them through the
server (`--serve-artifacts`): a retry resumes from the checkpoint another worker wrote.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from vqlog.errors import TrackingUnavailable, UserError, one_line
from vqlog.tracking.rows import TRIAL_ROLE, run_name
from vqlog.urls import mask_urls

CHECKPOINT = "checkpoint/latest.pt"  # one per trial run: each save replaces the last
WEIGHTS = "model/model.pt"  # a vqlog.checkpoint model file
ALIAS = "best"
log = logging.getLogger("vqlog")


def upload_checkpoint(client, run_id: str, state: dict) -> bool:
    """The training state as the run's `checkpoint/latest.pt`, in one attempt: False while the
    store is away (training goes on; the next checkpoint is sent instead)."""
    with tempfile.TemporaryDirectory(prefix="vqlog-ckpt-") as folder:
        return send_checkpoint(client, run_id, write_checkpoint(state, folder))


def write_checkpoint(state: dict, folder: str | Path) -> Path:
    """The training state as it is now, in `folder`, under the artifact's file name."""
    from vqlog.checkpoint import write_state

    path = Path(folder) / Path(CHECKPOINT).name
    write_state(path, state)
    return path


def send_checkpoint(client, run_id: str, path: Path) -> bool:
    """A file `write_checkpoint` wrote, as the run's `checkpoint/latest.pt`, in one attempt."""
    ok, _ = client.try_call("log_artifact", run_id, str(path), Path(CHECKPOINT).parent.name)
    return ok


def drop_checkpoint(client, run) -> None:
    """Delete the checkpoint folder of `run` (a Run, as search_runs returns it). MLflow's client
    has no call that deletes an artifact; the artifact repository behind the run's artifact URI
    has (`get_artifact_repository`, MLflow's public registry of them): a local folder, a
    server's `mlflow-artifacts:` store, an object store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
    repo.delete_artifacts(Path(CHECKPOINT).parent.name)


def upload_weights(client, run_id: str, cfg, model, sample_rate: float | None = None) -> None:
    """The final weights as the run's `model/model.pt` (a model file `checkpoint.load` reads)."""
    from vqlog.checkpoint import save

    with tempfile.TemporaryDirectory(prefix="vqlog-model-") as folder:
        path = Path(folder) / Path(WEIGHTS).name
        save(path, cfg, model, sample_rate)
        client.log_artifact(run_id, str(path), Path(WEIGHTS).parent.name)


def trial_runs(client, experiment_id: str, number: int) -> list:
    """The runs of trial `number`, the latest first."""
    return client.search_runs(
        [experiment_id], f"{TRIAL_ROLE} and tags.`optuna.trial_number` = '{int(number)}'",
        order_by=["attributes.start_time DESC"])


def _download(client, run_id: str, path: str, folder: str) -> Path | None:
    """The artifact downloaded into `folder`, or None if the run has none there."""
    from mlflow.exceptions import MlflowException

    parent = str(Path(path).parent)
    if Path(path).name not in {Path(a.path).name for a in client.list_artifacts(run_id, parent)}:
        return None
    try:
        return Path(client.download_artifacts(run_id, path, folder))
    except MlflowException:
        return None


def latest_checkpoint(client, experiment_id: str, numbers: list[int]) -> dict | None:
    """The most advanced training state among the runs of trials `numbers` (a retry's history:
    the original and the retries before it), or None. One that cannot be read (cut short by a
    kill during its upload, say) is passed over for the others; UserError, naming it, only
    where none can be read."""
    from vqlog.checkpoint import read_state

    best, unreadable = None, []
    with tempfile.TemporaryDirectory(prefix="vqlog-resume-") as folder:
        for number in numbers:
            for run in trial_runs(client, experiment_id, number):
                path = _download(client, run.info.run_id, CHECKPOINT, folder)
                if path is None:
                    continue
                try:
                    state = read_state(path)
                except UserError as exc:  # named as the run's artifact, not this temporary file
                    unreadable.append(str(exc).replace(str(path), f"{run_name(number)}'s {CHECKPOINT}"))
                    continue
                finally:
                    path.unlink()
                if best is None or state["step"] > best["step"]:
                    best = state
    if best is None and unreadable:
        raise UserError("; ".join(unreadable))
    return best


def register_best(client, study: str, run_id: str, number: int) -> bool:
    """Point the alias `best` of the registered model `<study>` at trial `number`'s weights,
    making a model version of them the first time. False if it pointed there already (at that
    run: a study made anew in the same experiment numbers its trials from 0 again)."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(study, ALIAS)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        current = None
    if current is not None and current.run_id == run_id:
        return False
    try:
        client.create_registered_model(
            study, description=f"The tokenizer of study {study}: alias `{ALIAS}` is its best trial.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    from vqlog.tracking.mlmodel import log_tokenizer

    # An MLflow Model that mlflow.pyfunc loads; else the version of old, the run's model/ folder
    # (vqlog encode and export read its weights all the same, or say it has none)
    source = f"{client.get_run(run_id).info.artifact_uri}/{Path(WEIGHTS).parent}"
    with tempfile.TemporaryDirectory(prefix="vqlog-best-") as folder:
        try:
            weights = _download(client, run_id, WEIGHTS, folder)
            if weights is not None:
                source = log_tokenizer(client, run_id, weights) or source
        except TrackingUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a full disk, an odd file: the alias moves
            log.warning("vqlog: %s@%s is registered without its MLflow Model (%s)", study, ALIAS,
                        mask_urls(one_line(exc, 300)))  # a server's error may quote its URL
    version = client.create_model_version(
        study, source=source, run_id=run_id,
        tags={"optuna.trial_number": str(number), "vqlog.run": run_name(number)})
    client.set_registered_model_alias(study, ALIAS, version.version)
    return True


def weights_of_run(client, run_id: str, folder: str, what: str) -> Path:
    """The run's `model/model.pt`, downloaded into `folder`; UserError naming `what` if none."""
    path = _download(client, run_id, WEIGHTS, folder)
    if path is None:
        raise UserError(f"{what} has no weights: its run {run_id} holds no {WEIGHTS} (only a "
                        "COMPLETE trial's run keeps them; one deleted from the artifact store "
                        "is gone)")
    return path


def run_of_model_uri(client, uri: str) -> tuple[str, str]:
    """(run id, a description) of `models:/<name>@<alias>` or `models:/<name>/<version>`."""
    from mlflow.exceptions import MlflowException

    spec = uri[len("models:/"):]
    name, at, alias = spec.partition("@")
    try:
        if at:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = spec.rpartition("/")
            if not name or not (number.isdigit() and number.isascii()):
                raise UserError(f"--model {uri}: give models:/<study>@best or models:/<study>/<version>")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"--model {uri}: no such registered model or version in "
                            f"{client.describe}") from None
        raise
    return version.run_id, f"{uri} (version {version.version})"
