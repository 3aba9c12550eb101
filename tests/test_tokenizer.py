"""The tokenizer out of the study: every COMPLETE trial keeps its weights, the best one by the
study's objective is the registered model `<study>` @ `best`, `vqlog export` writes it, and
`vqlog encode` turns signals into tokens with it. One real sweep (SQLite stores) serves all."""

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _sweep_helpers import mlflow_runs, study_trials, write_spec

pytestmark = pytest.mark.slow

DIVERGE = {"warmup": 0, "grad_clip": 1.0e30, "BN": False}  # with lr 1e6: inf at iteration 2


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """`vqlog-sweep --trials 5` of a smoke-like spec whose first row diverges (a FAIL trial,
    no weights), in its own folder on the embedded defaults."""
    from vqlog.cli import sweep_main

    folder = tmp_path_factory.mktemp("tokenizer")
    spec = write_spec(folder, "tok", budget={"iteration": 40, "eval_every": 10}, fixed=DIVERGE,
                      pruner="none", space={"lr": [1.0e6, 2.0e-3, 5.0e-3, 1.0e-2],
                                            "embedding_num": [16, 32]},
                      enqueue=[{"lr": 1.0e6}])
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(folder)
        code = sweep_main(["--trials", "5", "--config", str(spec), "--seed", "3"])
    assert code == 0, out.getvalue()
    uri, storage = f"sqlite:///{folder}/mlflow.db", f"sqlite:///{folder}/optuna.db"
    trials = study_trials(storage, "tok")
    return SimpleNamespace(folder=folder, uri=uri, storage=storage, trials=trials,
                           common=["--storage", storage, "--tracking-uri", uri])


def best_of(trials):
    return min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)


def test_complete_trials_keep_weights_not_checkpoints_and_best_follows_the_objective(swept):
    from mlflow.tracking import MlflowClient

    from vqlog import checkpoint

    client = MlflowClient(tracking_uri=swept.uri)
    for run in mlflow_runs(swept.uri, "tok"):
        files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        complete = run.data.tags["optuna.state"] == "COMPLETE"
        assert files == ({"model/model.pt"} if complete else set()), run.info.run_name
        if run.data.tags["optuna.state"] in ("COMPLETE", "PRUNED"):  # nothing resumes it
            assert not client.list_artifacts(run.info.run_id, "checkpoint"), run.info.run_name
    best = best_of(swept.trials)
    version = client.get_model_version_by_alias("tok", "best")
    assert version.tags["optuna.trial_number"] == str(best.number)
    path = client.download_artifacts(version.run_id, "model/model.pt", str(swept.folder))
    cfg, _ = checkpoint.load(path)
    assert (cfg.lr, cfg.embedding_num) == (best.params["lr"], best.params["embedding_num"])
    # The alias moved only to better trials: each version's trial beats the one before.
    versions = sorted(client.search_model_versions("name='tok'"), key=lambda v: int(v.version))
    values = [swept.trials[int(v.tags["optuna.trial_number"])].value for v in versions]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


def test_export_writes_the_best_trial_and_encode_makes_its_tokens(swept, tmp_path, cli):
    from vqlog import checkpoint
    from vqlog.data import all_windows
    from vqlog.train import encode

    code, out, err = cli("export", "--study", "tok", *swept.common, "--out", str(tmp_path / "m.pt"))
    assert code == 0, err
    best = best_of(swept.trials)
    assert f"exported Seq{best.number + 1} (trial {best.number})" in out
    cfg, model = checkpoint.load(tmp_path / "m.pt")
    assert (cfg.lr, cfg.embedding_num) == (best.params["lr"], best.params["embedding_num"])

    code, out, err = cli("encode", "--model", str(tmp_path / "m.pt"), "--data", "synthetic",
                         "--out", str(tmp_path / "tokens.npy"))
    assert code == 0, err
    tokens = np.load(tmp_path / "tokens.npy", allow_pickle=False)
    windows = all_windows("synthetic", cfg)
    assert tokens.shape == (len(windows), cfg.window // cfg.downsample)
    assert tokens.dtype == np.int64 and 0 <= tokens.min() and tokens.max() < model.codebook_size
    expected = encode(model, windows)
    assert np.array_equal(tokens, expected.tokens)
    assert f"reconstruction MSE {expected.mse:.4g}; codebook perplexity {expected.perplexity:.1f}" in out

    # The registered model gives the same tokens, and any COMPLETE trial exports by number.
    code, _, err = cli("encode", "--model", "models:/tok@best", "--tracking-uri", swept.uri,
                       "--data", "synthetic", "--out", str(tmp_path / "again.npy"))
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "again.npy"), tokens)
    # --out x.csv wrote .npy bytes into the .csv; it writes the codes as text now
    code, _, err = cli("encode", "--model", str(tmp_path / "m.pt"), "--data", "synthetic",
                       "--out", str(tmp_path / "tokens.csv"))
    assert code == 0, err
    lines = (tmp_path / "tokens.csv").read_text().splitlines()
    assert lines[0] == ",".join(f"code{t}" for t in range(tokens.shape[1]))
    assert np.array_equal(np.loadtxt(lines[1:], delimiter=",", dtype=np.int64), tokens)
    other = next(t for t in swept.trials if t.state.name == "COMPLETE" and t.number != best.number)
    code, out, err = cli("export", "--study", "tok", "--trial", f"Seq{other.number + 1}",
                         *swept.common, "--out", str(tmp_path / "other.pt"))
    assert code == 0 and f"(trial {other.number})" in out, err
    assert checkpoint.load(tmp_path / "other.pt")[0].lr == other.params["lr"]


def _short_signal(path: Path) -> str:
    np.save(path, np.sin(np.arange(40) / 3.0))  # 40 samples at 25 Hz: not one 64-sample window
    return str(path)


BAD = {  # name: (arguments, fragment of the Error line); {m} is a model file, {f} the folder
    "unknown study": (["export", "--study", "nope"], "no study 'nope'"),
    "unknown trial": (["export", "--study", "tok", "--trial", "99"], "has no trial 99 (Seq100)"),
    "bad trial": (["export", "--study", "tok", "--trial", "Seq0"], "--trial must be"),
    "no weights": (["export", "--study", "tok", "--trial", "0"], "is FAIL: only COMPLETE"),
    "no storage": (["export", "--study", "tok", "--storage", "sqlite:///{f}/none.db"],
                   "no Optuna storage"),
    "not a model": (["encode", "--model", "{f}/fake.pt", "--data", "synthetic"],
                    "is not a vqlog checkpoint"),
    "missing model": (["encode", "--model", "{f}/none.pt", "--data", "synthetic"],
                      "checkpoint not found"),
    "unknown registered model": (["encode", "--model", "models:/nope@best", "--data", "synthetic"],
                                 "no such registered model"),
    "too short": (["encode", "--model", "{m}", "--data", "{f}/short.npy", "--sample-rate", "25"],
                  "shorter than one window"),
    "no data": (["encode", "--model", "{m}"], "the following arguments are required: --data"),
    # the advice was a sweep's: "(or sample_rate in the spec)", though encode takes no spec
    "no sample rate": (["encode", "--model", "{m}", "--data", "{f}/short.npy"],
                       "short.npy: the sample rate of a data file is unknown; pass --sample-rate "
                       "HZ, the rate it was recorded at"),
    # CSV text under a .npy name
    "index not csv": (["encode", "--model", "{m}", "--data", "synthetic", "--index", "{f}/i.npy"],
                      "--index {f}/i.npy: the index is CSV text; give a .csv file, e.g. --index "
                      "i.csv"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_exit_2_and_no_output(swept, tmp_path, cli, case):
    from vqlog import checkpoint
    from vqlog.config import Config
    from vqlog.model.vqvae import VQVAE

    cfg = Config.from_mapping(swept.trials[1].params, base=_spec_config())
    checkpoint.save(tmp_path / "model.pt", cfg, VQVAE(cfg))
    (tmp_path / "fake.pt").write_bytes(b"not a model")
    _short_signal(tmp_path / "short.npy")
    args, fragment = BAD[case]
    args = [a.format(f=tmp_path, m=tmp_path / "model.pt") for a in args]
    fragment = fragment.format(f=tmp_path)
    extra = swept.common if args[0] == "export" else ["--tracking-uri", swept.uri]
    if "--storage" in args:
        extra = ["--tracking-uri", swept.uri]
    out_file = tmp_path / "out.bin"
    code, out, err = cli(*args, *extra, "--out", str(out_file))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), err
    assert fragment in lines[0], lines[0]
    assert not out_file.exists() and "Traceback" not in err


def _spec_config():
    from vqlog.study.spec import load_sweep

    return load_sweep("smoke").base_config()


def test_export_takes_the_trials_own_run_not_another_of_its_number(swept, tmp_path, cli):
    """A store that holds another study of the same name (every spec's default is `seed`) has
    its own run of the same trial number: `vqlog export` took the latest by number, so another
    study's weights, with this study's val MSE beside them. It takes the trial's own run."""
    from mlflow.tracking import MlflowClient

    from vqlog import checkpoint
    from vqlog.config import Config
    from vqlog.model.vqvae import VQVAE

    best = best_of(swept.trials)
    client = MlflowClient(tracking_uri=swept.uri)
    exp = client.get_experiment_by_name("tok")
    other = Config(d_model=8, d_state=8, n_layers=1, embedding_dim=8, embedding_num=24, window=64,
                   stride=64, quantizer="vq")
    checkpoint.save(tmp_path / "model.pt", other, VQVAE(other))
    run_id = client.create_run(exp.experiment_id, tags={
        "vqlog.role": "trial", "optuna.trial_number": str(best.number),
        "optuna.state": "COMPLETE"}).info.run_id
    try:
        client.log_artifact(run_id, str(tmp_path / "model.pt"), "model")
        client.set_terminated(run_id, "FINISHED")
        code, out, err = cli("export", "--study", "tok", *swept.common, "--out",
                             str(tmp_path / "m.pt"))
        assert code == 0, err
        cfg, _ = checkpoint.load(tmp_path / "m.pt")
        assert cfg.embedding_num == best.params["embedding_num"] != 24
    finally:
        client.delete_run(run_id)


def test_export_of_a_trial_of_an_empty_study_says_it_has_none(tmp_path, cli):
    import optuna

    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="bare", storage=storage)
    code, _, err = cli("export", "--study", "bare", "--storage", storage, "--trial", "0",
                       "--out", str(tmp_path / "m.pt"))
    assert code == 2 and "has no trial 0 (Seq1); it has no trial yet" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]


def test_a_complete_trial_whose_weights_were_deleted_says_so(swept, tmp_path, cli):
    """The best trial's model.pt deleted from the artifact store (by hand, a cleanup job): the
    error said only COMPLETE trials keep weights, of a trial that is COMPLETE."""
    best = best_of(swept.trials)
    run_id = best.user_attrs["mlflow.run_id"]
    [weights] = swept.folder.glob(f"mlartifacts/*/{run_id}/artifacts/model/model.pt")
    aside = weights.with_name("model.pt.aside")
    weights.rename(aside)
    try:
        code, out, err = cli("export", *swept.common, "--out", str(tmp_path / "m.pt"))
    finally:
        aside.rename(weights)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"has no weights: its run {run_id} holds no model/model.pt" in err
    assert "one deleted from the artifact store is gone" in err
    assert not (tmp_path / "m.pt").exists()


def test_damaged_weights_in_the_artifact_store_are_named_as_the_user_knows_them(swept, tmp_path,
                                                                                cli):
    """A model.pt cut short in the artifact store: the error named the temporary folder it was
    downloaded into (/tmp/vqlog-export-.../model.pt), gone by the time the user reads it."""
    best = best_of(swept.trials)
    run_id = best.user_attrs["mlflow.run_id"]
    [weights] = swept.folder.glob(f"mlartifacts/*/{run_id}/artifacts/model/model.pt")
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    try:
        code, _, err = cli("export", *swept.common, "--out", str(tmp_path / "m.pt"))
        code2, _, err2 = cli("encode", "--model", "models:/tok@best", "--data", "synthetic",
                             "--tracking-uri", swept.uri, "--out", str(tmp_path / "t.npy"))
    finally:
        weights.write_bytes(whole)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"Error: the weights file of Seq{best.number + 1} (trial {best.number}) of study "
            "'tok' is not a vqlog checkpoint") in err, err
    assert code2 == 2 and len(err2.strip().splitlines()) == 1, err2
    assert "Error: the weights file of models:/tok@best (version " in err2, err2
    assert "vqlog-e" not in err + err2 and not list(tmp_path.iterdir())


def test_the_registered_model_is_an_mlflow_model_that_mlflows_loader_takes(swept, tmp_path,
                                                                            monkeypatch):
    """`models:/<study>@best` was a folder with a weights file: `mlflow.pyfunc.load_model`
    found no MLmodel. A version is an MLflow Model now, whose predict gives encode's tokens."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from vqlog import checkpoint
    from vqlog.cli import main
    from vqlog.config import Config
    from vqlog.data import all_windows
    from vqlog.train import encode

    monkeypatch.setenv("MLFLOW_TRACKING_URI", swept.uri)
    tokenizer = mlflow.pyfunc.load_model("models:/tok@best")
    best = best_of(swept.trials)
    version = MlflowClient().get_model_version_by_alias("tok", "best")
    assert version.run_id == best.user_attrs["mlflow.run_id"]
    assert main(["export", "--study", "tok", *swept.common, "--out", str(tmp_path / "m.pt")]) == 0
    cfg, model = checkpoint.load(tmp_path / "m.pt")
    # as the README does it: the config from the model's metadata
    assert Config.from_mapping(tokenizer.metadata.metadata["vqlog.config"]) == cfg
    windows = all_windows("synthetic", cfg)
    tokens = tokenizer.predict(windows)
    assert tokens.dtype == np.int64 and np.array_equal(tokens, encode(model, windows).tokens)
    assert list(tokenizer.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [
        -1, cfg.window]
    assert tokenizer.metadata.metadata["vqlog.config"]["lr"] == best.params["lr"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="does not match"):
        tokenizer.predict(windows[:, :-1])  # the signature holds the window
    # no rows: none back, as the signature's -1 allows (the FFT raised "MKL FFT error")
    empty = tokenizer.predict(windows[:0])
    assert empty.dtype == np.int64 and empty.shape == (0, tokens.shape[1])


def test_best_moves_to_a_new_studys_trial_of_the_same_number(tmp_path, mlflow_store):
    """A study made anew in the same experiment (its old runs deleted) numbers its trials from 0
    again: the alias `best` stayed on the old study's trial 0, as it was taken for the same
    trial, and `models:/<study>@best` encoded with the old weights. It follows the run now."""
    from mlflow.tracking import MlflowClient

    from vqlog.tracking.artifacts import register_best

    client = MlflowClient(tracking_uri=mlflow_store())
    experiment = client.create_experiment("again")
    old, new = (client.create_run(experiment, run_name="Seq1").info.run_id for _ in range(2))
    assert register_best(client, "again", old, 0)
    assert not register_best(client, "again", old, 0)  # already there: no new version
    client.delete_run(old)
    assert register_best(client, "again", new, 0)
    assert client.get_model_version_by_alias("again", "best").run_id == new


def test_weights_that_make_no_mlflow_model_still_move_best(tmp_path, mlflow_store, caplog):
    """Making the MLflow Model can fail where the old registration could not (a file that does
    not load, a full disk): the alias moves all the same, to the run's model/ folder, with a
    warning; a run without weights gets that version as before."""
    from mlflow.tracking import MlflowClient

    from vqlog.tracking.artifacts import register_best

    client = MlflowClient(tracking_uri=mlflow_store())
    experiment = client.create_experiment("odd", artifact_location=(tmp_path / "a").as_uri())
    odd, bare = (client.create_run(experiment, run_name=f"Seq{i}").info.run_id for i in (1, 2))
    (tmp_path / "model.pt").write_bytes(b"not a model")
    client.log_artifact(odd, str(tmp_path / "model.pt"), "model")
    for number, run_id in enumerate((odd, bare)):
        assert register_best(client, "odd", run_id, number)
        version = client.get_model_version_by_alias("odd", "best")
        assert version.run_id == run_id and version.source.endswith(f"{run_id}/artifacts/model")
    assert "odd@best is registered without its MLflow Model (" in caplog.text
    assert "is not a vqlog checkpoint" in caplog.text


def test_a_model_without_a_quantizer_gets_no_tokenizer_but_keeps_best(tmp_path, mlflow_store,
                                                                       caplog):
    """The `baseline` spec's best trial (quantizer none) was registered as an MLflow Model whose
    predict always failed ("the model has no quantizer"). It makes no tokens: its version is
    the run's model/ folder, which `vqlog export` reads, with no warning."""
    from mlflow.tracking import MlflowClient

    from vqlog import checkpoint
    from vqlog.config import Config
    from vqlog.model.vqvae import VQVAE
    from vqlog.tracking.artifacts import register_best

    client = MlflowClient(tracking_uri=mlflow_store())
    experiment = client.create_experiment("plain", artifact_location=(tmp_path / "a").as_uri())
    runs = {}
    for quantizer in ("none", "vq"):
        cfg = Config(d_model=8, d_state=8, n_layers=1, embedding_dim=8, embedding_num=16,
                     window=64, stride=64, quantizer=quantizer)
        checkpoint.save(tmp_path / quantizer / "model.pt", cfg, VQVAE(cfg))
        runs[quantizer] = client.create_run(experiment).info.run_id
        client.log_artifact(runs[quantizer], str(tmp_path / quantizer / "model.pt"), "model")
    for number, quantizer in enumerate(("none", "vq")):
        assert register_best(client, "plain", runs[quantizer], number)
        version = client.get_model_version_by_alias("plain", "best")
        folder = "model" if quantizer == "none" else "tokenizer"
        assert version.source.endswith(f"{runs[quantizer]}/artifacts/{folder}"), version.source
        names = {a.path for a in client.list_artifacts(runs[quantizer])}
        assert ("tokenizer" in names) == (quantizer == "vq"), names
    assert "registered without" not in caplog.text
