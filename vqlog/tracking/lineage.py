"""Where a trial run came from, in MLflow's own conventions: the run context (user, source, git
commit of the checkout the sweep runs in), the package versions, the dataset as a dataset input
(name, source, digest, shape), and system metrics from MLflow's own monitor."""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from importlib import metadata

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's training view
PACKAGES = ("vqlog", "torch", "optuna", "mlflow")
# Which Optuna study an experiment's runs belong to: a random id, the study's user attr and its
# study run's tag, so that a study made anew under the same name (its database deleted or
# replaced) is not mixed into the earlier one's experiment.
STUDY_UID = "vqlog.study_uid"
RUN_ID = "mlflow.run_id"  # Optuna trial user attr: the trial's MLflow run


@lru_cache(maxsize=1)
def run_context_tags() -> dict[str, str]:
    """MLflow's run context (mlflow.user, mlflow.source.name/type, and the git commit when the
    entry point lies in a checkout), the checkout the sweep runs in when MLflow found none, and
    `vqlog.version.<package>` for vqlog, torch, optuna and mlflow."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    tags = dict(resolve_tags())
    if "mlflow.source.git.commit" not in tags:
        here = os.getcwd()
        commit = get_git_commit(here)
        if commit:
            tags["mlflow.source.git.commit"] = commit
            for key, value in (("repoURL", get_git_repo_url(here)),
                               ("branch", get_git_branch(here))):
                if value:
                    tags[f"mlflow.source.git.{key}"] = value
    for package in PACKAGES:
        try:
            tags[f"vqlog.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:  # pragma: no cover - all are dependencies
            pass
    return tags


def dataset_input(data, source: str, channel: str | None = None):
    """The train windows of `data` (a `vqlog.data.Splits`) as an MLflow DatasetInput: named
    after the source (and channel), with MLflow's digest of the windows and their shape."""
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = os.path.basename(source.rstrip("/")) or source
    if channel is not None:
        name = f"{name}:{channel}"
    builtin = source in ("ppg", "synthetic")
    where = CodeDatasetSource({"vqlog.source": source}) if builtin else \
        os.path.abspath(os.path.expanduser(source))  # as the loaders read it
    with warnings.catch_warnings():  # a path "can be interpreted in multiple ways": local, fine
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_numpy(data.train, source=where, name=name)
    return DatasetInput(Dataset(**dataset.to_dict()),
                        tags=[InputTag("mlflow.data.context", "training")])


def system_metrics(run_id: str, tracking_uri: str):
    """MLflow's system-metrics monitor for the run, started (`system/...`: CPU, memory, disk,
    network, and the GPU where nvidia-ml-py finds one), or None when
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false. It samples as MLflow's settings say
    (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, ..._SAMPLES_BEFORE_LOGGING)."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


# Where users open the MLflow UI, where that is not the tracking URI: a container's service name
# (compose sets the published port), a proxy, an SSH tunnel.
UI_URL_ENV = "VQLOG_UI_URL"


def ui_base(tracking_uri: str) -> str:
    """The MLflow UI's address as users open it: VQLOG_UI_URL if set (as pasted from the
    browser's address bar: its `#/...` view, a query and any credentials are left out), else
    the server's address, or the one `vqlog ui` serves for a local store."""
    from urllib.parse import urlsplit

    from vqlog.urls import mask

    given = os.environ.get(UI_URL_ENV, "").strip()
    if given or tracking_uri.lower().startswith(("http://", "https://")):  # no `user:***@`: no link opens
        parts = urlsplit(given if "://" in given else f"http://{given}") if given \
            else urlsplit(mask(tracking_uri))
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
    return "http://127.0.0.1:5000"


# MLflow 3's UI opens an experiment, and a run, in its GenAI view (a run under "Evaluations")
# unless the link asks for the training view: the experiment's kind tag does not change that
TRAINING_VIEW = "workflowType=machine_learning"


def ui_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The experiment's runs, or one run's page, in the MLflow UI's training view (`ui_base`)."""
    return (f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs"
            f"{f'/{run_id}' if run_id else ''}?{TRAINING_VIEW}")
