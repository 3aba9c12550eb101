"""vqlog.files: the table and saved weights are replaced whole or not at all, keep their mode, and
temp files a killed writer left are removed once they are old (never a live writer's)."""

import os
import stat
import time

import pytest

from vqlog.files import ORPHAN_AGE, atomic_write, write_text


def test_write_text_creates_parents_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results" / "deep" / "study.md"
    write_text(path, "one\n")
    write_text(path, "two ★\n")
    assert path.read_text(encoding="utf-8") == "two ★\n"
    assert os.listdir(path.parent) == ["study.md"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "study.md"
    write_text(path, "old\n")

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["study.md"]


def test_the_mode_of_the_replaced_file_is_kept(tmp_path):
    path = tmp_path / "study.md"
    write_text(path, "old\n")
    path.chmod(0o640)
    write_text(path, "new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_old_temp_files_of_a_killed_writer_go_and_fresh_ones_stay(tmp_path):
    path = tmp_path / "study.md"
    old, fresh = tmp_path / ".study.md.dead.tmp", tmp_path / ".study.md.live.tmp"
    other = tmp_path / ".other.md.dead.tmp"  # another file's: not ours to remove
    for tmp in (old, fresh, other):
        tmp.write_text("partial")
    long_ago = time.time() - ORPHAN_AGE - 60
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    write_text(path, "table\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.md.dead.tmp", ".study.md.live.tmp", "study.md"])


def test_a_link_is_followed_and_kept(tmp_path):
    """A results/ table or an --out that is a symbolic link: the rename replaced the link with a
    file, and the file it pointed to never changed."""
    target = tmp_path / "elsewhere" / "table.md"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "table.md"
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["table.md"]  # no temp file left


def test_a_named_pipe_is_written_through(tmp_path):
    import threading

    fifo = tmp_path / "tokens.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_text(fifo, "through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a pipe, not a file of that name
    # np.save and torch.save (encode --out, export --out) asked a pipe for its file position
    import io

    import numpy as np
    import torch

    for save, load in ((lambda f: np.save(f, np.arange(5), allow_pickle=False), np.load),
                       (lambda f: torch.save({"w": torch.ones(3)}, f),
                        lambda b: torch.load(b, weights_only=True)["w"].numpy())):
        got.clear()
        reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
        reader.start()
        atomic_write(fifo, save)
        reader.join(10)
        assert load(io.BytesIO(got[0])).sum() in (10, 3)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a link another user's")
def test_another_users_link_is_not_followed(tmp_path):
    """A link planted in a shared folder by another user, pointing at this user's file: the
    write must not go through it (in a sticky /tmp the rename over it fails instead)."""
    mine = tmp_path / "bashrc"
    mine.write_text("mine")
    planted = tmp_path / "t.npy"
    planted.symlink_to(mine)
    os.lchown(planted, 65534, 65534)
    write_text(planted, "tokens")
    assert mine.read_text() == "mine" and not planted.is_symlink()
    assert planted.read_text() == "tokens"


def test_a_link_to_a_missing_folder_is_replaced_not_followed(tmp_path):
    link = tmp_path / "out.md"
    link.symlink_to(tmp_path / "no" / "such" / "folder" / "out.md")
    write_text(link, "table")
    assert not link.is_symlink() and link.read_text() == "table"
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root (as the Docker image runs)")
def test_a_device_is_written_through_not_replaced(tmp_path):
    """As root, `vqlog encode --out /dev/null` replaced the system's /dev/null with a file. A
    null device of the test's own stands in for it."""
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    write_text(null, "discarded")
    assert stat.S_ISCHR(os.stat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_dev_stdout_on_a_pipe_is_written_through(tmp_path):
    """`vqlog encode --out /dev/stdout | next-tool` was refused: /dev/stdout resolves to
    /proc/<pid>/fd/pipe:[n], and the check of its folder said `cannot write /dev/stdout:
    /proc/<pid>/fd is not writable`; np.save then asked the pipe for its position."""
    import io
    import subprocess

    import numpy as np

    from _sweep_helpers import SWEEP_BIN
    from vqlog import checkpoint
    from vqlog.config import Config
    from vqlog.model.vqvae import VQVAE

    cfg = Config(d_model=8, d_state=8, n_layers=1, embedding_dim=8, embedding_num=16, window=64,
                 stride=64, quantizer="vq")
    checkpoint.save(tmp_path / "m.pt", cfg, VQVAE(cfg))
    proc = subprocess.run([str(SWEEP_BIN.parent / "vqlog"), "encode", "--model", "m.pt", "--data",
                           "synthetic", "--out", "/dev/stdout"], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    data = io.BytesIO(proc.stdout)
    tokens = np.load(data)
    assert tokens.ndim == 2 and tokens.shape[1] == 64 // cfg.downsample and tokens.max() < 16
    assert data.read() == b""  # the summary lines go to stderr, not into the file
    assert proc.stderr.decode().startswith("tokens: ") and "-> /dev/stdout" in proc.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_train_save_dev_stdout_is_the_model_alone(tmp_path):
    """`vqlog train --save /dev/stdout | tool`: the data line, the evaluations and the summary
    ran into the model, which then did not load; exit 0."""
    import io
    import subprocess

    import torch

    from _sweep_helpers import SWEEP_BIN

    sets = ["iteration=4", "eval_every=2", "d_model=8", "d_state=8", "n_layers=1", "window=64",
            "stride=64", "embedding_dim=8", "embedding_num=16", "batch=4"]
    proc = subprocess.run([str(SWEEP_BIN.parent / "vqlog"), "train", "--data", "synthetic",
                           *(a for s in sets for a in ("--set", s)), "--save", "/dev/stdout"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    state = torch.load(io.BytesIO(proc.stdout), weights_only=True)
    assert state["config"]["embedding_num"] == 16 and "state_dict" in state
    err = proc.stderr.decode()
    assert err.startswith("data: synthetic: ") and "saved: /dev/stdout" in err, err


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the command as another user (nobody)")
def test_dev_stdout_to_a_file_as_a_user_who_cannot_write_dev(tmp_path):
    """`vqlog encode --out /dev/stdout > tokens.npy` as a user: /dev/stdout is root's link, so it
    was not followed, and the temp file beside it failed after all the work: `Error:
    PermissionError: ... '/dev/.stdout.xxx.tmp'`, exit 1, an empty file. The command runs in a
    process that becomes nobody after its imports (Python's own files may be closed to nobody)."""
    import subprocess
    import sys

    import numpy as np

    from vqlog import checkpoint
    from vqlog.config import Config
    from vqlog.model.vqvae import VQVAE

    os.chmod(tmp_path, 0o777)
    cfg = Config(d_model=8, d_state=8, n_layers=1, embedding_dim=8, embedding_num=16, window=64,
                 stride=64, quantizer="vq")
    checkpoint.save(tmp_path / "m.pt", cfg, VQVAE(cfg))
    script = f"""
import os, sys
from vqlog.cli import main
args = ["encode", "--model", "m.pt", "--data", "synthetic", "--out"]
assert main([*args, "warm.npy"]) == 0  # every module imported while root
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.environ["TMPDIR"] = {str(tmp_path)!r}
fd = os.open("tokens.npy", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
sys.stdout.flush(); os.dup2(fd, 1)
sys.exit(main([*args, "/dev/stdout"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tokens.npy").stat().st_uid == 65534
    tokens, warm = np.load(tmp_path / "tokens.npy"), np.load(tmp_path / "warm.npy")
    assert np.array_equal(tokens, warm) and proc.stderr.startswith("tokens: "), proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the command as another user (nobody)")
def test_a_model_file_the_user_cannot_read_is_one_error_line(request):
    """`vqlog encode --model m.pt` on a file closed to the user said `Error: PermissionError:
    ... (rerun with --debug)`, exit 1: zipfile's check hid why it could not look inside."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from vqlog import checkpoint
    from vqlog.config import Config
    from vqlog.model.vqvae import VQVAE

    # in /tmp itself: pytest's folders are closed to other users, and so would the output be
    scratch = tempfile.TemporaryDirectory(dir="/tmp", prefix="vqlog-unreadable-")
    request.addfinalizer(scratch.cleanup)
    tmp_path = Path(scratch.name)
    os.chmod(tmp_path, 0o777)
    cfg = Config(d_model=8, d_state=8, n_layers=1, embedding_dim=8, embedding_num=16, window=64,
                 stride=64, quantizer="vq")
    checkpoint.save(tmp_path / "m.pt", cfg, VQVAE(cfg))
    checkpoint.save(tmp_path / "open.pt", cfg, VQVAE(cfg))
    os.chmod(tmp_path / "m.pt", 0o600)
    script = """
import os, sys
from vqlog.cli import main
args = ["encode", "--data", "synthetic", "--model"]
assert main([*args, "open.pt", "--out", "warm.npy"]) == 0  # every module imported while root
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(main([*args, "m.pt", "--out", "t.npy"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == "Error: m.pt cannot be read: Permission denied"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "open.pt", "warm.npy"]


@pytest.mark.parametrize("command", [
    ("train", "--save", "{out}"),
    ("table", "--study", "smoke", "--out", "{out}"),
    ("export", "--study", "smoke", "--out", "{out}"),
    ("encode", "--model", "model.pt", "--data", "synthetic", "--out", "{out}"),
    ("encode", "--model", "model.pt", "--data", "synthetic", "--out", "t.npy", "--index", "{out}"),
])
def test_an_output_is_never_an_sqlite_database(tmp_path, cli, monkeypatch, command):
    """`vqlog export --out optuna.db` (and table, encode, train --save) replaced the study's
    own store with a model file, exit 0: every run and trial gone. Refused before any work."""
    import sqlite3

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "optuna.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE studies (id INTEGER)")
    conn.close()
    before = db.read_bytes()
    code, out, err = cli(*(a.format(out=db) for a in command))
    assert code == 2 and out == "", err
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    assert f"{db} is an SQLite database" in err
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]


@pytest.mark.parametrize("command", [("export", "--study", "smoke", "--out", "-"),
                                     ("encode", "--model", "m.pt", "--data", "ppg", "--out", "-")])
def test_a_dash_is_no_file_name_where_the_output_is_binary(tmp_path, cli, monkeypatch, command):
    """`vqlog table --out -` prints the table; export and encode wrote a file named "-"."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(*command)
    assert code == 2 and "writes a file, not standard output" in err, err
    assert list(tmp_path.iterdir()) == []


def test_files_written_together_are_all_replaced_or_none(tmp_path):
    """encode's tokens and their index: an index write that failed (a full disk) left new tokens
    beside the old index, exit 1. Now every file is written before any is renamed."""
    from vqlog.files import atomic_write_all

    tokens, index = tmp_path / "t.npy", tmp_path / "t.csv"
    tokens.write_bytes(b"old tokens")
    index.write_bytes(b"old index")

    def full(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write_all([(tokens, lambda f: f.write(b"new tokens")), (index, full)])
    assert tokens.read_bytes() == b"old tokens" and index.read_bytes() == b"old index"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.npy"]  # no temp file left
    atomic_write_all([(tokens, lambda f: f.write(b"new tokens")),
                      (index, lambda f: f.write(b"new index"))])
    assert tokens.read_bytes() == b"new tokens" and index.read_bytes() == b"new index"


def test_a_new_file_takes_the_users_umask(tmp_path):
    """New files were always 0644: a user's umask 077 (tokens of patients' data) was ignored."""
    before = os.umask(0o077)
    try:
        write_text(tmp_path / "private.md", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "private.md").stat().st_mode) == 0o600
    before = os.umask(0o022)
    try:
        write_text(tmp_path / "shared.md", "x")  # the usual umask: readable by others, as before
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "shared.md").stat().st_mode) == 0o644


@pytest.mark.parametrize("command, given", [
    (("train", "--data", "{data}", "--sample-rate", "100", "--save", "{data}"), "--data"),
    (("train", "--config", "{config}", "--data", "synthetic", "--save", "{config}"), "--config"),
    (("table", "--config", "{spec}", "--out", "{spec}"), "--config"),
    (("table", "--config", "{spec}", "--out", "{link}"), "--config"),  # the spec by another name
])
def test_an_output_is_never_a_file_the_command_reads(tmp_path, cli, monkeypatch, command, given):
    """`vqlog train --data sig.npy --save sig.npy` trained, then replaced the recording with the
    model, exit 0 (encode refused it already); `--save` on the config and table's `--out` on
    its spec did the same."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "sig.npy", np.sin(np.arange(3000) / 7.0))
    (tmp_path / "c.yaml").write_text("iteration: 2\n")
    (tmp_path / "s.yaml").write_text("name: mine\nspace:\n  lr: [0.001]\n")
    os.symlink("s.yaml", tmp_path / "link.yaml")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    values = {"data": "sig.npy", "config": "c.yaml", "spec": "s.yaml", "link": "link.yaml"}
    code, out, err = cli(*(a.format(**values) for a in command))
    assert code == 2 and out == "", err
    assert err.startswith(f"Error: {command[-2]} {command[-1].format(**values)} is the {given} "
                          "file, which it would overwrite") and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_output_that_names_a_folder_or_goes_through_a_broken_link_is_refused(tmp_path, cli,
                                                                                 monkeypatch):
    """`vqlog table --out fresh/` wrote the table as a file named `fresh` (exit 0); `--out
    gone/t.md`, gone a link to a folder that does not exist, failed on the link after the work
    (`FileExistsError`, exit 1)."""
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "nowhere", tmp_path / "gone")
    os.symlink("/proc/sys/vqlog-table.md", tmp_path / "proc.md")
    for command, message in (
            (("table", "--study", "s", "--out", "fresh/"),
             "--out fresh/ names a folder, which does not exist; give a file name such as "
             "fresh/table.md"),
            (("export", "--study", "s", "--out", "new/"), "--out new/ names a folder"),
            (("table", "--study", "s", "--out", "gone/t.md"),
             f"cannot write gone/t.md: {tmp_path / 'gone'} is a link to {tmp_path / 'nowhere'}, "
             "which does not exist"),
            (("table", "--study", "s", "--out", "gone/deeper/t.md"), "cannot write gone/deeper"),
            # a link of this user's is written through: its folder is the one checked (the
            # folder of the name as typed was, and the write failed after the work, exit 1)
            (("table", "--study", "s", "--out", "proc.md"),
             "cannot write proc.md: /proc/sys is not writable")):
        code, out, err = cli(*command)
        assert code == 2 and err.startswith(f"Error: {message}"), err
        assert len(err.splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "proc.md"]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the command as another user (nobody)")
def test_another_users_file_in_a_shared_folder_is_refused_before_the_work(request):
    """In a folder with the sticky bit (/tmp), only a file's owner may replace it: `vqlog table
    --out /tmp/t.md` over another user's t.md failed at the rename, after the work, with the temp
    file's name (`PermissionError: ... '.t.md.xxx.tmp' -> ...`, exit 1)."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    shared = Path(tempfile.mkdtemp(prefix="vqlog-shared-"))  # where nobody can reach it
    request.addfinalizer(lambda: shutil.rmtree(shared))
    os.chmod(shared, 0o1777)
    (shared / "t.md").write_text("root's\n")
    os.symlink("/nonexistent/mine.md", shared / "link.md")  # root's link: replaced, not followed
    script = """
import os, sys
from vqlog.cli import main
# every module imported while root (Python's own files may be closed to nobody): no store here
assert main(["table", "--study", "s", "--out", "warm.md"]) == 2
os.setgroups([]); os.setgid(65534); os.setuid(65534)
code = main(["table", "--study", "s", "--out", "link.md"])
sys.exit(code * 10 + main(["table", "--study", "s", "--out", "t.md"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=shared, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 22, proc.stderr
    warm, link, line = proc.stderr.splitlines()
    assert link == (f"Error: cannot write link.md: it belongs to another user, and only its "
                    f"owner may replace it in {shared} (a shared folder); give another file name")
    assert line == (f"Error: cannot write t.md: it belongs to another user, and only its owner "
                    f"may replace it in {shared} (a shared folder); give another file name")
    assert sorted(p.name for p in shared.iterdir()) == ["link.md", "t.md"]
    assert (shared / "t.md").read_text() == "root's\n"


@pytest.mark.parametrize("first_existed", [True, False])
def test_a_rename_that_fails_after_another_puts_the_first_back(tmp_path, first_existed):
    """encode's tokens and their index: when the index's rename failed after the tokens' had
    gone through (a file this user may not replace; here a folder in its place), the new tokens
    stayed beside the old index, exit 1. The tokens are put back as they were (or removed, where
    there were none), and no temp file is left."""
    from vqlog.files import atomic_write_all

    tokens, index = tmp_path / "t.npy", tmp_path / "t.csv"
    if first_existed:
        tokens.write_bytes(b"old tokens")
    index.mkdir()  # os.replace of a file onto a folder fails
    with pytest.raises(IsADirectoryError):
        atomic_write_all([(tokens, lambda f: f.write(b"new tokens")),
                          (index, lambda f: f.write(b"new index"))])
    assert (tokens.read_bytes() == b"old tokens") if first_existed else not tokens.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["t.csv", "t.npy"] if first_existed else ["t.csv"])


def test_a_rollback_link_of_an_old_file_is_no_orphan_yet(tmp_path):
    """The link that keeps a replaced file for a rollback shares the old file's inode, and its
    mtime: another writer's cleanup of old temp files took it for one at once."""
    from vqlog.files import remove_orphans

    out = tmp_path / "t.npy"
    out.write_bytes(b"old")
    os.utime(out, (1, 1))  # written long ago
    os.link(out, tmp_path / ".t.npy.abc123.old")  # as atomic_write_all links it, now
    orphan = tmp_path / ".t.npy.def456.tmp"
    orphan.write_bytes(b"half")
    os.utime(orphan, (1, 1))  # a writer killed long ago
    remove_orphans(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t.npy.abc123.old", "t.npy"]


def test_files_written_together_leave_no_link_behind(tmp_path):
    from vqlog.files import atomic_write_all

    tokens, index = tmp_path / "t.npy", tmp_path / "t.csv"
    tokens.write_bytes(b"old tokens")
    index.write_bytes(b"old index")
    atomic_write_all([(tokens, lambda f: f.write(b"new tokens")),
                      (index, lambda f: f.write(b"new index"))])
    assert tokens.read_bytes() == b"new tokens" and index.read_bytes() == b"new index"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.npy"]
    assert tokens.stat().st_nlink == 1
