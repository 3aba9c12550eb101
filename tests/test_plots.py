"""The trial figures: a worker keeps one figure of each layout and redraws it, and what it draws
must be what a new figure of the same trial draws."""

import threading

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from vqlog.data import prepare
from vqlog.tracking import plots
from vqlog.train import fit


def pixels(fig) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


@pytest.fixture(scope="module")
def trials(tiny):
    """Two real tiny trials with different curves, and the validation windows."""
    a = tiny(lr=5e-3, iteration=12, seed=1)
    b = tiny(lr=2e-2, iteration=20, seed=2)
    data = prepare("synthetic", a)
    return fit(a, data), fit(b, data), data.valid


@pytest.fixture(autouse=True)
def fresh_figures():
    plots.forget()
    yield
    plots.forget()


def test_a_kept_curves_figure_draws_what_a_new_one_draws(trials):
    first, second, _ = trials
    kept = plots.curves_figure(first)
    pixels(kept)  # drawn once for the first trial, limits and ticks of its own
    assert plots.curves_figure(second) is kept  # the same figure, redrawn
    redrawn = pixels(kept)
    plots.forget()
    new = plots.curves_figure(second)
    assert new is not kept
    assert np.array_equal(redrawn, pixels(new))
    assert not np.array_equal(redrawn, pixels(plots.curves_figure(first)))  # it did change


def test_a_kept_reconstruction_figure_draws_what_a_new_one_draws(trials):
    first, second, windows = trials
    kept = plots.reconstruction_figure(first.model, windows)
    pixels(kept)
    assert plots.reconstruction_figure(second.model, windows) is kept
    redrawn = pixels(kept)
    plots.forget()
    assert np.array_equal(redrawn, pixels(plots.reconstruction_figure(second.model, windows)))
    # fewer windows is another layout: its own figure, with as many panels
    two = plots.reconstruction_figure(second.model, windows, n=2)
    assert two is not kept and len(two.axes) == 2


def test_a_trial_without_a_quantizer_gets_its_own_curves_layout(trials, tiny):
    quantized = plots.curves_figure(trials[0])
    cfg = tiny(quantizer="none")
    fig = plots.curves_figure(fit(cfg, prepare("synthetic", cfg)))
    assert fig is not quantized
    assert not fig.axes[1].axison and fig.axes[1].texts[0].get_text() == "no quantizer"
    assert len(fig.axes[1].lines) == 0
    assert plots.curves_figure(trials[1]) is quantized  # and back to the kept one


def test_each_thread_draws_on_figures_of_its_own(trials):
    first, _, _ = trials
    here = plots.curves_figure(first)
    there = []
    thread = threading.Thread(target=lambda: there.append(plots.curves_figure(first)))
    thread.start()
    thread.join()
    assert there[0] is not here
    assert np.array_equal(pixels(here), pixels(there[0]))


@pytest.mark.parametrize("low, high", [(0.03, 1.2), (0.5, 0.8), (2e-5, 3.0), (0.91, 0.99)])
def test_the_loss_axis_labels_the_default_ticks_as_plain_distinct_numbers(low, high):
    """The same ticks get labels as with matplotlib's own log formatter, each its tick's value
    as a plain number (no mathtext to parse), and no two alike (a plain LogFormatter wrote
    "9e-01" on several ticks of a range within one decade)."""
    from matplotlib.figure import Figure

    def labelled(ax) -> list[tuple[float, str]]:
        FigureCanvasAgg(ax.figure).draw()
        ticks = list(ax.yaxis.get_major_ticks()) + list(ax.yaxis.get_minor_ticks())
        return sorted((t.get_loc(), t.label1.get_text()) for t in ticks
                      if t.label1.get_visible() and t.label1.get_text()
                      and low <= t.get_loc() <= high)

    fig = plots._curves_layout(with_ppl=True)
    ax = fig.axes[0]
    ax.set_ylim(low, high)
    ours = labelled(ax)
    default = Figure().subplots()
    default.set_yscale("log")
    default.yaxis.set_minor_locator(ax.yaxis.get_minor_locator().__class__(subs=(2.0, 5.0)))
    default.set_ylim(low, high)
    theirs = labelled(default)
    assert [loc for loc, _ in ours] == [loc for loc, _ in theirs] and ours
    assert all("$" not in text and float(text) == pytest.approx(loc, rel=1e-6) for loc, text in ours)
    assert len({text for _, text in ours}) == len(ours)
