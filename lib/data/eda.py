"""Figures and small tables of the exploratory notebook (01_eda).

Each function returns a matplotlib figure or a DataFrame; the notebook shows it and saves it
with :func:`lib.plots.save_figure`. Nothing here reads raw files: it takes the validated
tables of :mod:`lib.data.image_data` and :mod:`lib.data.uci`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def class_balance(table: pd.DataFrame) -> pd.DataFrame:
    """Images and cluster groups per class, with the abnormal flag and shares."""
    g = table.groupby("label")
    out = pd.DataFrame({
        "images": g.size(),
        "groups": g["group"].nunique(),
        "abnormal": g["abnormal"].first(),
    })
    out["share_of_images"] = (out["images"] / out["images"].sum()).round(3)
    out["images_per_group"] = (out["images"] / out["groups"]).round(2)
    return out


def class_balance_figure(table: pd.DataFrame, group_word: str = "cluster image"):
    """Images and groups per class; ``group_word`` names a group in this dataset's terms."""
    import matplotlib.pyplot as plt

    cb = class_balance(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = ["#c0392b" if a else "#2e86c1" for a in cb["abnormal"]]
    axes[0].barh(cb.index, cb["images"], color=colors)
    axes[0].set_xlabel("images")
    axes[0].set_title("Images per class (red = abnormal)")
    axes[1].barh(cb.index, cb["groups"], color=colors)
    axes[1].set_xlabel(f"{group_word}s (groups)")
    axes[1].set_title(f"{group_word[0].upper() + group_word[1:]}s per class")
    axes[1].set_yticklabels([])
    fig.tight_layout()
    return fig


def gallery_figure(table: pd.DataFrame, per_class: int = 6, seed: int = 42, thumb: int = 96):
    """A grid of cells: one row per class, ``per_class`` random cells each (seeded)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    classes = sorted(table["label"].unique())
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.6 * per_class, 1.7 * len(classes)), squeeze=False)
    for r, cls in enumerate(classes):
        rows = table[table["label"] == cls]
        pick = rows.sample(n=min(per_class, len(rows)), random_state=seed)
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if c < len(pick):
                with Image.open(pick.iloc[c]["path"]) as im:
                    im = im.convert("RGB")
                    im.thumbnail((thumb, thumb))
                    ax.imshow(np.asarray(im))
                ax.set_title(f"{pick.iloc[c]['width']}x{pick.iloc[c]['height']}", fontsize=7)
            if c == 0:
                ax.set_ylabel(cls, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("Cells per class (crop size in px above each)", y=1.0)
    fig.tight_layout()
    return fig


def image_size_figure(table: pd.DataFrame):
    """Crop width x height per class: the pipeline resizes every crop to one square size."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.scatterplot(data=table, x="width", y="height", hue="label", s=12, alpha=0.6, ax=axes[0])
    axes[0].set_title("Crop sizes (px)")
    axes[0].legend(fontsize=7, markerscale=1.5)
    long = table.assign(longest_side=table[["width", "height"]].max(axis=1))
    sns.boxplot(data=long, y="label", x="longest_side", ax=axes[1], color="#aed6f1")
    axes[1].set_title("Longest side per class (px)")
    axes[1].set_ylabel("")
    fig.tight_layout()
    return fig


def group_size_figure(table: pd.DataFrame, group_word: str = "cluster image"):
    """How many images each group (cluster image, source image) contributes: why splits must be grouped."""
    import matplotlib.pyplot as plt

    sizes = table.groupby(["label", "group"]).size().rename("cells").reset_index()
    # one small panel per class on a shared axis: overlaid translucent histograms of five classes
    # blend into one colour and cannot be read
    classes = sorted(sizes["label"].unique())
    bins = np.arange(1, int(sizes["cells"].max()) + 2) - 0.5
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(len(classes), 1, sharex=True, sharey=True, squeeze=False,
                             figsize=(6.5, 1.15 * len(classes) + 1.0))
    for i, (ax, cls) in enumerate(zip(axes[:, 0], classes)):
        d = sizes.loc[sizes["label"] == cls, "cells"]
        ax.hist(d, bins=bins, color=colors[i % len(colors)], edgecolor="white")
        med = d.median()
        ax.set_title(f"{cls}: {len(d)} {group_word}s, median {med:g} image{'' if med == 1 else 's'} each",
                     loc="left", fontsize=8, pad=2)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(f"images from one {group_word}")
    axes[len(classes) // 2, 0].set_ylabel(f"{group_word}s")
    top = int(sizes["cells"].max())
    axes[-1, 0].set_xlim(0.5, max(top, 5) + 0.5)  # one image per group stays a narrow bar at 1
    if top <= 20:  # whole numbers of images: one tick per count
        axes[-1, 0].set_xticks(range(1, max(top, 5) + 1))
    else:
        axes[-1, 0].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(f"Images per {group_word}, by class", fontsize=11)
    fig.tight_layout()
    return fig


def missingness_figure(raw: pd.DataFrame):
    """Missing-value map of the raw UCI table (rows x columns, dark = missing)."""
    import matplotlib.pyplot as plt

    miss = raw.isna()
    # columns ordered by how much is missing, the same order in both panels, so each label is
    # written once, at a readable size, on a figure tall enough for one line per column
    order = miss.mean().sort_values(ascending=False).index
    miss, frac = miss[order], miss[order].mean()
    n = len(order)
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(11, max(4.0, 0.22 * n + 1.4)),
                             gridspec_kw={"width_ratios": [3, 1.2]})
    axes[0].imshow(miss.to_numpy().T, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    axes[0].set_yticks(range(n))
    axes[0].set_yticklabels(order, fontsize=8)
    axes[0].set_xlabel("patient (row of the raw table)")
    axes[0].set_title("Missing values (black = '?')")
    axes[0].grid(False)
    axes[1].barh(range(n), frac.values, color=["#c0392b" if f > 0.5 else "#7f8c8d" for f in frac.values], height=0.7)
    for i, f in enumerate(frac.values):
        if f > 0.75:
            axes[1].text(f - 0.02, i, f"{f:.0%}", va="center", ha="right", fontsize=7, color="white")
        elif f > 0:
            axes[1].text(f + 0.02, i, f"{f:.0%}", va="center", fontsize=7)
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("fraction missing (red: over half)")
    axes[1].set_title("Fraction missing per column")
    axes[1].grid(axis="y", visible=False)
    fig.tight_layout()
    return fig


def prevalence_figure(frame: pd.DataFrame, targets) -> "plt.Figure":
    import matplotlib.pyplot as plt

    prev = frame[list(targets)].mean()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.barh(prev.index, prev.values, color="#8e44ad")
    for i, (n, v) in enumerate(zip(frame[list(targets)].sum(), prev.values)):
        ax.text(v + 0.002, i, f"{int(n)} ({v:.1%})", va="center", fontsize=8)
    ax.set_xlim(0, max(prev.values) * 1.4)
    ax.set_xlabel("share of patients positive")
    ax.set_title("Target prevalence (UCI risk factors)")
    fig.tight_layout()
    return fig
