"""Figures logged to MLflow: per trial the curves and reconstructions, per study Optuna's plots.

The trial figures are built on `matplotlib.figure.Figure`, not pyplot: no global state, no GUI
backend, nothing to close. Each thread keeps one figure of each layout and redraws it for the
next trial: building the axes and their tick objects anew was about a third of a figure's time
(benchmarks/README.md, tracking), and a worker draws two figures after every trial. So a trial
figure is only valid until the next call in the same thread; `TrialRun.finish` saves it at once.
Optuna's plots go through pyplot; `study_figures` picks the Agg backend when it first draws,
unless the process already chose one (a notebook's inline backend).
"""

from __future__ import annotations

import math
import sys
import threading
import warnings

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator, NullLocator


def close(fig) -> None:
    """Free a figure that `study_figures` made (pyplot keeps those until they are closed)."""
    import matplotlib.pyplot as plt

    plt.close(fig)


# How a trial figure is saved: zlib level 1 rather than PIL's 6 takes 0.83x the time of a
# reconstruction figure's savefig for a file 6 % larger (about 100 KB).
SAVE_KWARGS = {"pil_kwargs": {"compress_level": 1}}


class _Kept(threading.local):
    """This thread's figures, by layout."""

    def __init__(self):
        self.figures: dict[tuple, Figure] = {}


_kept = _Kept()


def forget() -> None:
    """Drop this thread's kept figures: the next call builds new ones."""
    _kept.figures.clear()


def _rescale(ax, **which) -> None:
    ax.relim()
    ax.autoscale_view(**which)


class PlainLogFormatter(LogFormatterSciNotation):
    """matplotlib's log-axis labels, on the same ticks, as plain numbers: "0.05", "2e-05".

    The default's mathtext powers of ten ("5×10⁻²") are parsed and laid out glyph by glyph, and
    its parse cache misses as the axis range changes from trial to trial: about a third of a
    trial's figure time. `:g` keeps six significant digits, so no two ticks share a label
    (matplotlib's plain LogFormatter wrote "9e-01" for several ticks within one decade)."""

    def __call__(self, x, pos=None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _curves_layout(with_ppl: bool) -> Figure:
    fig = Figure(figsize=(8, 3), dpi=80)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([], [], lw=0.8, label="train/loss")
    ax1.plot([], [], "o-", ms=3, label="val/mse")
    ax1.set_yscale("log")
    # Minor ticks at 2 and 5 only (not 2..9 in every decade): drawing ticks is most of a figure's
    # time, and a range within one decade still gets labels.
    ax1.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax1.yaxis.set_major_formatter(PlainLogFormatter())
    ax1.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    ax1.set_xlabel("iteration")
    ax1.legend(fontsize=8)
    if with_ppl:
        ax2.plot([], [], "o-", ms=3, color="tab:green", label="val/perplexity")
        ax2.set_xlabel("iteration")
        ax2.legend(fontsize=8)
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "no quantizer", ha="center", va="center")
    # Fixed margins: tight_layout draws the figure once more to measure it, a large share of the
    # time a trial spends on tracking (benchmarks/README.md, tracking).
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.16, top=0.96, wspace=0.3)
    return fig


def curves_figure(result) -> Figure:
    """Train loss and val MSE against step, with val perplexity on a second panel. The figure is
    this thread's, redrawn by its next call (see the module's doc)."""
    ppl = [(e.step, e.val_perplexity) for e in result.evals if not math.isnan(e.val_perplexity)]
    key = ("curves", bool(ppl))
    fig = _kept.figures.get(key)
    if fig is None:
        fig = _kept.figures[key] = _curves_layout(bool(ppl))
    ax1, ax2 = fig.axes
    loss, mse = ax1.lines
    tp = result.train_points
    loss.set_data([p.step for p in tp], [p.loss for p in tp])
    mse.set_data([e.step for e in result.evals], [e.val_mse for e in result.evals])
    _rescale(ax1)
    if ppl:
        ax2.lines[0].set_data(*zip(*ppl))
        _rescale(ax2)
    return fig


def _reconstruction_layout(n: int) -> Figure:
    fig = Figure(figsize=(8, 1.6 * n), dpi=80)
    axes = np.atleast_1d(fig.subplots(n, 1))
    # Drawing ticks is most of a figure's time: the sample axis is labelled on the last panel
    # only (all windows have one length, so the panels line up) and the values get 3 ticks.
    for i, ax in enumerate(axes):
        ax.plot([], [], lw=1.0, label="signal")
        ax.plot([], [], lw=1.0, label="reconstruction")
        ax.yaxis.set_major_locator(MaxNLocator(3))
        if i < n - 1:
            ax.xaxis.set_major_locator(NullLocator())
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("sample")
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / height, top=1 - 0.1 / height,
                        hspace=0.15)
    return fig


def reconstruction_figure(model, windows: np.ndarray, n: int = 4) -> Figure:
    """The first `n` validation windows (B, L) against the model's reconstructions. The figure is
    this thread's, redrawn by its next call (see the module's doc)."""
    import torch  # here, not at the top: a command's bad flags are reported without it

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(windows[:n]), device=device)  # (n L)
        recon = model(x).recon.cpu().numpy()  # (n L)
    model.train()
    x = x.cpu().numpy()
    key = ("reconstruction", len(x))
    fig = _kept.figures.get(key)
    if fig is None:
        fig = _kept.figures[key] = _reconstruction_layout(len(x))
    steps = np.arange(x.shape[1])
    for ax, sig, rec in zip(fig.axes, x, recon):
        signal, reconstruction = ax.lines
        signal.set_data(steps, sig)
        reconstruction.set_data(steps, rec)
        ax.set_xlim(0, len(sig) - 1)
        _rescale(ax, scalex=False)
    return fig


def study_figures(study) -> list[tuple[str, object]]:
    """Optuna's optimization history, parameter importances and parallel coordinates, as far as
    the study has enough finished trials for each. Drawn all before any is returned: an error
    part way (the study's database restarting) leaves no figure open, and the caller may send
    the whole drawing again."""
    import matplotlib
    import optuna

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # a worker draws to files: never open a window
    from optuna.visualization import matplotlib as ovm

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return []
    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    name = "val mse" if multi else None
    makers = [("optimization_history", lambda: ovm.plot_optimization_history(study, target=target, target_name=name or "Objective Value"))]
    if len(done) >= 2 and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
        makers.append(("param_importances", lambda: ovm.plot_param_importances(study, target=target)))
        makers.append(("parallel_coordinate", lambda: ovm.plot_parallel_coordinate(study, target=target)))
    figures = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning on every matplotlib plot
            for key, make in makers:
                try:
                    ax = make()
                except (ValueError, RuntimeError):  # e.g. importances with a single distinct value
                    continue
                ax = np.atleast_1d(ax).ravel()[0]
                fig = ax.figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                figures.append((key, fig))
    except BaseException:
        for _, fig in figures:
            close(fig)
        raise
    return figures
