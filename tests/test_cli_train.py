"""`vqlog train` in-process: a tiny run prints its summary and saves loadable weights; every bad
input exits 2 with exactly one `Error:` line on stderr that names the problem, and no traceback."""

import os
import pickle
import re

import numpy as np
import pytest
import torch

from vqlog.config import Config
from vqlog.model.vqvae import VQVAE

# The tiny model, with a smaller batch and an evaluation every 5 steps.
SMALL = dict(batch=4, eval_every=5, warmup=2)


def assert_one_error_line(rc: int, err: str, *fragments: str) -> str:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def signal_file(tmp_path):
    """Write a 1-D array to tmp_path/<name> with np.save and return the path as a string."""

    def write(array, name="signal.npy") -> str:
        path = tmp_path / name
        np.save(path, array)
        return str(path)

    return write


def pulses(n=3000, seed=0) -> np.ndarray:
    t = np.arange(n) / 50.0
    rng = np.random.default_rng(seed)
    return np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 2.4 * t) + 0.05 * rng.normal(size=n)


# --------------------------------------------------------------------------- runs that work


def test_tiny_run_on_synthetic_prints_a_summary_and_saves_weights(tmp_path, monkeypatch, cli, tiny):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("iteration: 50\nlr: 5e-3\nBN: no\nMLP: linear\nquantizer: vq\n")
    save = tmp_path / "model.pt"
    rc, out, err = cli("train", "--data", "synthetic", "--config", str(config), *tiny.args(**SMALL),
                       "--set", "iteration=10", "--save", str(save))  # --set beats the file
    assert rc == 0, err
    assert "data: synthetic: 900 train / 112 valid / 112 test windows of 32 samples at 50 Hz" in out
    assert "step      5  val mse" in out and "step     10  val mse" in out
    assert "iterations     10" in out
    assert "val MSE        final" in out and "perplexity     final" in out
    assert "code usage" in out and f"saved: {save}" in out
    assert "Error" not in err and "Traceback" not in err

    ckpt = torch.load(save, weights_only=True)
    cfg = Config.from_mapping(ckpt["config"])
    assert (cfg.iteration, cfg.lr, cfg.BN, cfg.MLP, cfg.d_model) == (10, 5e-3, False, "linear", 8)
    VQVAE(cfg).load_state_dict(ckpt["state_dict"])  # strict: every key and shape matches
    assert not list(tmp_path.glob("*.tmp"))


def test_user_file_with_quantizer_none(signal_file, cli, tiny):
    path = signal_file(pulses())
    rc, out, err = cli("train", "--data", path, "--sample-rate", "50", *tiny.args(**SMALL),
                       "--set", "iteration=5", "--set", "quantizer=none", "--device", "cpu")
    assert rc == 0, err
    assert f"data: {path}:" in out and "at 50 Hz" in out
    assert "val MSE" in out and "perplexity" not in out  # no codes, no perplexity line
    # nor a codebook's sizes, which mean nothing here
    assert "  quantizer      none  (downsample 4)\n" in out, out


def test_an_fsq_summary_gives_its_real_number_of_codes(cli, tiny):
    """FSQ's codebook is the product of its levels: embedding_num 256 gives 8x6x5 = 240 codes,
    as `vqlog encode` says; the summary said "embedding_num 256" and "% of the codebook"."""
    rc, out, err = cli("train", "--data", "synthetic", *tiny.args(**SMALL), "--set",
                       "iteration=5", "--set", "quantizer=fsq", "--set", "embedding_num=256")
    assert rc == 0, err
    assert "  quantizer      fsq  (240 codes, the nearest FSQ size to embedding_num 256; " in out
    assert re.search(r"  code usage     \d+\.\d% of the 240 codes\n", out), out


def test_a_model_trained_at_its_datas_own_rate_cuts_other_data_at_that_rate(signal_file, tmp_path,
                                                                           cli, tiny):
    """resample_hz null: the model file records the 50 Hz it learned on, and encode brings a
    100 Hz recording of the same signal to 50 Hz (same windows, same tokens); it cut windows at
    100 Hz, each half the time the model was trained on."""
    from vqlog import checkpoint

    at50 = signal_file(pulses(6000), "s50.npy")
    t = np.arange(12000) / 100.0  # the same pulses, without the noise, at 100 Hz
    at100 = signal_file(np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 2.4 * t), "s100.npy")
    same50 = signal_file(np.sin(2 * np.pi * 1.2 * t[::2]) + 0.3 * np.sin(2 * np.pi * 2.4 * t[::2]),
                         "same50.npy")
    save = tmp_path / "native.pt"
    rc, out, err = cli("train", "--data", at50, "--sample-rate", "50", *tiny.args(**SMALL),
                       "--set", "resample_hz=null", "--set", "iteration=5", "--save", str(save))
    assert rc == 0, err
    assert torch.load(save, weights_only=True)["sample_rate"] == 50.0
    cfg, model = checkpoint.load(save)
    assert (cfg.resample_hz, model.sample_rate) == (50.0, 50.0)
    tokens = {}
    for name, path, rate in (("100", at100, "100"), ("50", same50, "50")):
        out_file = tmp_path / f"t{name}.npy"
        rc, out, err = cli("encode", "--model", str(save), "--data", path, "--sample-rate", rate,
                           "--out", str(out_file))
        assert rc == 0, err
        assert "(32 samples at 50 Hz, 4 per code)" in out, out
        tokens[name] = np.load(out_file)
    assert tokens["100"].shape == tokens["50"].shape == (6000 // 32, 8)
    assert (tokens["100"] == tokens["50"]).mean() > 0.9  # resampling rounds a few codes apart

    # --stride 16 (the model's is 32): overlapping rows; --index says where each one starts
    index = tmp_path / "t100.csv"
    rc, out, err = cli("encode", "--model", str(save), "--data", at100, "--sample-rate", "100",
                       "--stride", "16", "--index", str(index), "--out", str(tmp_path / "s.npy"))
    assert rc == 0, err
    assert np.load(tmp_path / "s.npy").shape == ((6000 - 32) // 16 + 1, 8)
    lines = index.read_text().splitlines()
    assert lines[0] == "row,recording,start_sample,start_seconds,sample_rate,source_seconds"
    assert lines[1] == f"0,{at100},0,0,50,0" and lines[2] == f"1,{at100},16,0.32,50,0.32"
    assert len(lines) == 1 + (6000 - 32) // 16 + 1
    assert f"index: where each row comes from -> {index}" in out
    rc, _, err = cli("encode", "--model", str(save), "--data", at100, "--sample-rate", "100",
                     "--stride", "0", "--out", str(tmp_path / "z.npy"))
    assert rc == 2 and err == "Error: --stride must be a number of samples >= 1, got 0\n", err
    assert not (tmp_path / "z.npy").exists()
    # one file as --out and --index: the index replaced the tokens, with exit 0; --out on the
    # model or the data replaced it with the tokens
    linked = tmp_path / "linked.pt"
    os.link(save, linked)
    for flags, message in (
            (["--out", str(tmp_path / "same"), "--index", str(tmp_path / "./same")],
             "--out and --index are one file"),
            (["--out", str(save)], f"--out {save} is the --model file, which it would overwrite"),
            (["--out", str(linked)], f"--out {linked} is the --model file"),  # a hard link
            (["--out", str(tmp_path / "t50.npy"), "--index", at100],
             f"--index {at100} is the --data file, which it would overwrite")):
        before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
        rc, out, err = cli("encode", "--model", str(save), "--data", at100, "--sample-rate",
                           "100", *flags)
        assert rc == 2 and err.startswith(f"Error: {message}") and err.count("\n") == 1, err
        assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    # ... but an output named after the data is no input: run again, it is written again (it
    # was taken for one of the data's files, `<data>.*`, once it existed)
    for _ in range(2):
        rc, out, err = cli("encode", "--model", str(save), "--data", at100, "--sample-rate",
                           "100", "--out", f"{at100}.tokens.npy")
        assert rc == 0, err

    # A model file from before the rate was recorded still loads, at the data's own rate.
    ckpt = torch.load(save, weights_only=True)
    del ckpt["sample_rate"]
    torch.save(ckpt, tmp_path / "old.pt")
    cfg, model = checkpoint.load(tmp_path / "old.pt")
    assert (cfg.resample_hz, model.sample_rate) == (None, None)


def test_encodes_rate_errors_advise_what_encode_takes_not_the_spec_key(signal_file, tmp_path,
                                                                         cli, tiny):
    """The model sets encode's rate: its rate errors said to change resample_hz, a spec key
    that encode does not take."""
    save = tmp_path / "m.pt"
    rc, _, err = cli("train", "--data", signal_file(pulses()), "--sample-rate", "50",
                     *tiny.args(**SMALL), "--set", "iteration=5", "--save", str(save))
    assert rc == 0, err
    at = signal_file(pulses(), "any.npy")
    for data, rate, what, advice in (
            ("ppg", "30", "the ppg recordings carry their own sample rates",
             "drop --sample-rate (the data's own rate is used, resampled to the model's 50 Hz)"),
            (at, "60000", "cannot resample 60000 Hz to 50 Hz within 0.1%",
             "the model takes 50 Hz: check the data's sample rate")):
        out_file = tmp_path / "t.npy"
        rc, out, err = cli("encode", "--model", str(save), "--data", data, "--sample-rate", rate,
                           "--out", str(out_file))
        assert rc == 2 and out == "", out + err
        (line,) = err.splitlines()
        assert line.startswith(f"Error: {what}") and advice in line, line
        assert "resample_hz" not in line and not out_file.exists()


# --------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "foo=1"], ["unknown config key 'foo'"]),
        (["--set", "learning-rate=1e-3"], ["'learning-rate'"]),
        (["--set", "batch=0"], ["batch must be at least 1"]),
        (["--set", "batch=x"], ["batch must be an integer", "'x'"]),
        (["--set", "BN=maybe"], ["BN must be yes or no"]),
        (["--set", "lr=-1"], ["lr must be > 0"]),
        (["--set", "lr=.nan"], ["lr"]),
        (["--set", "commitment=.inf"], ["commitment must be a finite number"]),
        (["--set", "d_state=7"], ["d_state"]),
        (["--set", "window=30"], ["window (30) must be a multiple of downsample (4)"]),
        (["--set", "quantizer=rvq"], ["quantizer must be one of"]),
        (["--set", "lr"], ["--set expects key=value", "'lr'"]),
        (["--config", "nope.yaml"], ["config file not found: nope.yaml"]),
        (["--data", "missing.npy", "--sample-rate", "50"], ["data file not found: missing.npy"]),
        (["--data", "nowhere"], ["unknown data source 'nowhere'"]),
        (["--bogus"], ["unrecognized arguments: --bogus", "(see 'vqlog train --help')"]),
        (["--sav", "model.pt"], ["unrecognized arguments: --sav model.pt"]),  # no abbreviation
        (["--device", "tpu"], ["--device", "'tpu'"]),
        (["--save", "no/such/folder/model.pt", "--data", "synthetic"], ["cannot write", "model.pt"]),
    ],
)
def test_bad_arguments(tmp_path, monkeypatch, args, fragments, cli, tiny):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli("train", *tiny.args(**SMALL), *args)
    assert_one_error_line(rc, err, *fragments)
    assert "val MSE" not in out  # it stopped before training


def test_bad_config_file(tmp_path, cli):
    path = tmp_path / "broken.yaml"
    path.write_text("batch: [1, 2\n")
    rc, _, err = cli("train", "--config", str(path))
    assert_one_error_line(rc, err, "broken.yaml", "not valid YAML")


def test_a_sweep_spec_given_to_train_says_it_is_one(tmp_path, cli):
    """It said `unknown config key 'name'`, with no word of what the file was."""
    from vqlog.study.spec import resolve_spec_path

    rc, _, err = cli("train", "--config", str(resolve_spec_path("smoke")), "--data", "synthetic")
    assert_one_error_line(rc, err, "smoke.yaml is a sweep spec (it has name, description, data, "
                          "...)", "vqlog-sweep --config")
    spec = tmp_path / "point.yaml"  # a spec's top keys alone, none of its sections
    spec.write_text("name: mine\nobjective: mse\nbatch: 8\n")
    rc, _, err = cli("train", "--config", str(spec), "--data", "synthetic")
    assert_one_error_line(rc, err, "point.yaml is a sweep spec (it has name, objective)")


BAD_FILES = {  # id: (file name, writer(path), fragments the error line must hold)
    "pickle": ("pickled.npy", lambda p: p.write_bytes(pickle.dumps({"signal": [1.0, 2.0]})),
               ["pickled.npy", "is not a .npy array"]),
    "object-array": ("objects.npy",
                     lambda p: np.save(p, np.array([{"a": 1}, [1]], dtype=object), allow_pickle=True),
                     ["objects.npy", "Python objects"]),
    "nan": ("nan.npy", lambda p: np.save(p, np.r_[pulses(), np.nan]),
            ["nan.npy", "NaN or Inf", "sample 3000"]),
    "constant": ("flat.npy", lambda p: np.save(p, np.full(3000, 7.0)), ["flat.npy", "constant"]),
    "too-short": ("short.npy", lambda p: np.save(p, pulses(100)),
                  ["short.npy", "no windows", "window=32"]),
    "3d": ("cube.npy", lambda p: np.save(p, np.ones((2, 3, 400))), ["cube.npy", "shape (2, 3, 400)"]),
    "txt": ("notes.txt", lambda p: p.write_text("1,2,3"), ["notes.txt", "unsupported file type"]),
}


@pytest.mark.parametrize("name, write, fragments", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_data_files(tmp_path, name, write, fragments, cli, tiny):
    path = tmp_path / name
    write(path)
    rc, out, err = cli("train", "--data", str(path), "--sample-rate", "50", *tiny.args(**SMALL))
    assert_one_error_line(rc, err, *fragments)


def test_user_file_needs_a_sample_rate(signal_file, cli, tiny):
    path = signal_file(pulses())
    rc, _, err = cli("train", "--data", path, *tiny.args(**SMALL))
    assert_one_error_line(rc, err, path, "--sample-rate")


@pytest.mark.parametrize("rate", ["0", "-5"])
def test_bad_sample_rate(signal_file, rate, cli, tiny):
    rc, _, err = cli("train", "--data", signal_file(pulses()), "--sample-rate", rate, *tiny.args(**SMALL))
    assert_one_error_line(rc, err, "sample rate must be a positive number")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(signal_file, cli, tiny):
    rc, out, err = cli("train", "--data", signal_file(pulses()), "--sample-rate", "50", *tiny.args(**SMALL),
                       "--device", "cuda")
    assert_one_error_line(rc, err, "--device cuda", "no CUDA GPU", "--device cpu")
    assert "val MSE" not in out


def test_save_to_a_folder_is_refused_before_training(tmp_path, signal_file, cli, tiny):
    folder = tmp_path / "out"
    folder.mkdir()
    rc, out, err = cli("train", "--data", signal_file(pulses()), "--sample-rate", "50", *tiny.args(**SMALL),
                       "--set", "iteration=2", "--save", str(folder))
    assert_one_error_line(rc, err, str(folder))
    assert "val MSE" not in out and not list(tmp_path.glob("*.tmp"))


def test_divergence_is_one_error_line_that_says_what_to_change(signal_file, cli, tiny):
    huge = pulses() * 1e30  # standardized per window, so the scale is in the data on purpose
    rc, out, err = cli("train", "--data", signal_file(huge), "--sample-rate", "50", *tiny.args(**SMALL),
                       "--set", "iteration=5", "--set", "standardize=dataset", "--set", "lr=1e6",
                       "--set", "grad_clip=0")
    assert_one_error_line(rc, err, "diverged", "lower lr (now 1e+06)")


def test_the_quantizer_librarys_k_means_warning_stays_out_of_the_output(tmp_path, tiny):
    """vq_ema's k-means init on a first batch with fewer vectors than codes: loguru's WARNING
    line (with its own timestamp) went to stderr, once a trial, between the trial lines."""
    import os
    import subprocess

    from _sweep_helpers import SUBPROCESS_ENV, SWEEP_BIN

    args = tiny.args(quantizer="vq_ema", embedding_num=512, batch=2, iteration=4, eval_every=2)
    proc = subprocess.run([str(SWEEP_BIN.parent / "vqlog"), "train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "k-means" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr


def _overcommits() -> bool:
    """vm.overcommit_memory 1: any allocation succeeds, and touching it calls the OOM killer."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "1"
    except OSError:
        return True


@pytest.mark.skipif(_overcommits(), reason="an allocation of 1.9 TiB would not fail here")
def test_a_model_too_large_for_memory_is_one_error_line(tmp_path, cli, monkeypatch):
    """A codebook of 10^9 codes of 512 values (1.9 TiB): torch's allocator error, a paragraph
    naming its C++ file, ended the command with exit 1. One line now, with the sizes to lower."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", "--data", "synthetic", "--set", "embedding_num=1000000000",
                         "--set", "embedding_dim=512", "--set", "iteration=1",
                         "--save", "model.pt")
    assert code == 2, err
    assert err.startswith("Error: training ran out of memory (one allocation of ") \
        and len(err.splitlines()) == 1, err
    assert "GiB): lower one of batch 32, window 256, d_model 64, d_state 64, embedding_dim " \
           "512, embedding_num 1000000000" in err
    assert "alloc_cpu" not in err and not (tmp_path / "model.pt").exists()


def test_out_of_memory_reasons():
    from vqlog.errors import out_of_memory

    assert out_of_memory(ValueError("x")) is None
    assert out_of_memory(RuntimeError("shape mismatch")) is None
    assert out_of_memory(MemoryError("Unable to allocate 3.5 GiB for an array with shape")) \
        == "out of memory (one allocation of 3.5 GiB)"
    cuda = type("OutOfMemoryError", (RuntimeError,), {})(
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total capacity)")
    assert out_of_memory(cuda) == "out of memory (one allocation of 20.00 MiB)"
