"""vqlog.checkpoint: what `vqlog train --save` writes loads back into the same model, and a file
that would run code when unpickled is refused, not executed (weights-only load)."""

import os
import pickle

import pytest
import torch

from vqlog import checkpoint
from vqlog.errors import UserError
from vqlog.model.vqvae import VQVAE



def test_save_then_load_gives_the_same_model(tmp_path, tiny):
    cfg = tiny(BN="yes", MLP="linear")
    torch.manual_seed(0)
    model = VQVAE(cfg).eval()
    checkpoint.save(tmp_path / "model.pt", cfg, model)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left

    loaded_cfg, loaded = checkpoint.load(tmp_path / "model.pt")
    assert loaded_cfg == cfg and not loaded.training
    x = torch.randn(2, cfg.window)  # (B L)
    with torch.no_grad():
        assert torch.equal(model(x).recon, loaded(x).recon)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:  # a bare pickle: not even opened as one
        pickle.dump({"config": {}, "state_dict": _RunsCode()}, f)
    with pytest.raises(UserError, match=r"is not a vqlog checkpoint \(not a file torch.save wrote\)"):
        checkpoint.load(path)
    torch.save({"config": {}, "state_dict": _RunsCode()}, tmp_path / "evil-zip.pt")  # as torch does
    with pytest.raises(UserError, match="is not a vqlog checkpoint that loads safely"):
        checkpoint.load(tmp_path / "evil-zip.pt")
    assert not (tmp_path / "pwned").exists()


def test_a_file_of_another_kind_is_named_as_such(tmp_path):
    import numpy as np

    np.save(tmp_path / "signals.npy", np.zeros(8))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"signals.npy is not a vqlog checkpoint \(a NumPy array\); "
                                        "give the file of vqlog train --save or vqlog export"):
        checkpoint.load(tmp_path / "signals.npy")
    with pytest.raises(UserError, match=r"notes.txt is not a vqlog checkpoint \(not a file"):
        checkpoint.load(tmp_path / "notes.txt")  # before: KeyError from the unpickler, exit 1


def test_missing_foreign_and_mismatched_files_name_the_problem(tmp_path, tiny):
    with pytest.raises(UserError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="expected keys config and state_dict"):
        checkpoint.load(tmp_path / "other.pt")
    cfg = tiny()
    wrong = tiny(embedding_num=32)
    torch.save({"config": wrong.to_params(), "state_dict": VQVAE(cfg).state_dict()},
               tmp_path / "mismatch.pt")
    # the line names the key and the shapes (it stopped at torch's "Error(s) in loading ...")
    with pytest.raises(UserError, match=r"weights do not fit its config: size mismatch for "
                                        r"quantizer\.codebook: copying a param with shape torch.Size\(\[16, 8\]\)"):
        checkpoint.load(tmp_path / "mismatch.pt")
    # a config or state_dict of another type (AttributeError, TypeError: exit 1 before)
    for name, bad in (("config-a-str.pt", {"config": "hello", "state_dict": {}}),
                      ("weights-none.pt", {"config": cfg.to_params(), "state_dict": None}),
                      ("weights-a-list.pt", {"config": cfg.to_params(), "state_dict": [1, 2]})):
        torch.save(bad, tmp_path / name)
        with pytest.raises(UserError, match=rf"{name} is not a vqlog checkpoint \(its "
                                            r"(config|state_dict) is a (str|NoneType|list)"):
            checkpoint.load(tmp_path / name)
