"""Image tables: one validated row per image, whatever folder the images came from.

Everything downstream (splits, tf.data pipelines, feature caches) reads an
:class:`ImageDataset` table, never raw folders, so the checks live here once:
every file is opened with PIL (a corrupt or mislabelled file fails now, naming the
file, not in epoch 3), every image gets its cluster ``group`` (the unit that must never
cross a split), and a synthetic stand-in can never pass for real data.

Runs load images through one function, :func:`lib.run.load_image_dataset`.  Raw data folders are only read.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile

from lib import config
from lib.data.manifest import ABNORMAL, CLASSES, class_folder

#: file extensions read as images (case-insensitive); anything else (``.dat`` boundary
#: files, ``Thumbs.db``, READMEs) is ignored, as are hidden files such as macOS ``._*``
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
MARKER = "SYNTHETIC.txt"
SOURCES = ("sipakmed-official", "sipakmed-kaggle", "synthetic", "folder")
TABLE_COLUMNS = ["path", "label", "label_idx", "group", "abnormal", "width", "height", "mode"]
_CELL_NAME = re.compile(r"^(\d+)_(\d+)$")  # NNN_MM: cell MM of cluster image NNN
_LAYOUTS = {
    "official": "root/im_<Class>/CROPPED/NNN_MM.bmp (official per-class .7z extracted)",
    "kaggle": "root/im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp (Kaggle mirror)",
}


@dataclass
class ImageDataset:
    """A validated image table plus what it came from.

    ``table`` columns: ``path`` (absolute str), ``label``, ``label_idx`` (index into
    ``classes``), ``group`` (``"<class>/<cluster>"``), ``abnormal`` (bool), ``width``,
    ``height``, ``mode`` (PIL mode; the input pipeline converts to RGB).
    ``skipped``: ``(file, reason)`` for every unreadable file left out with ``on_bad="skip"``.
    ``marker``: the ``SYNTHETIC.txt`` found at or above ``root``, if any.
    """

    table: pd.DataFrame
    classes: list[str]
    abnormal_classes: list[str]
    source: str
    root: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layout: str | None = None
    marker: str | None = None
    group_rules: dict = field(default_factory=dict)  # images grouped by each rule: pattern / cluster / file
    shipped_both_sides: int | None = None  # groups the dataset's own train/test folders put on both sides

    @property
    def synthetic(self) -> bool:
        """True for the procedural stand-in: nothing learned from it says anything about real cells."""
        return self.source == "synthetic" or self.marker is not None

    def summary(self) -> pd.DataFrame:
        """Per class: images, cluster groups, abnormal flag, median width/height, modes."""
        t = self.table
        g = t.groupby("label", sort=True)
        out = pd.DataFrame({
            "images": g.size(),
            "groups": g["group"].nunique(),
            "abnormal": g["abnormal"].first(),
            "median_width": g["width"].median(),
            "median_height": g["height"].median(),
            "modes": g["mode"].agg(lambda s: ",".join(sorted(set(s)))),
        }).reindex(self.classes)
        out.index.name = "class"
        return out

    def __repr__(self) -> str:
        return (
            f"ImageDataset(source={self.source!r}, images={len(self.table)}, classes={len(self.classes)}, "
            f"groups={self.table['group'].nunique()}, synthetic={self.synthetic}, skipped={len(self.skipped)})"
        )


# --------------------------------------------------------------------------- helpers
def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"parameter 'on_bad': expected 'raise' or 'skip', got {on_bad!r}")


def _check_root(root) -> Path:
    if root is None:
        raise ValueError("parameter 'root': expected a folder path, got None")
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is a file, expected a folder")
    return root


def _find_marker(root: Path) -> str | None:
    """``SYNTHETIC.txt`` in ``root`` or any folder above it."""
    for d in (root, *root.parents):
        if (d / MARKER).is_file():
            return str(d / MARKER)
    return None


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (no recursion), hidden files excluded, sorted."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _describe_folder(folder: Path) -> str:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    dirs = sorted(p.name for p in entries if p.is_dir())
    files = sorted(p.name for p in entries if not p.is_dir())
    parts = []
    if dirs:
        parts.append(f"{len(dirs)} subfolder(s) {dirs[:5]}")
    if files:
        parts.append(f"{len(files)} other file(s) {files[:5]}")
    return "it holds " + (" and ".join(parts) if parts else "nothing")


def _read_header(path: Path) -> tuple[int, int, str]:
    """Width, height, mode; decodes the pixels too (about 0.15 ms per SIPaKMeD cell) because
    PIL's ``verify()`` is a no-op for BMP and would let a truncated file through."""
    with Image.open(path) as im:
        width, height, mode = im.size[0], im.size[1], im.mode
        im.load()
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width}x{height})")
    return int(width), int(height), str(mode)


def _scan(files: list[tuple[Path, str, str]], on_bad: str, what: str):
    """Open every ``(path, label, group)``; returns rows and ``skipped`` (or raises)."""
    rows, bad = [], []
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is bad input, even if someone relaxed PIL globally
    try:
        for path, label, group in files:
            if group is None:
                bad.append((str(path), "file name does not match NNN_MM.<ext> (cell MM of cluster image NNN), "
                                       "so its cluster group is unknown"))
                continue
            try:
                width, height, mode = _read_header(path)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                bad.append((str(path), f"not a readable image: {type(exc).__name__}: {exc}"))
                continue
            rows.append((str(path), label, group, width, height, mode))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    if bad:
        listing = "\n".join(f"  {f}: {r}" for f, r in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        if on_bad == "raise":
            raise ValueError(
                f"{len(bad)} bad image file(s) in {what}; expected readable images "
                f"(pass on_bad='skip' to leave them out, listed in .skipped):\n{listing}{more}"
            )
        warnings.warn(f"skipped {len(bad)} bad image file(s) in {what}:\n{listing}{more}", UserWarning, stacklevel=3)
    return rows, bad


def _build(rows, classes, abnormal_classes, source, root, skipped, layout) -> ImageDataset:
    table = pd.DataFrame(rows, columns=["path", "label", "group", "width", "height", "mode"])
    missing = [c for c in classes if c not in set(table["label"])]
    if missing:
        raise ValueError(f"no readable images left for class(es) {missing} in {root} after skipping bad files")
    index = {c: i for i, c in enumerate(classes)}
    table["label_idx"] = table["label"].map(index).astype(int)
    table["abnormal"] = table["label"].isin(set(abnormal_classes))
    table = table[TABLE_COLUMNS].sort_values(["label_idx", "path"], kind="stable").reset_index(drop=True)
    return ImageDataset(
        table=table, classes=list(classes), abnormal_classes=list(abnormal_classes), source=source,
        root=root, skipped=list(skipped), layout=layout, marker=_find_marker(root),
    )


# --------------------------------------------------------------------------- SIPaKMeD
def detect_sipakmed_layout(root) -> str | None:
    """``"official"``, ``"kaggle"`` or ``None`` (neither found for any class).

    Raises ``ValueError`` when classes disagree, a class has both layouts, or some
    classes are missing: a half-extracted download must not train a 3-class model.
    """
    root = Path(root)
    found: dict[str, list[str]] = {}
    for cls in CLASSES:
        kinds = []
        if (root / class_folder(cls) / "CROPPED").is_dir():
            kinds.append("official")
        if (root / class_folder(cls) / class_folder(cls) / "CROPPED").is_dir():
            kinds.append("kaggle")
        found[cls] = kinds
    if not any(found.values()):
        return None
    both = [c for c, k in found.items() if len(k) == 2]
    if both:
        raise ValueError(f"SIPaKMeD folder {root}: class(es) {both} have both layouts "
                         f"({_LAYOUTS['official']} and {_LAYOUTS['kaggle']}); keep one")
    absent = [c for c, k in found.items() if not k]
    if absent:
        raise FileNotFoundError(
            f"SIPaKMeD folder {root}: no CROPPED folder for class(es) {absent}; expected "
            + " or ".join(_LAYOUTS.values()) + " for all five classes"
        )
    kinds = {k[0] for k in found.values()}
    if len(kinds) > 1:
        raise ValueError(f"SIPaKMeD folder {root} mixes layouts: " +
                         ", ".join(f"{c}: {k[0]}" for c, k in found.items()) + "; extract all classes the same way")
    return kinds.pop()


def load_sipakmed(root, on_bad: str = "raise") -> ImageDataset:
    """The SIPaKMeD cropped cells under ``root``, official or Kaggle layout (detected).

    Only ``CROPPED/`` is read: the official extraction's cluster-level ``NNN.bmp`` and
    every ``.dat`` file are not cells and are ignored.  Group = ``"<class>/<NNN>"``.
    A folder holding ``SYNTHETIC.txt`` (here or above) loads with ``source="synthetic"``.
    ``on_bad="skip"`` leaves unreadable files out, listed in ``skipped`` and warned about.
    """
    _check_on_bad(on_bad)
    root = _check_root(root)
    layout = detect_sipakmed_layout(root)
    if layout is None:
        raise ValueError(
            f"unknown layout in {root}: looked for SIPaKMeD as " + " and as ".join(_LAYOUTS.values())
            + f"; {_describe_folder(root)}"
        )
    files = []
    for cls in CLASSES:
        cropped = root / class_folder(cls) / ("CROPPED" if layout == "official" else f"{class_folder(cls)}/CROPPED")
        images = _image_files(cropped)
        if not images:
            raise ValueError(f"class folder {cropped} has no images (expected NNN_MM.bmp files); {_describe_folder(cropped)}")
        for p in images:
            m = _CELL_NAME.match(p.stem)
            files.append((p, cls, f"{cls}/{m.group(1)}" if m else None))
    rows, skipped = _scan(files, on_bad, f"SIPaKMeD folder {root}")
    source = "synthetic" if _find_marker(root) else f"sipakmed-{layout}"
    ds = _build(rows, list(CLASSES), list(ABNORMAL), source, root, skipped, layout)
    ds.group_rules = {"cluster": int(len(ds.table))}
    return ds


# --------------------------------------------------------------------------- any folder-per-class dataset
#: names of shipped split folders (``root/train/<class>/...``); the kit re-splits by group anyway
SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")


def compile_group_pattern(pattern):
    """``group_pattern`` as a compiled regex with one capture (named ``group`` or the first).

    It is searched in each file's stem (name without extension); the captured text, inside its
    class, is the group: e.g. ``^(?P<group>.+?)_\d+_\d+$`` makes ``HSIL_1 (10)_0_4446.jpg`` and
    ``HSIL_1 (10)_0_8415.jpg`` (two augmented copies of one source image) one group.
    """
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    try:
        rx = re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ValueError(f"parameter 'group_pattern': {pattern!r} is not a valid regular expression ({exc})") from None
    if rx.groups < 1:
        raise ValueError(f"parameter 'group_pattern': {pattern!r} needs one capturing group, e.g. "
                         "'^(?P<group>.+?)_\\d+_\\d+$' (the captured text names the source image)")
    return rx


def _group_of(name: str, cls: str, rx) -> tuple[str, str]:
    """(group, rule that made it): pattern match, SIPaKMeD cell name, or the file itself."""
    stem = Path(name).stem
    if rx is not None:
        m = rx.search(stem)
        if m:
            g = m.group("group") if "group" in rx.groupindex else m.group(1)
            return f"{cls}/{g}", "pattern"
    m = _CELL_NAME.match(stem)
    if m and rx is None:
        return f"{cls}/{m.group(1)}", "cluster"
    return f"{cls}/{name}", "file"


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(root, abnormal_classes=(), on_bad: str = "raise", group_pattern=None) -> ImageDataset:
    """Any ``root/<class>/<image>`` dataset, or one that ships its split as ``root/train/<class>/...``
    and ``root/test/<class>/...`` (the shipped split is kept in column ``shipped_split``; the kit
    re-splits by group, because shipped splits often put copies of one image on both sides).

    Groups (the unit that never crosses a split): ``group_pattern`` when given (see
    :func:`compile_group_pattern`; files it does not match are their own group, counted in
    ``group_rules``); else SIPaKMeD-style ``NNN_MM`` names group by cluster ``NNN``; else every
    file is its own group - images are then assumed independent, and the kit says so.
    Images in nested subfolders of a class folder are refused (they would be silently
    ignored otherwise); a dataset needs at least two classes.
    """
    _check_on_bad(on_bad)
    root = _check_root(root)
    if isinstance(abnormal_classes, str):
        abnormal_classes = (abnormal_classes,)
    rx = compile_group_pattern(group_pattern)
    top = _class_dirs(root)
    if not top:
        raise ValueError(f"unknown layout in {root}: expected one subfolder per class (root/<class>/<image>); "
                         f"{_describe_folder(root)}")
    shipped = [d for d in top if d.name.lower() in SPLIT_FOLDERS]
    if shipped and len(shipped) != len(top):
        raise ValueError(f"image folder {root} mixes split folders {[d.name for d in shipped]} with class folders "
                         f"{[d.name for d in top if d not in shipped]}; use one layout")
    parts = [(d.name.lower(), _class_dirs(d)) for d in shipped] if shipped else [(None, top)]
    classes = sorted({d.name for _, dirs in parts for d in dirs})
    if len(classes) < 2:
        raise ValueError(f"image folder {root}: found {len(classes)} class folder(s) {classes}; a classifier needs "
                         "at least two (expected root/<class>/<image> with one folder per class)")
    unknown = sorted(set(abnormal_classes) - set(classes))
    if unknown:
        raise ValueError(f"parameter 'abnormal_classes': {unknown} not among the class folders {classes} of {root}")
    files, shipped_of, rules = [], {}, {"pattern": 0, "cluster": 0, "file": 0}
    for split_name, dirs in parts:
        for d in dirs:
            nested = [p for p in _class_dirs(d) if _image_files(p)]
            if nested:
                raise ValueError(
                    f"class folder {d} has subfolder(s) with images ({[p.name for p in nested[:3]]}); the kit reads "
                    "images directly inside each class folder only. Move them up, or point the kit at the subfolder")
            images = _image_files(d)
            if not images:
                raise ValueError(
                    f"class folder {d} has no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                    f"directly inside it); {_describe_folder(d)}"
                )
            for p in images:
                group, rule = _group_of(p.name, d.name, rx)
                rules[rule] += 1
                files.append((p, d.name, group))
                if split_name is not None:
                    shipped_of[str(p)] = "test" if split_name == "test" else ("val" if split_name.startswith("val") else "train")
    if rx is not None and rules["pattern"] == 0:
        raise ValueError(f"parameter 'group_pattern': {rx.pattern!r} matched no file name in {root} "
                         f"(e.g. {files[0][0].stem!r}); every image would be its own group")
    rows, skipped = _scan(files, on_bad, f"image folder {root}")
    abnormal = [c for c in classes if c in set(abnormal_classes)]
    ds = _build(rows, classes, abnormal, "folder", root, skipped, "split-folders" if shipped else "folder")
    if shipped:
        ds.table["shipped_split"] = ds.table["path"].map(shipped_of)
        ds.shipped_both_sides = int((ds.table.groupby("group")["shipped_split"].nunique() > 1).sum())
    ds.group_rules = {k: v for k, v in rules.items() if v}
    return ds


# --------------------------------------------------------------------------- subsampling
def subsample(dataset: ImageDataset, images_per_class: int | None, seed: int = 42,
              whole_groups: bool = False) -> ImageDataset:
    """At most ``images_per_class`` images per class, deterministic for a seed.

    Default: spread over as many cluster groups as possible - groups are visited in a
    seeded random order and one image is taken from each in turn - because a grouped
    train/val/test split needs several groups per class, and whole clusters (up to 26
    cells) would leave a 24-image smoke run with 2-3 groups in a class.  Images keep
    their ``group``, so splits stay leak-free.  ``whole_groups=True`` instead takes whole
    clusters (in seeded order, each one that still fits).  A class with fewer images keeps
    them all; ``None`` returns the dataset unchanged.
    """
    if images_per_class is None:
        return dataset
    if isinstance(images_per_class, bool) or not isinstance(images_per_class, (int, np.integer)) or images_per_class < 1:
        raise ValueError(f"parameter 'images_per_class': expected None or a positive integer, got {images_per_class!r}")
    rng = np.random.default_rng(seed)
    t = dataset.table
    keep: list[int] = []
    for cls in dataset.classes:
        members = t.index[t["label"] == cls]
        by_group = {g: list(idx) for g, idx in t.loc[members].groupby("group", sort=True).groups.items()}
        names = sorted(by_group)
        order = [names[i] for i in rng.permutation(len(names))]
        if whole_groups:
            total = 0
            for g in order:
                if total + len(by_group[g]) <= images_per_class:
                    keep.extend(by_group[g])
                    total += len(by_group[g])
        else:
            queues = [list(rng.permutation(by_group[g])) for g in order]
            taken, depth = [], 0
            while len(taken) < images_per_class and any(depth < len(q) for q in queues):
                for q in queues:
                    if depth < len(q) and len(taken) < images_per_class:
                        taken.append(int(q[depth]))
                depth += 1
            keep.extend(taken)
    table = t.loc[sorted(keep)].reset_index(drop=True)
    empty = [c for c in dataset.classes if c not in set(table["label"])]
    if empty:
        raise ValueError(f"subsample(images_per_class={images_per_class}, whole_groups=True): every group of class(es) "
                         f"{empty} is larger than {images_per_class} images; ask for more images or whole_groups=False")
    return ImageDataset(table=table, classes=list(dataset.classes), abnormal_classes=list(dataset.abnormal_classes),
                        source=dataset.source, root=dataset.root, skipped=list(dataset.skipped),
                        layout=dataset.layout, marker=dataset.marker, group_rules=dict(dataset.group_rules),
                        shipped_both_sides=dataset.shipped_both_sides)


# --------------------------------------------------------------------------- the entry point
def synthetic_root(seed: int = 42, clusters_per_class: int | None = None) -> Path:
    """Where the synthetic stand-in for ``seed`` lives in the cache; a reduced (smoke) set
    gets its own folder so it is never mistaken for the full one."""
    name = f"seed{seed}" if clusters_per_class is None else f"seed{seed}-clusters{clusters_per_class}"
    return config.cache_dir() / "synthetic_sipakmed" / name


def _banner(reason: str) -> None:
    text = (
        "SYNTHETIC DATA - " + reason + "\n"
        "These cells are procedurally drawn stand-ins in the SIPaKMeD layout. Every number and\n"
        "figure built from them shows the method working, not how it performs on real Pap smears.\n"
        "Real data: run `make data`, or point data_dir / $CERVICAL_KIT_DATA at a folder with sipakmed/."
    )
    bar = "=" * 88
    print(f"{bar}\n{text}\n{bar}")


def _real_data_present(folder: Path) -> bool:
    """Anything beyond notes in ``<data>/sipakmed`` counts as an attempt at real data (then its
    errors are shown, never hidden behind a silent switch to synthetic images)."""
    if not folder.is_dir():
        return False
    return any(
        not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() not in (".md", ".txt", ".csv"))
        for p in folder.iterdir()
    )
