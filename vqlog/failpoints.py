"""Crash points for the crash-safety test (tests/test_crash.py).

With VQLOG_FAILPOINT=NAME:N in the environment, the N-th pass of this process through
`failpoint("NAME")` kills it with SIGKILL, as `kill -9` from outside would, but at a moment the
test chose: mid-training, between two metric batches, between training and Optuna's record of
the result, or halfway through writing the table. Unset (always, outside that test), a pass costs
one environment lookup. NAME:N:SIGINT+SIGINT sends those signals instead, one after the other,
each handled before the next is sent (two SIGINTs sent from outside at once arrive as one): a
Ctrl-C pressed twice during a trial.

Names: trial.eval, tracking.log, trial.tell, trial.requeue, table.write, store.open,
worker.send, stale.retry, worker.ask.
"""

from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def failpoint(name: str) -> None:
    spec = os.environ.get("VQLOG_FAILPOINT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, signals = rest.partition(":")
    _passes[name] = _passes.get(name, 0) + 1
    if signals:  # the N-th pass only
        if _passes[name] == int(nth or 1):
            for sig in signals.split("+"):
                signal.raise_signal(signal.Signals[sig])  # its Python handler runs on return
    elif _passes[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
