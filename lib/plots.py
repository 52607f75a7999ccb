"""Figure helpers shared by the notebooks: consistent style, a loud SYNTHETIC stamp on
anything built from the stand-in data, and atomic saving into ``figures/``."""
from __future__ import annotations

from pathlib import Path

from lib import config
from lib.atomic import atomic_path

SYNTHETIC_STAMP = "SYNTHETIC DATA - not SIPaKMeD"


def setup_style() -> None:
    """One look for every notebook (seaborn whitegrid, readable sizes)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "savefig.bbox": "tight"})


def stamp_synthetic(fig, text: str = SYNTHETIC_STAMP) -> None:
    """Write a red banner across the top of ``fig`` so no reader mistakes it for real data."""
    fig.text(0.5, 1.0, text, ha="center", va="bottom", fontsize=11, fontweight="bold", color="white",
             bbox=dict(boxstyle="round,pad=0.3", facecolor="#c0392b", edgecolor="none"))


def save_figure(fig, name: str, synthetic: bool = False, figures_dir=None) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` atomically; stamp it first when ``synthetic``.

    Returns the written path.  ``name`` may not contain a folder: one flat figures folder.
    """
    if "/" in name or "\\" in name:
        raise ValueError(f"figure name {name!r}: expected a plain file stem without folders")
    stem = name[:-4] if name.endswith(".png") else name
    target = config.figures_dir(figures_dir) / f"{stem}.png"
    if synthetic:
        stamp_synthetic(fig)
    return save_png(fig, target)


def save_png(fig, path, dpi: int | None = None, close: bool = False) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically (a temporary file, then a rename), so a crash never leaves
    half a figure where a report or benchmark expects one; the one way the kit writes a figure file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **({} if dpi is None else {"dpi": dpi}))
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
