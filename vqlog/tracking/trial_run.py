"""One trial's MLflow run while it trains: buffered step metrics, its checkpoints, its dataset,
and how it ends (summary metrics, figures, final weights, the Optuna state, a terminal status).

While the trial trains, its metric batches and checkpoint uploads go to the store from a thread
of the run's own, so the training loop never waits on a request: on a GPU a step is a few
milliseconds, a request to a tracking server tens of them, a checkpoint upload more. The
checkpoint file itself is written before `log_checkpoint` returns (the weights train on
afterwards); only its upload waits. `finish` waits for what is under way, so a run is never
ended with a send still to come, and a send's error reaches the training loop at its next call
(an outage past the limit ends the trial as it did when the sends were made in line).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from vqlog.errors import TrackingUnavailable
from vqlog.failpoints import failpoint
from vqlog.tracking import artifacts, lineage

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
BATCH_LIMIT = 1000  # MLflow's entities (metrics, params, tags) per log_batch request


class TrialRun:
    """One trial's child run. Step metrics are buffered and sent once per evaluation; while the
    tracking server is away they stay in the buffer (training goes on) and go with the next send."""

    def __init__(self, client, run_id: str, cfg, monitor=None):
        self.client, self.run_id, self.cfg = client, run_id, cfg
        self._pending: list = []  # Metric entities not yet accepted by the store
        self._lock = threading.Lock()  # _pending: appended here, sent from the sender thread
        self._monitor = monitor  # MLflow's system-metrics monitor, stopped when the run ends
        self._sender: ThreadPoolExecutor | None = None  # one thread: sends stay in order
        self._sends: list[Future] = []  # queued or under way
        self._checkpoint: tuple[Future, str] | None = None  # the latest upload and its folder
        self.last_step = 0  # the latest iteration logged: a failed trial's iterations_run

    def log_dataset(self, data, source: str, channel: str | None = None) -> None:
        """The trial's data as the run's dataset input (name, source, digest, shape).

        MLflow looks the dataset up, then inserts it if it found none: two workers whose trials
        start at the same moment on the same data can both insert it, and the store refuses
        the second with a unique-key error (seen as a FAIL at the start of `--workers auto`).
        The dataset is there by then, so the call is made once more: it links the existing one.
        """
        from mlflow.exceptions import MlflowException

        inputs = [lineage.dataset_input(data, source, channel)]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as exc:
            if not _duplicate_key(exc):
                raise
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_eval(self, record) -> None:
        """An evaluation and the train points before it, sent in the background (one attempt;
        while the store is away they wait for the next send)."""
        self._add(record)
        self._send(lambda: self.flush(wait=False))

    def log_history(self, evals) -> None:
        """The curves up to where a retry resumed (its checkpoint's evaluations and the train
        points logged with them), so the retry's run holds them whole; later points follow."""
        for record in evals:
            self._add(record)
        self._send(lambda: self.flush(wait=False))

    def log_checkpoint(self, state: dict) -> None:
        """The latest training state, replacing the previous one: written now, uploaded in the
        background in one attempt (skipped while the store is away: the next one goes instead).
        An upload still queued behind other sends is dropped for this newer one."""
        self._raise_failed()
        folder = tempfile.mkdtemp(prefix="vqlog-ckpt-")

        def upload() -> None:
            try:
                artifacts.send_checkpoint(self.client, self.run_id, path)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        try:
            path = artifacts.write_checkpoint(state, folder)
            if self._checkpoint is not None:
                queued, old_folder = self._checkpoint
                if queued.cancel():  # not started: the newer state replaces it anyway
                    shutil.rmtree(old_folder, ignore_errors=True)
            self._checkpoint = (self._send(upload), folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _send(self, call) -> Future:
        """`call()` on the run's sender thread, after the sends before it; an earlier send's
        error is raised here first."""
        self._raise_failed()
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="vqlog-send")
        future = self._sender.submit(call)
        self._sends.append(future)
        return future

    def _raise_failed(self) -> None:
        """Forget the sends that are over; raise the first one's error, if one failed."""
        done, running = [], []
        for future in self._sends:  # each looked at once: one may end while this runs
            (done if future.done() else running).append(future)
        self._sends = running
        for future in done:
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()

    def _drain(self) -> None:
        """Wait for every send under way or queued, then stop the sender thread; the first
        error among them is raised."""
        if self._sender is None:
            return
        sender, self._sender = self._sender, None
        try:
            for future in list(self._sends):
                if not future.cancelled():
                    future.exception()  # waits
        finally:
            sender.shutdown(wait=True)
        self._raise_failed()

    def abandon(self) -> None:
        """Stop sending, for a trial that ends without `finish` (the store unreachable past the
        limit: the run stays RUNNING for the rerun's reconcile). Queued sends are dropped; one
        under way ends on its own, and the sender thread with it."""
        if self._sender is None:
            return
        sender, self._sender = self._sender, None
        sender.shutdown(wait=False, cancel_futures=True)
        if self._checkpoint is not None and self._checkpoint[0].cancelled():
            shutil.rmtree(self._checkpoint[1], ignore_errors=True)

    def _add(self, record) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for p in record.train_points:
            for key, value in (("train/loss", p.loss), ("train/mse", p.mse),
                               ("train/commitment", p.commitment), ("train/perplexity", p.perplexity)):
                if math.isfinite(value):
                    metrics.append(Metric(key, value, now, p.step))
        for key, value in (("val/mse", record.val_mse), ("val/perplexity", record.val_perplexity),
                           ("val/usage", record.val_usage), ("val/dead_codes", record.val_dead_codes)):
            if math.isfinite(value):
                metrics.append(Metric(key, float(value), now, record.step))
        self.last_step = max([self.last_step, record.step, *(p.step for p in record.train_points)])
        with self._lock:
            self._pending += metrics

    def flush(self, wait: bool = True, tags: dict[str, str] | None = None) -> bool:
        """Send the buffer in MLflow's 1,000-entity requests, `tags` with the last one (alone if
        the buffer is empty). wait=False: one attempt, and False if the store is away
        (TrackingUnavailable once that has lasted past the limit)."""
        from mlflow.entities import RunTag

        extra = [RunTag(k, v) for k, v in (tags or {}).items()]
        while self._pending or extra:
            with self._lock:  # the training thread appends behind what is sent here
                last = len(self._pending) + len(extra) <= BATCH_LIMIT
                chunk = self._pending[:BATCH_LIMIT - len(extra) if last else BATCH_LIMIT]
            with_tags = extra if last else []
            failpoint("tracking.log")
            if wait:
                self.client.call("log_batch", self.run_id, metrics=chunk, tags=with_tags)
            elif not self.client.try_call("log_batch", self.run_id, metrics=chunk,
                                          tags=with_tags)[0]:
                return False
            with self._lock:
                del self._pending[:len(chunk)]
            if last:
                extra = []
        return True

    def finish(self, state: str, summary: dict | None = None, reason: str | None = None,
               result=None, windows=None) -> None:
        """The sends under way, then buffered metrics, summary metrics and the Optuna state as a
        tag (one request), weights and plots, and a terminal run status."""
        from mlflow.entities import Metric

        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()

        if state == "FAIL" and "iterations_run" not in (summary or {}):
            # the table's iteration cell: what ran, not the budget (the latest point logged,
            # 0 before the first, or where the caller knows it stopped)
            summary = {**(summary or {}), "iterations_run": self.last_step}
        try:
            self._drain()
            if summary:
                now = int(time.time() * 1000)
                self._pending += [Metric(k, float(v), now, 0) for k, v in summary.items()
                                  if math.isfinite(v)]
            # the Optuna state rides with the last metrics; the run stays RUNNING until the
            # end, so a worker killed before it is still reconciled
            tags = {"optuna.state": state}
            if reason:
                tags["vqlog.fail_reason"] = reason[:5000]
            self.flush(tags=tags)
            if result is not None:
                from vqlog.tracking import plots  # matplotlib: only where something is drawn

                if state == "COMPLETE":
                    artifacts.upload_weights(self.client, self.run_id, result.config, result.model,
                                             result.sample_rate)
                self.client.log_figure(self.run_id, plots.curves_figure(result), "curves.png",
                                       save_kwargs=plots.SAVE_KWARGS)
                if windows is not None and len(windows):
                    fig = plots.reconstruction_figure(result.model, windows)
                    self.client.log_figure(self.run_id, fig, "reconstruction.png",
                                           save_kwargs=plots.SAVE_KWARGS)
        except TrackingUnavailable:
            raise  # the run stays RUNNING; the rerun's reconcile gives it Optuna's state
        except BaseException:
            self.client.set_terminated(self.run_id, STATUS[state])
            raise
        self.client.set_terminated(self.run_id, STATUS[state])


def _duplicate_key(exc: Exception) -> bool:
    """A store's unique-key violation, as SQLite and PostgreSQL word it."""
    text = str(exc).lower()
    return "unique constraint failed" in text or "duplicate key value" in text


def settle(client, run, state: str, reason: str | None = None) -> None:
    """A run its worker left behind, given the state Optuna settled on: the state and a failed
    run's reason as tags, and, where the run has none, its `iterations_run` (the latest
    training point it logged: the table's iteration cell says what ran, not the budget), in one
    request; then its terminal status."""
    from mlflow.entities import Metric, RunTag

    tags, metrics = [RunTag("optuna.state", state)], []
    if reason is not None:
        tags.append(RunTag("vqlog.fail_reason", reason[:5000]))
        if "iterations_run" not in run.data.metrics:
            ran = max((m.step for m in client.get_metric_history(run.info.run_id, "train/loss")),
                      default=0)
            metrics.append(Metric("iterations_run", float(ran), int(time.time() * 1000), 0))
    client.log_batch(run.info.run_id, metrics=metrics, tags=tags)
    client.set_terminated(run.info.run_id, STATUS[state])
