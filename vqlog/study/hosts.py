"""What one host offers a sweep: the cores this process may use, the memory new processes may
still take, how many workers `--workers auto` starts, and where each worker runs (device and
torch threads). `study.pool` starts the workers; `api` plans them before anything is imported
that a typo would wait for."""

from __future__ import annotations

import os
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
        return auto_workers(device, gpus)[0]
    try:
        n = int(requested)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--workers must be a number of workers (1 or more) or auto, got {requested!r}")
    if n > MAX_WORKERS:
        raise UserError(f"--workers {n} is more than the {MAX_WORKERS} worker processes one host "
                        "can take; use auto for one per core")
    return n


class CoreShare:
    """This host's cores, shared by the vqlog processes that train on it, however they were
    started: `vqlog-sweep` in two terminals, a second sweep beside a `--workers` one, `vqlog
    train` beside a sweep. Each sizes torch's pool by the whole host otherwise: two one-worker
    sweeps on 2 cores took 2.5 times as long a trial as with the cores shared (OpenMP threads
    spinning on cores the other process holds).

    Each live process holds an exclusive lock on a file of its own in a folder per user
    (`folder`, by default `vqlog-<uid>/workers` in the temp folder), and `apply()` sets its
    torch threads to cores() / live processes, at least 1; a worker calls it as each trial
    starts, so the threads follow processes that start and end. A file whose lock is free is a
    dead process's (the kernel drops a killed process's locks) and is removed. Where the folder
    cannot be used, this process counts as alone. Processes in other containers do not share a
    temp folder, and are sized by their own CPU quota (`cores`)."""

    def __init__(self, folder: Path | None = None):
        import tempfile
        import uuid

        self.folder = folder or Path(tempfile.gettempdir()) / f"vqlog-{os.getuid()}" / "workers"
        self.path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fd: int | None = None
        try:
            import fcntl

            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            new = self.folder / f".{self.path.name}"  # locked before others can see it
            fd = os.open(new, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(new, self.path)
            self.fd = fd
        except (OSError, ImportError):  # a read-only temp folder, another user's, no flock
            self.fd = None

    def processes(self) -> int:
        """The live processes sharing the host's cores, this one included."""
        if self.fd is None:
            return 1
        import fcntl

        live = 1
        try:
            entries = [e for e in self.folder.iterdir()
                       if e != self.path and not e.name.startswith(".")]
        except OSError:
            return 1
        for entry in entries:
            try:
                fd = os.open(entry, os.O_RDWR)
            except OSError:  # removed meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1  # held: a live process
            except OSError:
                pass
            else:  # free: its process is gone
                entry.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return live

    def threads(self) -> int:
        return max(1, cores() // self.processes())

    def apply(self) -> int:
        """Set torch's intra-op threads to this process's share; returns it."""
        import torch

        n = self.threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n

    def close(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # the lock goes with it
            self.fd = None

    def __enter__(self) -> "CoreShare":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def core_share() -> CoreShare | None:
    """A CoreShare for this process, or None where the user set OMP_NUM_THREADS: their number
    of threads is kept."""
    return None if "OMP_NUM_THREADS" in os.environ else CoreShare()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def placements(n: int, device: str, gpus: list[int] | None) -> list[tuple[str, int]]:
    """(device, torch threads) for each of `n` workers: the cores split evenly; with CUDA the
    workers take the GPUs in turn."""
    threads = max(1, cores() // n)
    if device != "cuda":
        return [(device, threads)] * n
    ids = gpus if gpus else list(range(_cuda_count()))
    return [(f"cuda:{ids[i % len(ids)]}", threads) for i in range(n)]
