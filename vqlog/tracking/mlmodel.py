"""The registered tokenizer as an MLflow Model, so that MLflow's own loader takes it:

    tokenizer = mlflow.pyfunc.load_model("models:/<study>@best")
    tokens = tokenizer.predict(windows)   # (n, window) float32 -> (n, T) int64 codes

Each version of the registered model `<study>` is the folder `tokenizer/` of its trial's run:
MLflow's `python_function` flavor (MLmodel, with a tensor signature and the environment files),
its data the trial's weights file, and this module as its loader. The windows are what
`vqlog.data.all_windows` gives for the model's config (`tokenizer.metadata` holds it): cut at the
model's rate and standardized as it learned; `vqlog encode` does all of it from a data file.
Loading needs vqlog installed, as the environment files say.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

FOLDER = "tokenizer"  # the run's artifact folder that holds the MLflow Model


def log_tokenizer(client, run_id: str, weights: Path) -> str | None:
    """Save `weights` (a vqlog model file) as an MLflow Model and log it as the run's `tokenizer/`;
    returns its artifact URI, a model version's source. None, and nothing logged, for a model
    without a quantizer (the `baseline` spec's): it makes no tokens, so no tokenizer."""
    import mlflow.pyfunc
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import vqlog
    from vqlog.checkpoint import load

    with torch.random.fork_rng(devices=[]):  # building the model draws: not from the caller's
        cfg, _ = load(weights)  # checked: a version must load
    if cfg.quantizer == "none":
        return None
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.window))]),
                               outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, cfg.codes_per_window))]))
    with tempfile.TemporaryDirectory(prefix="vqlog-model-") as folder:
        path = Path(folder) / FOLDER
        with warnings.catch_warnings():  # "an input example was not provided": the signature is
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                str(path), loader_module=__name__, data_path=str(weights), signature=signature,
                pip_requirements=[f"vqlog=={vqlog.__version__}",
                                  f"torch=={torch.__version__.split('+')[0]}"],
                metadata={"vqlog.config": cfg.to_params()})
        client.log_artifacts(run_id, str(path), FOLDER)
    return f"{client.get_run(run_id).info.artifact_uri}/{FOLDER}"


class Tokenizer:
    """What `mlflow.pyfunc.load_model` wraps: the model, on the CPU, in eval mode."""

    def __init__(self, path: str):
        from vqlog.checkpoint import load

        self.config, self.model = load(path)

    def predict(self, model_input, params=None) -> np.ndarray:
        """The (n, T) int64 codes of (n, window) float32 windows (the signature checks them)."""
        from vqlog.train import encode

        windows = np.asarray(model_input, dtype=np.float32)
        if len(windows) == 0:  # the signature takes any number of rows; the FFT takes no empty batch
            return np.zeros((0, self.config.codes_per_window), dtype=np.int64)
        return encode(self.model, windows).tokens


def _load_pyfunc(data_path: str) -> Tokenizer:  # the name MLflow's loader_module protocol calls
    return Tokenizer(data_path)
