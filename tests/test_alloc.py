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


# A command line's start in small: what `vqlog.cli.main` does first, then a step's worth of 4 MiB
# buffers touched, and how much of the process's memory is in transparent huge pages.
RESTART = textwrap.dedent("""
    import os, sys
    print(os.getpid(), flush=True)
    from vqlog.cli import start_tuned
    start_tuned(None)
    from vqlog import alloc
    bufs = [bytearray(b"x" * (4 << 20)) for _ in range(16)]
    huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
    print(os.environ.get("GLIBC_TUNABLES", ""))
    print(alloc.keep_freed_memory())
    print(int(huge[0].split()[1]))
""")

tunable_glibc = pytest.mark.skipif(
    alloc.glibc() is None or alloc.glibc_version(alloc.glibc()) < (2, 35)
    or not alloc.huge_pages_on_request(),
    reason="needs glibc 2.35 or later and transparent huge pages on request (madvise or always)")


def run_restart(**env) -> list[str]:
    got = subprocess.run([sys.executable, "-c", RESTART], env=clean_env(**env),
                         capture_output=True, text=True, check=True)
    return got.stdout.splitlines()


@tunable_glibc
def test_a_command_line_restarts_itself_with_tunables_and_huge_pages():
    """The same process (pid) runs again with the settings as glibc tunables, and its tensors'
    memory comes in huge pages; with VQLOG_MALLOC=system it runs once, as it is, without."""
    pid, pid_again, tunables, outcome, huge_kib = run_restart()
    assert pid == pid_again  # execve: the same process, once more from the start
    assert alloc.TUNABLES in tunables
    assert outcome == "applied at start, with huge pages (GLIBC_TUNABLES)"
    assert int(huge_kib) >= 2048, huge_kib  # 64 MiB touched: at least one 2 MiB page
    pid, tunables, outcome, huge_kib = run_restart(VQLOG_MALLOC="system")
    assert tunables == "" and outcome == "left as it is: VQLOG_MALLOC=system"
    if "[madvise]" in open(alloc.THP_MODE).read():  # only asked-for memory gets huge pages
        assert int(huge_kib) == 0, huge_kib


@tunable_glibc
def test_the_users_own_tunables_are_kept_and_a_malloc_tunable_is_left_alone():
    lines = run_restart(GLIBC_TUNABLES="glibc.cpu.x86_rep_movsb_threshold=4096")
    assert lines[0] == lines[1]
    assert lines[2] == "glibc.cpu.x86_rep_movsb_threshold=4096:" + alloc.TUNABLES
    pid, tunables, outcome, _ = run_restart(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert tunables == "glibc.malloc.arena_max=2"
    assert outcome == "left as it is: GLIBC_TUNABLES sets glibc.malloc"
