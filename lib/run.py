"""The run: one object that owns a run's parameters, its dataset, its split and the name of every
artifact, so notebooks hand results to each other through it instead of recomputing or guessing
file names.

``Run.open`` is the first call of every notebook::

    run = Run.open(profile, data_dir=data_dir, data_source=data_source, dataset=dataset,
                   abnormal_classes=abnormal_classes, group_pattern=group_pattern, seed=seed)
    run.table          # one row per image, with its group and its split (train / val / test)
    run.path("image_branch")             # build/<profile>/models/image_branch.keras
    run.save_metrics("03_image_branch", headline={...}, evaluation=...)

The first notebook to open a run (01 in the pipeline) loads the dataset, splits it by group and
writes ``run.json`` (parameters + dataset description) and ``split.csv``; every later one loads
the same images, checks they are the ones the split was written for, and reads the split.  A
parameter that contradicts the saved run (another seed, another dataset) is an error naming it,
and nothing saved is overwritten.
"""
from __future__ import annotations

import json
import math
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config
from lib.atomic import atomic_path, read_json, write_json
from lib.data import datasets, image_data, splits

#: every file a run writes, by name; nothing else in lib spells these paths
ARTIFACTS = {
    "run": "run.json",
    "split": "split.csv",
    "uci_split": "uci_split.csv",
    "image_branch": "models/image_branch.keras",
    "tabular_model": "models/tabular_mlp.keras",
    "tabular_preprocessor": "models/tabular_preprocessor.json",
    "tabular_model_screening": "models/tabular_mlp_screening.keras",
    "tabular_preprocessor_screening": "models/tabular_preprocessor_screening.json",
    "hybrid_keras": "models/hybrid_cervical_model.keras",
    "hybrid_h5": "models/hybrid_cervical_model.h5",
    "hybrid_card": "models/hybrid_cervical_model_card.json",
    "hybrid_preprocessor": "models/hybrid_tabular_preprocessor.json",
    "image_embeddings": "cache/image_embeddings.npz",
    "models": "models",
    "metrics": "metrics",
    "figures": "figures",
    "timings": "timings",
}

#: parameters that define the dataset and its split: a run refuses to reopen with other values
DATASET_KEYS = ("data_source", "dataset", "abnormal_classes", "group_pattern", "seed", "images_per_class")

_TIMING = re.compile(r"(seconds|_per_s)$")
PAGE_WIDTH = 100  # columns a report page shows of a printed line without scrolling sideways


def wrap(text: str) -> str:
    """``text`` wrapped at :data:`PAGE_WIDTH` columns, continuation lines indented, words never split: for lines
    a notebook prints (:meth:`Run.describe`, the reasons of the "auto" knobs)."""
    return textwrap.fill(text, width=PAGE_WIDTH, subsequent_indent="  ", break_long_words=False,
                         break_on_hyphens=False)


def _strict(obj, timings: dict, path: str = ""):
    """A copy of ``obj`` that is strict JSON (NaN/inf -> None) without wall-clock keys; those are
    collected into ``timings`` so two runs give byte-identical metrics files."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = str(k)
            if _TIMING.search(key) and isinstance(v, (int, float)) and not isinstance(v, bool):
                timings[f"{path}{key}"] = v
                continue
            out[key] = _strict(v, timings, f"{path}{key}.")
        return out
    if isinstance(obj, (list, tuple)):
        return [_strict(v, timings, path) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        try:
            obj = obj.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def resolve_source(data_source, data_dir=None) -> str:
    """``"synthetic"``, ``"sipakmed"`` or an absolute folder, as the run records it."""
    if data_source in (None, "auto"):
        return "sipakmed" if image_data._real_data_present(config.sipakmed_dir(data_dir)) else "synthetic"
    if data_source in ("sipakmed", "synthetic"):
        return data_source
    path = Path(data_source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"parameter 'data_source': {data_source!r} is not 'auto', 'sipakmed' or "
                                f"'synthetic', and no folder {path.resolve()} exists")
    return str(path.resolve())


def check_inputs(data_dir=None, data_source="auto", dataset=None, abnormal_classes=None, group_pattern=None) -> dict:
    """Every input checked in the first seconds, before any image is decoded; returns the resolved
    dataset parameters.  Errors name the parameter or file and say how to fix it."""
    pre = datasets.preset(dataset)
    if abnormal_classes is None:
        abnormal_classes = pre.get("abnormal_classes")
    if isinstance(abnormal_classes, str):
        abnormal_classes = [c.strip() for c in abnormal_classes.split(",") if c.strip()]
    if group_pattern is None:
        group_pattern = pre.get("group_pattern")
    image_data.compile_group_pattern(group_pattern)
    uci = config.uci_csv_path(data_dir)
    if not uci.is_file():
        raise FileNotFoundError(f"UCI risk-factors CSV not found at {uci}; the kit ships it in data/uci/ "
                                "(restore it with `git checkout data/uci`), or put it under <data_dir>/uci/")
    source = resolve_source(data_source, data_dir)
    if source not in ("sipakmed", "synthetic"):
        root = Path(source)
        dirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        split_dirs = {d for d in dirs if d.lower() in image_data.SPLIT_FOLDERS}
        if split_dirs:
            dirs = {p.name for d in split_dirs for p in (root / d).iterdir() if p.is_dir()}
        missing = sorted(set(abnormal_classes or ()) - dirs)
        if missing:
            raise ValueError(f"parameter 'abnormal_classes': {missing} are not class folders of {root} "
                             f"(found {sorted(dirs)})")
    return dict(data_source=source, dataset=dataset, abnormal_classes=sorted(abnormal_classes or []) or None,
                group_pattern=group_pattern)


def load_image_dataset(source="auto", data_dir=None, seed: int = 42, images_per_class: int | None = None,
                       folder_abnormal=None, group_pattern=None) -> image_data.ImageDataset:
    """The one loader of a run's images (:meth:`Run.open` calls it; it lives here, above ``data/`` and
    ``scaffold/``, because it is where the synthetic stand-in is chosen).

    ``source``: ``"auto"`` (real SIPaKMeD under ``config.sipakmed_dir(data_dir)`` when that
    folder holds anything, else the synthetic stand-in), ``"sipakmed"`` (real or error),
    ``"synthetic"``, or a path to a dataset (SIPaKMeD layout detected, else folder-per-class
    with ``folder_abnormal`` naming its abnormal classes; ignored for SIPaKMeD).
    ``images_per_class``: subsample whole cluster groups per class (see :func:`lib.data.image_data.subsample`);
    for synthetic data only about that many are generated.  Synthetic data is announced
    with a printed banner and a ``UserWarning``.
    """
    if images_per_class is not None and (isinstance(images_per_class, bool)
                                         or not isinstance(images_per_class, (int, np.integer)) or images_per_class < 1):
        raise ValueError(f"parameter 'images_per_class': expected None or a positive integer, got {images_per_class!r}")
    if source is None:
        source = "auto"
    sip_dir = config.sipakmed_dir(data_dir)
    if isinstance(source, str) and source in ("auto", "sipakmed", "synthetic"):
        if source == "synthetic" or (source == "auto" and not image_data._real_data_present(sip_dir)):
            reason = ("requested with source='synthetic'." if source == "synthetic"
                      else "real SIPaKMeD was not found under the data folder.")
            return image_data.subsample(_load_synthetic(seed, images_per_class, reason, sip_dir), images_per_class, seed)
        if not sip_dir.is_dir():
            raise FileNotFoundError(
                f"source='sipakmed': folder {sip_dir} does not exist; run `make data`, or pass data_dir / set "
                f"${config.ENV_DATA} to a folder holding sipakmed/"
            )
        ds = image_data.load_sipakmed(sip_dir)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"parameter 'source': {source!r} is not 'auto', 'sipakmed' or 'synthetic', "
                f"and no folder {path.resolve()} exists"
            )
        try:
            is_sip = image_data.detect_sipakmed_layout(path) is not None
        except (ValueError, FileNotFoundError):
            is_sip = True  # let load_sipakmed raise its precise message
        ds = (image_data.load_sipakmed(path) if is_sip else
              image_data.load_image_folder(path, abnormal_classes=folder_abnormal or (), group_pattern=group_pattern))
    if ds.synthetic:  # e.g. the stand-in copied where real data belongs: still say so, loudly
        image_data._banner(f"the loaded folder carries a {image_data.MARKER} marker.")
        warnings.warn(f"dataset at {ds.root} is SYNTHETIC (marker {ds.marker})", UserWarning, stacklevel=2)
    return image_data.subsample(ds, images_per_class, seed)


def _load_synthetic(seed, images_per_class, reason, sip_dir) -> image_data.ImageDataset:
    from lib.scaffold import synthetic  # the stand-in; imported only when needed

    cpc = None if images_per_class is None else math.ceil(images_per_class / 2) + 2
    root = synthetic.make_synthetic_sipakmed(image_data.synthetic_root(seed, cpc), seed=seed, clusters_per_class=cpc)
    image_data._banner(reason)
    warnings.warn(f"using SYNTHETIC SIPaKMeD stand-in at {root} ({reason} Real data is looked for in {sip_dir})",
                  UserWarning, stacklevel=3)
    ds = image_data.load_sipakmed(root)
    ds.source = "synthetic"
    return ds


def artifact_path(profile: str, artifact: str, build=None) -> Path:
    """Where ``artifact`` of the run of ``profile`` lives, without opening the run: for readers such as
    the web app.  :meth:`Run.path` is the same name for an open run."""
    if artifact not in ARTIFACTS:
        raise KeyError(f"unknown artifact {artifact!r}; known: {sorted(ARTIFACTS)}")
    return config.build_dir(build) / profile / ARTIFACTS[artifact]


def saved_split(profile: str, build=None) -> pd.DataFrame | None:
    """The split a run saved (``split.csv`` with absolute image paths, from ``run.json``'s dataset root),
    without loading or checking the images: for readers such as the web app. None when no run is saved."""
    root = config.build_dir(build) / profile
    run_json, split = root / ARTIFACTS["run"], root / ARTIFACTS["split"]
    if not (run_json.is_file() and split.is_file()):
        return None
    data_root = Path(read_json(run_json)["dataset_root"])
    table = pd.read_csv(split, dtype={"path": str, "label": str, "group": str}, keep_default_na=False)
    table["path"] = [str(data_root / p) for p in table["path"]]
    return table


@dataclass
class Run:
    """One run of the kit: ``build/<profile>/`` and everything in it."""

    profile: str
    params: dict
    root: Path
    dataset: datasets.DatasetInfo
    table: pd.DataFrame
    data_dir: str | None
    uci_csv: Path
    image_dataset: image_data.ImageDataset | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, profile: str = "smoke", *, data_dir=None, data_source="auto", dataset=None,
             abnormal_classes=None, group_pattern=None, seed: int = 42, build=None, **knobs) -> "Run":
        """Open (or, the first time, create) the run of ``profile``; see the module docstring."""
        P = config.run_params(profile, seed=seed, **knobs)
        resolved = check_inputs(data_dir, data_source, dataset, abnormal_classes, group_pattern)
        key = {**resolved, "seed": P["seed"], "images_per_class": P["images_per_class"]}
        root = config.run_dir(profile, build)
        run_json = root / ARTIFACTS["run"]
        saved = read_json(run_json) if run_json.exists() else None
        if saved is not None:
            for k in DATASET_KEYS:
                if saved["key"].get(k) != key.get(k):
                    raise ValueError(
                        f"parameter {k!r} = {key.get(k)!r} contradicts the run saved in {run_json} "
                        f"({k} = {saved['key'].get(k)!r}); its split and models were made with that value. Use another "
                        f"build folder (${config.ENV_BUILD}, or `make report BUILD=...`) or delete {root} to start over")
        with warnings.catch_warnings():
            # the stand-in is announced by a printed banner and by run.describe(); the warning's text
            # would put this machine's cache path on every page
            warnings.filterwarnings("ignore", message="using SYNTHETIC", category=UserWarning)
            ds = load_image_dataset(
                "auto" if data_source in (None, "auto") else resolved["data_source"], data_dir=data_dir,
                seed=P["seed"], images_per_class=P["images_per_class"],
                folder_abnormal=resolved["abnormal_classes"], group_pattern=resolved["group_pattern"])
        info = datasets.describe(ds, resolved["dataset"], resolved["group_pattern"])
        # "auto" becomes a number here, from the images themselves (config.resolve_image_size), the same in
        # every notebook of the run; the reason is kept for the notebooks to print
        sides = np.minimum(ds.table["width"], ds.table["height"])
        P["image_size"], P["image_size_reason"] = config.resolve_image_size(P["image_size"], sides)
        P["fine_tune"], P["fine_tune_reason"] = config.resolve_fine_tune(P["fine_tune"], sides)
        if saved is None:
            table = splits.grouped_split(ds.table, seed=P["seed"])
            splits.assert_no_group_leak(table)
            cls._write_split(root, table, ds.root)
            write_json(run_json, {"key": key, "params": P, "dataset": info.to_dict(), "dataset_root": str(ds.root)})
        else:
            table = cls._read_split(root, ds)
        return cls(profile=profile, params=P, root=root, dataset=info, table=table.reset_index(drop=True),
                   data_dir=data_dir, uci_csv=config.uci_csv_path(data_dir), image_dataset=ds)

    @staticmethod
    def _write_split(root: Path, table: pd.DataFrame, data_root: Path) -> None:
        out = table.copy()
        out["path"] = [Path(p).relative_to(data_root).as_posix() for p in out["path"]]
        with atomic_path(root / ARTIFACTS["split"]) as tmp:
            out.to_csv(tmp, index=False)

    @staticmethod
    def _read_split(root: Path, ds) -> pd.DataFrame:
        path = root / ARTIFACTS["split"]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing although {root / ARTIFACTS['run']} exists; delete {root} "
                                    "to start the run over")
        saved = pd.read_csv(path, dtype={"group": str, "label": str, "path": str}, keep_default_na=False)
        rel = [Path(p).relative_to(ds.root).as_posix() for p in ds.table["path"]]
        if sorted(rel) != sorted(saved["path"]):
            extra = sorted(set(rel) - set(saved["path"]))[:3]
            gone = sorted(set(saved["path"]) - set(rel))[:3]
            raise ValueError(f"the images under {ds.root} are not the ones {path} was written for "
                             f"(new: {extra}, gone: {gone}); delete {root} to split again")
        split_of = dict(zip(saved["path"], saved["split"]))
        table = ds.table.copy()
        table["split"] = [split_of[r] for r in rel]
        splits.assert_no_group_leak(table)
        return table

    # ------------------------------------------------------------------ what it holds
    @property
    def synthetic(self) -> bool:
        return self.dataset.synthetic

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.classes)

    @property
    def abnormal_classes(self) -> list[str]:
        return list(self.dataset.abnormal_classes)

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split (``train``, ``val`` or ``test``)."""
        if name not in splits.SPLITS:
            raise ValueError(f"split {name!r}: expected one of {splits.SPLITS}")
        return self.table[self.table["split"] == name]

    def path(self, artifact: str) -> Path:
        """Where an artifact lives (its folder is created); the only place that names them."""
        p = artifact_path(self.profile, artifact, self.root.parent)
        (p if "." not in p.name else p.parent).mkdir(parents=True, exist_ok=True)
        return p

    def uci_split(self, uci_frame) -> pd.Series:
        """The UCI records' train/val/test split of this run (:func:`lib.fusion.pairing.split_uci`, seeded by
        the run's seed), drawn by the first notebook that asks (04) and saved as ``uci_split.csv``; later
        notebooks read it.  A table whose records are not the saved ones is an error, nothing is overwritten."""
        from lib.fusion.pairing import split_uci

        frame = getattr(uci_frame, "frame", uci_frame)
        path = self.root / ARTIFACTS["uci_split"]
        if not path.exists():
            split = split_uci(frame, seed=self.params["seed"])
            with atomic_path(path) as tmp:
                pd.DataFrame({"record_id": split.index, "split": split.to_numpy()}).to_csv(tmp, index=False)
            return split
        saved = pd.read_csv(path, keep_default_na=False)
        if list(saved.columns) != ["record_id", "split"] or set(saved["split"]) - set(splits.SPLITS):
            raise ValueError(f"{path}: expected columns record_id, split with values {splits.SPLITS}")
        if sorted(saved["record_id"].astype(str)) != sorted(frame.index.astype(str)):
            raise ValueError(f"the UCI table read from {self.uci_csv.name} has other records than {path} was written "
                             f"for ({len(frame)} vs {len(saved)} records); delete {path} and rerun from notebook 04")
        split_of = dict(zip(saved["record_id"].astype(str), saved["split"]))
        return pd.Series([split_of[str(i)] for i in frame.index], index=frame.index, name="split")

    def relpaths(self, table) -> list[str]:
        """Image paths of ``table`` relative to the dataset root: how a metrics record names images."""
        root = Path(self.image_dataset.root) if self.image_dataset is not None else None
        return [Path(p).relative_to(root).as_posix() if root else Path(p).name for p in table["path"]]

    def rows(self, relpaths) -> pd.DataFrame:
        """The table rows of images named by :meth:`relpaths` (e.g. notebook 02's training subset)."""
        want = set(relpaths)
        mine = self.relpaths(self.table)
        keep = [r in want for r in mine]
        if sum(keep) != len(want):
            raise ValueError(f"{len(want) - sum(keep)} of {len(want)} saved image names are not in this run's table")
        return self.table[keep]

    def relpath(self, p) -> str:
        """A path as the notebooks print it: relative to the build folder, never a machine path."""
        p = Path(p)
        try:
            return p.relative_to(self.root.parent).as_posix()
        except ValueError:
            return p.name

    # ------------------------------------------------------------------ metrics and figures
    def save_metrics(self, notebook: str, headline: dict, synthetic: bool | None = None, **details) -> Path:
        """The one writer of a notebook's metrics record: strict JSON, wall-clock numbers moved to
        ``timings/<notebook>.json`` (the pipeline gathers them), so reruns compare byte for byte."""
        timings: dict = {}
        synthetic = self.synthetic if synthetic is None else bool(synthetic)  # 04 shows no image result
        record = _strict({"notebook": notebook, "profile": self.profile, "synthetic": synthetic,
                          "dataset": self.dataset.name, "headline": headline, **details}, timings)
        out = write_json(self.path("metrics") / f"{notebook}.json", record)
        if timings:
            write_json(self.path("timings") / f"{notebook}.json", timings)
        return out

    def metrics(self, notebook: str, needs=()) -> dict | None:
        """A notebook's saved metrics record, or None when it has not run in this run.

        ``needs`` names the entries the reader uses (dotted for nested ones, e.g. ``"batchnorm.accuracies"``):
        a record written by an older version of the kit that lacks one is an error that says which
        notebook to rerun, instead of a bare ``KeyError`` several cells later."""
        p = self.path("metrics") / f"{notebook}.json"
        if not p.exists():
            return None
        record = read_json(p)
        missing = []
        for key in needs:
            node = record
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(key)
                    break
                node = node[part]
        if missing:
            raise ValueError(
                f"{self.relpath(p)} lacks {missing}: it was written by an older version of notebook {notebook}. "
                f"Rerun it with this kit: python -m lib.report.pipeline --profile {self.profile} --only {notebook} "
                f"(with ${config.ENV_BUILD} set to this run's build folder if it is not build/), then this notebook again")
        return record

    def save_figure(self, fig, name: str):
        """Save a figure under the run's ``figures/``, stamped SYNTHETIC when the run is."""
        from lib import plots

        return plots.save_figure(fig, name, synthetic=self.synthetic, figures_dir=self.path("figures"))

    def describe(self) -> str:
        """What the run reads: dataset, classes, grouping, split sizes; lines wrapped for the page (:func:`wrap`)."""
        d = self.dataset
        lines = [f"dataset: {d.name}" + ("  [SYNTHETIC]" if d.synthetic else ""),
                 f"classes: {d.classes}; abnormal (positive for the risk view): {d.abnormal_classes or 'none'}",
                 d.grouping_sentence()]
        if d.shipped_split_groups_on_both_sides is not None:
            lines.append(f"the dataset ships its own train/test folders; that split puts "
                         f"{d.shipped_split_groups_on_both_sides} {d.group_word}s on both sides, so the kit "
                         "re-splits by group")
        lines.append(f"split: {self.root.name}/{ARTIFACTS['split']} " + json.dumps(
            self.table["split"].value_counts().reindex(list(splits.SPLITS)).fillna(0).astype(int).to_dict()))
        return "\n".join(wrap(line) for line in lines)
