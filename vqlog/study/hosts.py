"""What one host offers a sweep: the cores this process may use, the memory new processes may
still take, how many workers `--workers auto` starts, and where each worker runs (device and
torch threads). `study.pool` starts the workers; `api` plans them before anything is imported
that a typo would wait for."""

from __future__ import annotations

from pathlib import Path

# More worker processes than this on one host is taken for a typo: each is a Python interpreter
# with torch loaded (some 300 MB before it trains), so `--workers 100000` would only exhaust the
# host's memory and process table. `auto` stays far below it.
MAX_WORKERS = 1024

def cores() -> int:
    """The cores this process may use, as joblib counts them: its CPU affinity (what taskset, a
    cpuset and Slurm grant), capped by a cgroup CPU quota (docker --cpus, compose `cpus:`,
    Kubernetes limits.cpu; 2.5 CPUs count as 3), and one per physical core where neither limits
    it, as torch sizes its own thread pool: two workers on the two hardware threads of one core
    share its floating-point units and only double the memory."""
    import joblib

    return joblib.cpu_count(only_physical_cores=True)


GiB = 1024**3
# What `--workers auto` plans a CPU worker to take: bench_e2e's budget for one (the seed spec's
# workers peak at 1.1 to 1.5 GiB); a host's or a container's memory caps the count by it.
WORKER_MEMORY = 2 * GiB

# cgroup memory files as a process in a container sees its own group: (limit, usage, stat key of
# the reclaimable page cache in memory.stat), v2 first.
CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "total_inactive_file"),
)


def memory_available() -> int:
    """Bytes that new processes here may still take: the host's available memory (psutil: free
    plus reclaimable cache), and no more than a cgroup memory limit (docker --memory, compose
    `mem_limit`, Kubernetes limits.memory) less the group's working set (its usage less its
    inactive page cache, as the kubelet counts it)."""
    import psutil

    available = psutil.virtual_memory().available
    for limit_file, usage_file, cache_key in CGROUP_MEMORY:
        limit_path = Path(limit_file)
        try:
            limit = int(limit_path.read_text())  # "max" (no limit): ValueError
            usage = int(Path(usage_file).read_text())
            stat = dict(line.split() for line in
                        (limit_path.parent / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit < 1 << 60:  # v1 writes "no limit" as about 2^63
            available = min(available, max(0, limit - usage + int(stat.get(cache_key, 0))))
        break
    return available


def auto_workers(device: str, gpus: list[int] | None) -> tuple[int, str | None]:
    """`--workers auto`: one per GPU with CUDA; on the CPU one per core (`cores`), as many as
    the memory holds at WORKER_MEMORY each (at least one). Returns the count and, when the
    memory cut it, a note saying so."""
    if device == "cuda":
        return max(1, len(gpus) if gpus else _cuda_count()), None
    n = cores()
    memory = memory_available()
    fit = max(1, memory // WORKER_MEMORY)
    if fit >= n:
        return n, None
    return fit, (f"auto: {fit} worker{'s' if fit > 1 else ''} for {memory / GiB:.1f} GiB of free "
                 f"memory at {WORKER_MEMORY // GiB} GiB each, fewer than the {n} cores")


def worker_count(requested: str | int, device: str, gpus: list[int] | None) -> int:
    """`--workers`: a number, or `auto` (`auto_workers`)."""
    from vqlog.errors import UserError

    if str(requested) == "auto":
        n = auto_workers(device, gpus)[0]
        if n > 1:
            open_files_for(n)
        return n
    try:
        n = int(requested)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--workers must be a number of workers (1 or more) or auto, got {requested!r}")
    if n > MAX_WORKERS:
        raise UserError(f"--workers {n} is more than the {MAX_WORKERS} worker processes one host "
                        "can take; use auto for one per core")
    if n > 1:
        open_files_for(n)
    return n


def open_files_for(n: int) -> None:
    """Let the sweep's process hold what `n` workers take (a pipe and a process sentinel each,
    and its own): the soft limit on open files raised toward the hard one where it is short
    (1024 is common: `--workers 500` failed with "Too many open files" as they started), or a
    UserError where the hard limit is short too."""
    import resource

    from vqlog.errors import UserError

    need = 64 + 3 * n
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise UserError(f"--workers {n} needs about {need} open files in the sweep's process, "
                        f"more than this shell allows (ulimit -n: {soft}, at most {hard}); "
                        "use fewer workers, or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def placements(n: int, device: str, gpus: list[int] | None) -> list[tuple[str, int]]:
    """(device, torch threads) for each of `n` workers: the cores split evenly, the ones left
    over one each to the first workers (6 cores, 4 workers: 2, 2, 1, 1); with CUDA the workers
    take the GPUs in turn."""
    total = cores()
    threads = [max(1, total // n + (i < total % n)) for i in range(n)]
    if device != "cuda":
        return [(device, t) for t in threads]
    ids = gpus if gpus else list(range(_cuda_count()))
    return [(f"cuda:{ids[i % len(ids)]}", threads[i]) for i in range(n)]
