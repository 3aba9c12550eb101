"""What a sweep worker prints: a line per finished trial, and a progress bar on a terminal."""

from __future__ import annotations

import os
import sys
from typing import Callable

from optuna.trial import FrozenTrial, TrialState

from vqlog.errors import one_line
from vqlog.tracking.rows import run_name

BEST_SEP = "  | best "  # before the best trial so far, at the end of a trial line


class TrialProgress:
    """A tqdm bar over finished trials on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self, total: int, out: Callable[[str], None], bar: bool = True):
        self.out, self.total = out, total
        self.bar = None
        if bar and sys.stderr.isatty() and os.environ.get("CI") is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)

    def update(self, finished: int) -> None:
        if self.bar is not None:
            self.bar.n = min(finished, self.total)
            self.bar.refresh()

    def trial_line(self, best: str, t: FrozenTrial, reason: str = "") -> None:
        """`Seq7  COMPLETE  val mse 0.0412  perplexity max 87.1 (300 it, 21 s) | best ...`, with
        `best` from `best_text`; a trial that continued a checkpoint: `(300 it, resumed @ 205,
        31 s in all)`, its seconds those of the runs before it too, as its iterations are."""
        a = t.user_attrs
        if t.state == TrialState.FAIL:
            why = one_line(reason or a.get("fail_reason") or "")  # a library's, over lines
            what = f"FAIL      {why if len(why) <= 300 else why[:299] + '…'}"
        else:
            mse = a.get("final_val_mse")
            ppl = a.get("max_val_perplexity")
            what = f"{t.state.name:<9} val mse {mse:.4g}" if mse is not None else t.state.name
            if ppl is not None:
                what += f"  perplexity max {ppl:.1f}"
            resumed = a.get("resumed_at")
            what += (f"  ({int(a.get('iterations_run', 0))} it, "
                     + (f"resumed @ {resumed}, " if resumed else "")
                     + f"{a.get('train_seconds', 0):.0f} s{' in all' if resumed else ''})")
        self.line(f"{run_name(t.number):<7} {what}" + (f"{BEST_SEP}{best}" if best else ""))

    def resumed(self, finished: int, retries: int = 0, running: int = 0) -> None:
        """A study that has finished trials already, cut-off trials queued again or trials
        RUNNING says so first (the study line gives only the target): `resuming: 12 of 50 trials
        finished`, `; 1 cut-off trial is queued again, to go on from its last checkpoint if it
        has one`, and `; 1 trial is RUNNING: another worker's, or one cut off by a kill, which
        is queued again once its heartbeat is 20 s old` (a kill -9 a moment ago)."""
        from vqlog.config import grace_period

        self.update(finished)
        if finished >= self.total:
            self.line(f"the study has {finished} finished trial{'s' * (finished != 1)} already "
                      f"(target {self.total}): none to run")
        elif finished or retries:  # (a grid may hold fewer points than are left: the closing
            # line says so). Trials RUNNING in a study with neither: workers starting together.
            one = running == 1
            self.line(f"resuming: {finished} of {self.total} trials finished" + (
                f"; {retries} cut-off trial{' is' if retries == 1 else 's are'} queued again, to "
                f"go on from {'its' if retries == 1 else 'their'} last checkpoint if "
                f"{'it has one' if retries == 1 else 'they have one'}" if retries else "") + (
                f"; {running} trial{' is' if one else 's are'} RUNNING: another worker's, or "
                f"{'one' if one else 'ones'} cut off by a kill, which {'is' if one else 'are'} "
                f"queued again once {'its' if one else 'their'} heartbeat is {grace_period()} s "
                "old" if running else ""))

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
            best = text.partition(BEST_SEP)[2]  # a worker's trial line, with --workers
            if best:
                self.bar.set_postfix_str(best, refresh=True)
        else:
            self.out(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def best_text(best: FrozenTrial | None) -> str:
    """The best trial so far (`vqlog.study.worker.best_trial`) as a trial line ends with it."""
    return "" if best is None else f"{best.values[0]:.4g} ({run_name(best.number)})"


class FinishedCount:
    """The study's finished-trial count for the parent's progress bar, read on a thread of its
    own about every `seconds`: the parent's loop (the workers' lines, stops passed on, deaths)
    never waits on the database, not even while a new connection waits out an outage
    (`storage.open_study`'s connect listener). A read that fails on a lost connection is skipped
    (the workers ride the outage out); any other error is raised in the loop by `raise_failed`."""

    def __init__(self, read: Callable[[], int], storage, seconds: float) -> None:
        import threading

        self.value: int | None = None
        self._read, self._storage, self._seconds = read, storage, seconds
        self._error: BaseException | None = None
        self._closed, self._wake = threading.Event(), threading.Event()
        self._reads = threading.Condition()
        self._begun = self._done = 0  # reads begun, and the latest read done (by its number)
        threading.Thread(target=self._run, name="vqlog-progress-count", daemon=True).start()

    def _run(self) -> None:
        from vqlog.study.outage import is_connection_error

        while not self._closed.is_set():
            with self._reads:
                self._begun += 1
                number = self._begun
            try:
                self.value = self._read()
            except Exception as exc:  # noqa: BLE001 - handed to the loop unless a lost connection
                if not is_connection_error(exc):
                    self._error = exc
                    return
                self._storage.remove_session()  # this thread's session: a new connection next
            else:
                with self._reads:
                    self._done = number
                    self._reads.notify_all()
            self._wake.wait(self._seconds)
            self._wake.clear()

    def fresh(self, timeout: float) -> int | None:
        """The count from a read begun after this call, waited for at most `timeout` s (None
        if none came: the database is slow or down); it wakes the thread to read at once."""
        with self._reads:
            after = self._begun
            self._wake.set()
            if self._reads.wait_for(lambda: self._done > after, timeout):
                return self.value
        return None

    def raise_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """No more reads; one under way (perhaps waiting for the database) is not waited for."""
        self._closed.set()
        self._wake.set()
