"""lib.data.eda figures stay readable: one panel per class, labels at a readable size, nothing overlapping."""
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd

from lib import config
from lib.data import eda, uci


def _overlaps(texts, renderer):
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_text()]
    return sum(1 for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b) and a.height > 0)


def test_group_sizes_one_panel_per_class():
    rng = np.random.default_rng(0)
    classes = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]
    rows = [{"label": c, "group": f"{c}{g}"} for c in classes for g in range(12) for _ in range(1 + rng.poisson(4))]
    fig = eda.group_size_figure(pd.DataFrame(rows))
    axes = fig.get_axes()
    assert len(axes) == 5  # not five translucent histograms on one axis
    assert [a.get_title(loc="left").split(":")[0] for a in axes] == classes
    colours = {tuple(a.patches[0].get_facecolor()) for a in axes}
    assert len(colours) == 5


def test_missingness_labels_readable_and_apart():
    raw = uci.load_uci(config.EMBEDDED_UCI).raw
    fig = eda.missingness_figure(raw)
    fig.canvas.draw()
    ax = fig.get_axes()[0]
    labels = ax.get_yticklabels()
    assert len(labels) == raw.shape[1] and min(t.get_fontsize() for t in labels) >= 8
    assert _overlaps(labels, fig.canvas.get_renderer()) == 0
    frac = raw.isna().mean()
    assert labels[0].get_text() == frac.idxmax()  # sorted: the most-missing column on top
