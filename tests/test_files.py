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
