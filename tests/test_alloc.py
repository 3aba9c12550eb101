"""glibc's malloc keeps freed memory for the next step (`vqlog.alloc`): the settings take effect
(page faults of a real allocation pattern, in a fresh interpreter), the CLI and the sweep's
workers apply them, and the user's own allocator choices are left alone."""

import os
import subprocess
import sys
import textwrap

import pytest

from vqlog import alloc
from vqlog.errors import UserError

glibc_only = pytest.mark.skipif(alloc.glibc() is None, reason="needs Linux with glibc")

# A step's pattern in small: eight 4 MiB buffers made, touched and freed, ten times over, after
# one round that lets glibc's dynamic thresholds adapt. Prints the outcome and the page faults.
PATTERN = textwrap.dedent("""
    import resource, sys
    from vqlog import alloc
    outcome = alloc.keep_freed_memory() if sys.argv[1] == "keep" else "not called"
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [bytearray(4 << 20) for _ in range(8)]
    del bufs
    before = faults()
    for _ in range(10):
        bufs = [bytearray(4 << 20) for _ in range(8)]
        del bufs
    print(outcome)
    print(faults() - before)
""")


def clean_env(**extra) -> dict:
    """The environment of a user who set nothing about malloc."""
    env = {k: v for k, v in os.environ.items()
           if k not in alloc.GLIBC_VARIABLES and k not in ("LD_PRELOAD", "GLIBC_TUNABLES", alloc.OPT_OUT)}
    env.update(extra)
    return env


def run_pattern(mode: str, **env) -> tuple[str, int]:
    got = subprocess.run([sys.executable, "-c", PATTERN, mode], env=clean_env(**env),
                         capture_output=True, text=True, check=True)
    outcome, faults = got.stdout.split("\n")[:2]
    return outcome, int(faults)


@glibc_only
def test_kept_memory_is_not_faulted_in_again():
    outcome, kept = run_pattern("keep")
    assert outcome == "applied"
    _, default = run_pattern("default")
    # 80 MiB touched afresh is about 20,000 pages each round by default; with the settings the
    # heap keeps the buffers' memory and the rounds reuse it.
    assert default > 10 * 8 * 1024 / 2, default
    assert kept < default / 10, (kept, default)


@glibc_only
def test_system_choice_leaves_glibc_alone():
    outcome, faults = run_pattern("keep", VQLOG_MALLOC="system")
    assert outcome == "left as it is: VQLOG_MALLOC=system"
    _, default = run_pattern("default")
    assert faults > default / 2, (faults, default)


@pytest.mark.parametrize("env, reason", [
    ({"VQLOG_MALLOC": "system"}, "VQLOG_MALLOC=system"),
    ({"VQLOG_MALLOC": " System "}, "VQLOG_MALLOC=system"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}, "GLIBC_TUNABLES sets glibc.malloc"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD is set"),
])
def test_the_users_own_choice_wins(env, reason):
    assert reason in alloc.reason_to_leave(env)


@pytest.mark.parametrize("env", [{}, {"VQLOG_MALLOC": "vqlog"}, {"VQLOG_MALLOC": ""},
                                 {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}])
def test_nothing_in_the_way(env):
    assert alloc.reason_to_leave(env) is None


def test_unknown_choice_is_an_error():
    with pytest.raises(UserError, match="VQLOG_MALLOC must be 'vqlog' .* or 'system', not 'jemalloc'"):
        alloc.reason_to_leave({"VQLOG_MALLOC": "jemalloc"})


@glibc_only
def test_command_lines_and_sweep_workers_apply_it():
    # configure_process is what every CLI command and every `--workers` process runs first.
    code = "from vqlog.cli import configure_process; configure_process(); from vqlog import alloc; print(alloc.outcome())"
    got = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True,
                         text=True, check=True)
    assert got.stdout.strip() == "applied"
    # A library import imposes nothing.
    got = subprocess.run([sys.executable, "-c", "import vqlog.api, vqlog.train; from vqlog import alloc; print(alloc.outcome())"],
                         env=clean_env(), capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "None"


def test_cli_refuses_an_unknown_choice(tmp_path):
    got = subprocess.run([sys.executable, "-m", "vqlog.cli", "train", "--set", "iteration=5"],
                         cwd=tmp_path, env=clean_env(VQLOG_MALLOC="tcmalloc"),
                         capture_output=True, text=True)
    assert got.returncode == 2, got.stderr
    assert got.stderr.splitlines() == [
        "Error: VQLOG_MALLOC must be 'vqlog' (the default) or 'system', not 'tcmalloc'"]
    assert list(tmp_path.iterdir()) == []
