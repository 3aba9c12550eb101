"""One trial's MLflow run while it trains: buffered step metrics, its checkpoints, its dataset,
and how it ends (summary metrics, figures, final weights, the Optuna state, a terminal status)."""

from __future__ import annotations

import math
import time

from vqlog.errors import TrackingUnavailable
from vqlog.failpoints import failpoint
from vqlog.tracking import artifacts, lineage, plots

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
BATCH_LIMIT = 1000  # MLflow's entities (metrics, params, tags) per log_batch request


class TrialRun:
    """One trial's child run. Step metrics are buffered and sent once per evaluation; while the
    tracking server is away they stay in the buffer (training goes on) and go with the next send."""

    def __init__(self, client, run_id: str, cfg, monitor=None):
        self.client, self.run_id, self.cfg = client, run_id, cfg
        self._pending: list = []  # Metric entities not yet accepted by the store
        self._monitor = monitor  # MLflow's system-metrics monitor, stopped when the run ends

    def log_dataset(self, data, source: str, channel: str | None = None) -> None:
        """The trial's data as the run's dataset input (name, source, digest, shape)."""
        inputs = [lineage.dataset_input(data, source, channel)]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_eval(self, record) -> None:
        self._add(record)
        self.flush(wait=False)

    def log_history(self, evals) -> None:
        """The curves up to where a retry resumed (its checkpoint's evaluations and the train
        points logged with them), so the retry's run holds them whole; later points follow."""
        for record in evals:
            self._add(record)
        self.flush(wait=False)

    def log_checkpoint(self, state: dict) -> None:
        """The latest training state, replacing the previous one (skipped while the store is
        away: the next one goes instead)."""
        artifacts.upload_checkpoint(self.client, self.run_id, state)

    def _add(self, record) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for p in record.train_points:
            for key, value in (("train/loss", p.loss), ("train/mse", p.mse),
                               ("train/commitment", p.commitment), ("train/perplexity", p.perplexity)):
                if math.isfinite(value):
                    self._pending.append(Metric(key, value, now, p.step))
        for key, value in (("val/mse", record.val_mse), ("val/perplexity", record.val_perplexity),
                           ("val/usage", record.val_usage), ("val/dead_codes", record.val_dead_codes)):
            if math.isfinite(value):
                self._pending.append(Metric(key, float(value), now, record.step))

    def flush(self, wait: bool = True, tags: dict[str, str] | None = None) -> bool:
        """Send the buffer in MLflow's 1,000-entity requests, `tags` with the last one (alone if
        the buffer is empty). wait=False: one attempt, and False if the store is away
        (TrackingUnavailable once that has lasted past the limit)."""
        from mlflow.entities import RunTag

        extra = [RunTag(k, v) for k, v in (tags or {}).items()]
        while self._pending or extra:
            last = len(self._pending) + len(extra) <= BATCH_LIMIT
            chunk = self._pending[:BATCH_LIMIT - len(extra) if last else BATCH_LIMIT]
            with_tags = extra if last else []
            failpoint("tracking.log")
            if wait:
                self.client.call("log_batch", self.run_id, metrics=chunk, tags=with_tags)
            elif not self.client.try_call("log_batch", self.run_id, metrics=chunk,
                                          tags=with_tags)[0]:
                return False
            del self._pending[:len(chunk)]
            if last:
                extra = []
        return True

    def finish(self, state: str, summary: dict | None = None, reason: str | None = None,
               result=None, windows=None) -> None:
        """Buffered metrics, summary metrics and the Optuna state as a tag (one request), weights
        and plots, and a terminal run status."""
        from mlflow.entities import Metric

        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()

        try:
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
                if state == "COMPLETE":
                    artifacts.upload_weights(self.client, self.run_id, result.config, result.model)
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

