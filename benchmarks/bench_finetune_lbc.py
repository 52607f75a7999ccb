#!/usr/bin/env python3
"""Ablation of the image branch's fine-tuning on real cells (LBC, split grouped by source image), beside the
linear probe, plus the border-crop shortcut check.  Results: build/benchmarks/finetune_lbc.json + .png

Rows: the linear probe (frozen pooled features + logistic regression, C chosen on validation: lib.image.probe),
the previous regularized recipe (top blocks 6c-7a + head trained jointly from a random head on cached
activations, lib.image.cached_finetune),
linear-probe-then-fine-tune (LP-FT, Kumar et al., ICLR 2022) and variants of it (LR schedule, augmented views,
label smoothing, depth of unfreezing), and the head-only stage of LP-FT alone.  Every fine-tuned variant with the
same cut reuses one set of cached frozen-bottom activations (same weights, same seeded augmentation draws).

The recipe is chosen on the grouped VALIDATION split (macro-F1, then abnormal AUC); test is only reported,
with group-bootstrap intervals (lib.image.image_model.score_probs) for every row.  ``tta_auto`` scores every row
(probe and fine-tuned alike) as notebook 03 does: flip test-time augmentation (lib.image.tta, four views) used
only when it raises that row's validation macro-F1; the verdict's ``with_tta_as_notebook_03`` compares those.

Border crop (lib.image.shortcuts): every model re-scores the test images with their borders cropped away
(central 80 % and 70 % of each side kept, resized back), per class too; and, as the no-zoom control, with the
border painted over in the centre's mean colour (``border_mask``).

    .venv/bin/python benchmarks/bench_finetune_lbc.py --data-source PATH/TO/lbc/Resampled-pap-smear-images
    # the default recipe and the probe only, into finetune_lbc_tta.json (keeps the full ablation's files):
    .venv/bin/python benchmarks/bench_finetune_lbc.py --only "LP-FT (lr 3e-5, 6 views)" --probe-size --out finetune_lbc_tta

Small-crop proxies (``--small-crops PX``): LBC and the stand-in are easy for frozen features, so every recipe ties
there; a real 7-class set of 40 px crops is where fine-tuning failed to beat the probe.  This option first writes
a copy of the data whose images are cut to their central ``--centre`` fraction and resized to PX px (same folders
and file stems, so the same groups), under <cache>/proxies/, and runs the ablation on it:

    .venv/bin/python benchmarks/bench_finetune_lbc.py --small-crops 40 --centre 0.5 --probe-size --out screen_lbc40
    .venv/bin/python benchmarks/bench_finetune_lbc.py --data-source synthetic --dataset none --small-crops 40 \
        --probe-size --out screen_syn40

Few images (``--keep-groups F``): a seeded fraction F of each class's groups (the kit's grouping), all their images,
copied under <cache>/proxies/.  A real small-crop set may have a few hundred images per split, where a deep fine-tune
can overfit or stop early:

    .venv/bin/python benchmarks/bench_finetune_lbc.py --small-crops 40 --centre 0.5 --keep-groups 0.4 --probe-size \
        --out screen_lbc40_small --only "LP-FT (lr 1e-4, from block 3a, patience 5)"

Single cells (``--cell-crops PX``): the two darkest blobs (mostly nuclei) inside the central 70 % of each LBC field,
cut as ``--window`` px squares and resized to PX px, keeping each field's group.  A downsampled field still shows
dozens of cells; a crop shows one, and a normal-looking cell may sit in an HSIL field, so the probe scores lower:

    .venv/bin/python benchmarks/bench_finetune_lbc.py --cell-crops 40 --probe-size --out screen_lbccells40 \
        --only "LP-FT (lr 3e-5)" --only "LP-FT (lr 1e-4, from block 3a, patience 5)"

Default data source: <data root>/lbc/Resampled-pap-smear-images ($CERVICAL_KIT_DATA).  The run's split is
written under build/benchmarks/<results name>_run/ (its own build folder, never a notebook run's).  Target: the
chosen fine-tuned row matches or beats the probe on test macro-F1 and abnormal AUC.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from lib import config, plots  # the kit is installed editable (make venv)
from lib.atomic import write_json

OUT_DIR = config.build_dir() / "benchmarks"
RESULTS = OUT_DIR / "finetune_lbc.json"
FIGURE = OUT_DIR / "finetune_lbc.png"

#: name -> (regularized_recipe keyword overrides, augmented views, stage): "lp_only" stops after the head stage
LP = dict(linear_probe_epochs=40)
VARIANTS = {
    "joint FT (previous default, lr 1e-4)": (dict(linear_probe_epochs=0, lr=1e-4), 3, "ft"),
    "LP only (head on frozen features)": (LP, 3, "lp_only"),
    "LP-FT (lr 3e-5)": ({**LP, "lr": 3e-5}, 3, "ft"),
    "LP-FT (lr 1e-4, cosine)": ({**LP, "lr": 1e-4, "lr_schedule": "cosine"}, 3, "ft"),
    "LP-FT (lr 3e-5, 6 views)": ({**LP, "lr": 3e-5}, 6, "ft"),
    "LP-FT (lr 3e-5, label smoothing 0.1)": ({**LP, "lr": 3e-5, "label_smoothing": 0.1}, 3, "ft"),
    "LP-FT (lr 3e-5, block 7a only)": ({**LP, "lr": 3e-5, "unfreeze_from": "block7a"}, 3, "ft"),
    # deeper and faster fine-tuning, for data where the frozen features are weaker (small crops: --small-crops)
    "LP-FT (lr 1e-4)": ({**LP, "lr": 1e-4}, 3, "ft"),
    "LP-FT (lr 1e-4, from block 5a)": ({**LP, "lr": 1e-4, "unfreeze_from": "block5a"}, 3, "ft"),
    "LP-FT (lr 3e-5, from block 5a)": ({**LP, "lr": 3e-5, "unfreeze_from": "block5a"}, 3, "ft"),
    "LP-FT (lr 1e-4, from block 4a)": ({**LP, "lr": 1e-4, "unfreeze_from": "block4a"}, 3, "ft"),
    # the deep recipe stopped at epochs 5-11 with patience 3: longer and with more views ("epochs" overrides --epochs)
    "LP-FT (lr 1e-4, from block 4a, 6 views)": ({**LP, "lr": 1e-4, "unfreeze_from": "block4a"}, 6, "ft"),
    "LP-FT (lr 1e-4, from block 4a, patience 5, 20 epochs)":
        ({**LP, "lr": 1e-4, "unfreeze_from": "block4a", "patience": 5, "epochs": 20}, 3, "ft"),
    "LP-FT (lr 1e-4, from block 4a, patience 5)":
        ({**LP, "lr": 1e-4, "unfreeze_from": "block4a", "patience": 5}, 3, "ft"),
    "LP-FT (lr 1e-4, from block 3a, patience 5)":
        ({**LP, "lr": 1e-4, "unfreeze_from": "block3a", "patience": 5}, 3, "ft"),
    # from 3a, 3 of 7 runs on three proxies had their best epoch at 10-11 of the 12 allowed: a longer cap.
    # Measured: no gain (best epoch stayed 11 on the 645-image LBC proxy and the stand-in 40 px, nothing better
    # in epochs 12-16, 4 epochs more to pay), so the kit keeps 12 (runs that stop before 12 cannot differ)
    "LP-FT (lr 1e-4, from block 3a, patience 5, 20 epochs)":
        ({**LP, "lr": 1e-4, "unfreeze_from": "block3a", "patience": 5, "epochs": 20}, 3, "ft"),
    # early stopping (and the head-only comparison) on validation macro-F1 instead of accuracy: for unbalanced
    # classes, where accuracy favours the big ones (--thin).  Measured on the unbalanced single-cell proxy
    # (--cell-crops 40 --thin SCC=0.25 --thin HSIL=0.4 --thin LSIL=0.7, one seed): validation macro-F1 0.781 vs
    # 0.824 stopping on accuracy (macro-F1 is noisier on 384 images and stopped at epoch 8, best 3), so the kit
    # keeps accuracy
    "LP-FT (lr 1e-4, from block 3a, patience 5, stop on macro-F1)":
        ({**LP, "lr": 1e-4, "unfreeze_from": "block3a", "patience": 5, "monitor": "val_macro_f1"}, 3, "ft"),
    "LP-FT (lr 1e-4, from block 2a, patience 5)":
        ({**LP, "lr": 1e-4, "unfreeze_from": "block2a", "patience": 5}, 3, "ft"),
    "LP-FT (lr 1e-4, from block 4a, 6 views, patience 5, 20 epochs)":
        ({**LP, "lr": 1e-4, "unfreeze_from": "block4a", "patience": 5, "epochs": 20}, 6, "ft"),
}

#: below the joint recipe and LP-FT on validation macro-F1 in the first round (one seed, all variants:
#: cosine 0.955, label smoothing 0.936 vs 0.967 / 0.952): skipped unless --all
RULED_OUT = ("LP-FT (lr 1e-4, cosine)", "LP-FT (lr 3e-5, label smoothing 0.1)")


def small_crop_proxy(source: Path, px: int, centre: float) -> Path:
    """A harder stand-in for small cell crops: every image of ``source`` cut to its central ``centre`` fraction
    (:func:`lib.image.shortcuts.central_box`, as the border-crop check cuts) and resized to ``px`` x ``px``
    (bicubic), same folders and file stems (so the same groups), PNG (SIPaKMeD's .bmp names kept).

    Why: on LBC (512 px fields) and the stand-in (cells of median shorter side 106 px) the frozen features are
    strong and every recipe ties; a real 7-class set of 40 px crops is where fine-tuning failed to beat the probe.
    Written once under ``<cache>/proxies/`` (atomically: a folder renamed into place), never into the source.
    """
    import shutil

    from PIL import Image

    from lib.data.image_data import IMAGE_EXTENSIONS
    from lib.image.input_pipeline import to_rgb
    from lib.image.shortcuts import central_box

    out = config.cache_dir() / "proxies" / f"{source.name}_c{round(centre * 100)}_{px}px"
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    files = [f for f in sorted(source.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"--small-crops: no images under {source} (set --data-source or ${config.ENV_DATA})")
    for f in files:
        rel = f.relative_to(source)
        dst = tmp / (rel if f.suffix.lower() == ".bmp" else rel.with_suffix(".png"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im.load()  # decoded before the file closes (to_rgb may return the image itself)
            rgb = to_rgb(im)
        rgb.crop(central_box(*rgb.size, centre)).resize((px, px), Image.BICUBIC).save(dst)
    tmp.rename(out)
    print(f"small-crop proxy: {len(files)} images, central {centre:g} of each side, {px} px -> {out}", flush=True)
    return out


def cell_crop_proxy(table, source: Path, px: int, window: int = 96, per_image: int = 2, centre: float = 0.7) -> Path:
    """Single-cell crops cut from smear fields: in each image of ``table`` (the kit's rows of ``source``), the
    ``per_image`` darkest blobs inside its central ``centre`` fraction (local minima of the Gaussian-smoothed grey
    image, at least ``window`` px apart: mostly nuclei), each cut as a ``window``-px square around it and resized to
    ``px`` x ``px``.  Written as ``<class>/<group>_<copy>_<k>.png`` so the LBC preset's group pattern gives every
    crop the group of its source image (copies and crops of one field never cross a split).

    Why: a downsampled field (``--small-crops``) still shows dozens of cells and each class's stain tone; a set of
    single-cell crops, where a normal-looking cell can sit in an HSIL field, is closer to the 7-class set of 40 px
    crops on which fine-tuning once earned nothing.  Written once under ``<cache>/proxies/`` (atomically)."""
    import shutil

    import numpy as np
    from PIL import Image
    from scipy import ndimage

    from lib.image.input_pipeline import to_rgb
    from lib.image.shortcuts import central_box

    if per_image < 1 or window < 8 or not 0 < centre <= 1:
        raise ValueError(f"--cell-crops: expected per_image >= 1, window >= 8 and centre in (0, 1], got "
                         f"{per_image}, {window}, {centre}")
    out = config.cache_dir() / "proxies" / f"{source.name}_cells{per_image}_w{window}_c{round(centre * 100)}_{px}px"
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    for group, rows in table.sort_values("path").groupby("group", sort=True):
        stem = str(group).split("/")[-1].rsplit(".", 1)[0]
        for copy, (path, label) in enumerate(zip(rows["path"], rows["label"])):
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
            grey = ndimage.gaussian_filter(np.asarray(rgb.convert("L"), np.float32), sigma=window / 16)
            x0, y0, x1, y1 = central_box(*rgb.size, centre)
            inner = np.full(grey.shape, np.inf, np.float32)
            inner[y0:y1, x0:x1] = grey[y0:y1, x0:x1]
            minima = (inner == ndimage.minimum_filter(inner, size=window)) & np.isfinite(inner)
            ys, xs = np.nonzero(minima)
            half = window // 2
            for k, i in enumerate(np.argsort(inner[ys, xs], kind="stable")[:per_image]):
                cx = int(np.clip(xs[i], half, rgb.size[0] - half))
                cy = int(np.clip(ys[i], half, rgb.size[1] - half))
                dst = tmp / label / f"{stem}_{copy}_{k}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                rgb.crop((cx - half, cy - half, cx - half + window, cy - half + window)).resize(
                    (px, px), Image.BICUBIC).save(dst)
                n += 1
    tmp.rename(out)
    print(f"cell-crop proxy: {n} crops of {window} px from {len(table)} images, {px} px -> {out}", flush=True)
    return out


def group_subset(table, source: Path, fraction, seed: int) -> Path:
    """A smaller copy of ``source``: a seeded ``fraction`` of each class's groups (``table['group']``, the kit's
    own grouping), all their images, same relative paths.  ``fraction``: one number for every class, or
    ``{class: fraction}`` (classes not named keep every group: an unbalanced proxy, ``--thin``).  Why: the held-out
    set is small (hundreds of images per split, not thousands) and may be unbalanced; a recipe that wins with 1600
    balanced training images may overfit with a few hundred, or favour the big classes.
    Written once under ``<cache>/proxies/`` (atomically), never into or beside ``source``."""
    import shutil

    import numpy as np

    per_class = dict(fraction) if isinstance(fraction, dict) else None
    for f in (per_class or {"": fraction}).values():
        if not 0 < f < 1:
            raise ValueError(f"--keep-groups / --thin: expected a fraction in (0, 1), got {f!r}")
    tag = ("t" + "_".join(f"{c}{round(f * 100)}" for c, f in sorted(per_class.items())) if per_class
           else f"g{round(fraction * 100)}")
    out = config.cache_dir() / "proxies" / f"{source.name}_{tag}_s{seed}"
    if out.is_dir():
        return out
    rng = np.random.default_rng(seed)
    first_label = table.groupby("group")["label"].first()
    unknown = sorted(set(per_class or {}) - set(first_label))
    if unknown:
        raise ValueError(f"--thin: no class {unknown} in {source} (classes: {sorted(first_label.unique())})")
    keep = set()
    for label in sorted(first_label.unique()):
        groups = sorted(first_label.index[first_label == label])
        f = per_class.get(label, 1.0) if per_class else fraction
        keep.update(rng.permutation(groups)[:max(2, round(f * len(groups)))].tolist())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = table[table["group"].isin(keep)]
    for path in rows["path"]:
        rel = Path(path).relative_to(source)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / rel)
    tmp.rename(out)
    print(f"group subset: {len(rows)} of {len(table)} images ({len(keep)} groups) -> {out}", flush=True)
    return out


def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def row_of(ev: dict) -> dict:
    auc = (ev["binary"] or {}).get("auc", {})
    return {"macro_f1": ev["macro_f1"], "macro_f1_low": ev["macro_f1_ci"]["ci_low"],
            "macro_f1_high": ev["macro_f1_ci"]["ci_high"], "abnormal_auc": auc.get("value"),
            "auc_low": auc.get("ci_low"), "auc_high": auc.get("ci_high"), "accuracy": ev["accuracy"],
            "recall": {c: float(ev["per_class"][c]["recall"]) for c in ev["classes"]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-source", default=str(config.data_root() / "lbc" / "Resampled-pap-smear-images"))
    ap.add_argument("--build", default=None, help="build folder of the run's split (default: <results name>_run)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--probe-size", type=int, nargs="*", default=None,
                    help="extra linear-probe rows at these sizes (default: 224; none when given without sizes)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--keeps", default="1,0.8,0.7", help="border crop: central fractions kept")
    ap.add_argument("--recipe-seeds", type=int, nargs="*", default=[43, 44],
                    help="fine-tuned variants are repeated with these recipe seeds too (same split, same views)")
    ap.add_argument("--only", action="append", default=None, help="run only these variants (names as listed)")
    ap.add_argument("--all", action="store_true", help="also the variants the first round ruled out on validation")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from the JSON")
    ap.add_argument("--dataset", default="lbc", help="dataset preset of --data-source (lib.data.datasets), or 'none' "
                                                      "for a folder described from its files (the stand-in: 'synthetic')")
    ap.add_argument("--small-crops", type=int, default=None, metavar="PX",
                    help="run on a small-crop proxy of the data: central --centre of each image resized to PX px")
    ap.add_argument("--centre", type=float, default=1.0, help="with --small-crops: central fraction of each side kept")
    ap.add_argument("--cell-crops", type=int, default=None, metavar="PX",
                    help="run on single-cell crops of the fields (the --per-image darkest blobs, --window px squares) "
                         "resized to PX px; the LBC preset's groups are kept")
    ap.add_argument("--window", type=int, default=96, help="with --cell-crops: side of each crop in source pixels")
    ap.add_argument("--per-image", type=int, default=2, help="with --cell-crops: crops per image")
    ap.add_argument("--keep-groups", type=float, default=None, metavar="F",
                    help="run on a seeded fraction F of each class's groups (a small-data proxy; after --small-crops)")
    ap.add_argument("--thin", action="append", default=None, metavar="CLASS=F",
                    help="keep a seeded fraction F of CLASS's groups (repeatable; other classes keep all): an "
                         "unbalanced proxy, after --small-crops / --cell-crops")
    ap.add_argument("--out", default=None, help="results name under build/benchmarks/ (default finetune_lbc): a "
                                                "partial rerun (--only) can keep the full ablation's files")
    args = ap.parse_args(argv)
    global RESULTS, FIGURE
    if args.out:
        RESULTS, FIGURE = OUT_DIR / f"{args.out}.json", OUT_DIR / f"{args.out}.png"
    if args.plot_only:
        from lib.atomic import read_json

        plot(read_json(RESULTS))
        return 0

    import keras
    import numpy as np
    from lib.image import cached_finetune as cf
    from lib.image import image_model, probe, shortcuts, tta
    from lib.run import Run

    info = machine()
    t_all = time.perf_counter()
    build = args.build or str(OUT_DIR / f"{RESULTS.stem}_run")
    source = args.data_source
    # a copy of the stand-in in a plain folder would be described as real SIPaKMeD: say what it is
    data_name = "SYNTHETIC stand-in (SIPaKMeD layout)" if source == "synthetic" else None
    if args.small_crops:
        if source == "synthetic":
            from lib.run import load_image_dataset

            source = str(load_image_dataset("synthetic", seed=args.seed).root)
        source = str(small_crop_proxy(Path(source), args.small_crops, args.centre))
    dataset = None if args.dataset in ("none", "") else args.dataset
    if args.cell_crops:
        if args.small_crops:
            raise SystemExit("--cell-crops and --small-crops: choose one proxy")
        whole = Run.open("full", data_source=source, dataset=dataset, build=build + "_fields", seed=args.seed)
        source = str(cell_crop_proxy(whole.table, Path(source), args.cell_crops, args.window, args.per_image))
    thin = {}
    for item in args.thin or []:
        cls, _, f = item.partition("=")
        try:
            thin[cls] = float(f)
        except ValueError:
            raise SystemExit(f"--thin {item!r}: expected CLASS=F, e.g. SCC=0.25") from None
    if args.keep_groups and thin:
        raise SystemExit("--keep-groups and --thin: choose one")
    if args.keep_groups or thin:
        whole = Run.open("full", data_source=source, dataset=dataset, build=build + "_whole", image_size=args.image_size,
                         seed=args.seed)
        source = str(group_subset(whole.table, Path(source), thin or args.keep_groups, args.seed))
    run = Run.open("full", data_source=source, dataset=dataset, build=build, image_size=args.image_size,
                   epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    P = run.params
    data_name = data_name or run.dataset.name
    size, bs, seed = P["image_size"], P["batch_size"], P["seed"]
    config.seed_everything(seed)
    train_t, val_t, test_t = (run.split(s) for s in ("train", "val", "test"))
    classes, abnormal = run.classes, run.abnormal_classes
    gw = f"{run.dataset.group_word}s"
    keeps = [float(k) for k in args.keeps.split(",")]
    print(f"{data_name}: train/val/test = {len(train_t)}/{len(val_t)}/{len(test_t)} images, "
          f"{test_t['group'].nunique()} test groups; {P['backbone']} at {size} px; load {info['load_avg_1m_at_start']}")

    def score(probs, table):
        return image_model.score_probs(probs, table, classes, abnormal, n_boot=args.n_boot, seed=seed, group_word=gw)

    crop_cache = {}
    from lib.image.input_pipeline import load_images

    val_images = load_images(val_t, size)

    def tta_row(pred):  # flip TTA as notebook 03 does it (lib.image.tta): chosen on validation, then test
        res = tta.choose_and_score(pred, val_images, val_t, cropped(1.0), test_t, classes, abnormal,
                                   n_boot=args.n_boot, seed=seed, group_word=gw)
        return {**tta.summary(res), "chosen_test": row_of(res["chosen"]),
                "val_chosen": row_of(res["val"]["flips" if res["use_flips"] else "plain"])}

    def cropped(k):
        if k not in crop_cache:
            crop_cache[k] = shortcuts.load_cropped(test_t, size, k)
        return crop_cache[k]

    masked = lambda k: shortcuts.mask_border(cropped(1.0), k)  # noqa: E731 - the no-zoom control
    mask_keeps = [k for k in keeps if k < 1.0]
    rows, crops, masks = {}, {}, {}

    # ------------------------------------------------------------------ linear probe rows
    for psize in [size] + (args.probe_size if args.probe_size is not None else [224]):
        t0 = time.perf_counter()
        LPR = probe.linear_probe(run.table, P["backbone"], psize, P["weights"], seed=seed, batch_size=bs)
        pred = probe.predictor(LPR, P["backbone"], psize, P["weights"], seed, bs)
        name = f"linear probe ({psize} px)"
        secs = time.perf_counter() - t0
        rows[name] = {"kind": "probe", "image_size": psize, "C": LPR["C"], "seconds": round(secs, 1),
                      "val": row_of(score(LPR["val_probs"], val_t)), "test": row_of(score(LPR["probs"], test_t))}
        if psize == size:
            assert np.allclose(pred(cropped(1.0)), LPR["probs"], atol=1e-3), "probe predictor != linear_probe"
            rows[name]["tta_auto"] = tta_row(pred)
            crops[name] = shortcuts.border_crop_scores(pred, test_t, classes, abnormal, size, keeps, n_boot=args.n_boot,
                                                       seed=seed, group_word=gw, images=cropped)
            masks[name] = shortcuts.border_crop_scores(pred, test_t, classes, abnormal, size, mask_keeps,
                                                       n_boot=args.n_boot, seed=seed, group_word=gw, images=masked)
        print(f"{name}: C={LPR['C']}, val macro-F1 {rows[name]['val']['macro_f1']:.3f}, "
              f"test {rows[name]['test']['macro_f1']:.3f} / AUC {rows[name]['test']['abnormal_auc']:.3f} ({secs:.0f} s)",
              flush=True)
        del pred

    # ------------------------------------------------------------------ fine-tuned variants
    acts = {}  # (unfreeze_from) -> cached activations with the most views any variant of that cut needs
    wanted = {n: v for n, v in VARIANTS.items() if (not args.only or n in args.only)
              and (args.all or args.only or n not in RULED_OUT)}
    recipe_seeds = [seed] + [s for s in (args.recipe_seeds or []) if s != seed]
    for name, (kw, views, stage) in wanted.items():
        kw = dict(kw)
        epochs = kw.pop("epochs", P["epochs"])
        cut_key = kw.get("unfreeze_from", image_model.UNFREEZE_FROM)
        by_seed = []
        for rs in recipe_seeds:  # the views stay the main seed's: other seeds vary the head's start and the order
            keras.backend.clear_session()
            config.seed_everything(rs)
            t0 = time.perf_counter()
            recipe = image_model.regularized_recipe(len(classes), P["backbone"], size, P["weights"], seed=rs,
                                                    train_labels=train_t["label_idx"], dropout=0.3, **kw)
            need = max(v for n, (k2, v, _) in wanted.items()
                       if k2.get("unfreeze_from", image_model.UNFREEZE_FROM) == cut_key)
            if cut_key not in acts:
                acts[cut_key] = cf.cache_activations(recipe, train_t, val_t, size, bs, need, progress=False)
                print(f"  cached {need} view(s) at the cut {acts[cut_key]['cut_layer']} in "
                      f"{acts[cut_key]['cache_seconds']:.0f} s", flush=True)
            a = acts[cut_key]
            if stage == "lp_only":
                y = train_t["label_idx"].to_numpy().astype(np.int32)
                cw = recipe.class_weight
                sw = None if cw is None else np.asarray([cw[int(c)] for c in y], np.float32)
                hist = cf.linear_probe_stage(recipe, a["train"][:views], y, a["val"],
                                             val_t["label_idx"].to_numpy().astype(np.int32), bs, sw, rs)
            else:
                hist = cf.fit_top(recipe, train_t, val_t, size, bs, epochs, views=views, seed=rs, log=False,
                                  progress=False, activations=a)
            fit_s = time.perf_counter() - t0
            pred = shortcuts.keras_predictor(recipe.model, bs)
            ev_val, ev_test = score(pred(val_images), val_t), score(pred(cropped(1.0)), test_t)
            by_seed.append({"seed": rs, "val_macro_f1": ev_val["macro_f1"],
                            "val_auc": (ev_val["binary"] or {}).get("auc", {}).get("value"),
                            "test_macro_f1": ev_test["macro_f1"],
                            "test_auc": (ev_test["binary"] or {}).get("auc", {}).get("value"),
                            "epochs_run": hist["epochs_run"], "best_epoch": hist["best_epoch"],
                            "fit_seconds": round(fit_s, 1)})
            print(f"  {name}, seed {rs}: val macro-F1 {ev_val['macro_f1']:.3f}, test {ev_test['macro_f1']:.3f}; "
                  f"{hist['epochs_run']} epochs (best {hist['best_epoch']}), {fit_s:.0f} s", flush=True)
            if rs != seed:
                continue
            rows[name] = {"kind": stage, "image_size": size, "views": views, "options": dict(kw), "epochs": epochs,
                          "epochs_run": hist["epochs_run"], "best_epoch": hist["best_epoch"],
                          "linear_probe_epochs_run": (hist.get("linear_probe") or {}).get("epochs_run"),
                          "fit_seconds": round(fit_s, 1), "cache_seconds_shared": a["cache_seconds"],
                          "val": row_of(ev_val), "test": row_of(ev_test)}
            crops[name] = shortcuts.border_crop_scores(pred, test_t, classes, abnormal, size, keeps,
                                                       n_boot=args.n_boot, seed=seed, group_word=gw, images=cropped)
            masks[name] = shortcuts.border_crop_scores(pred, test_t, classes, abnormal, size, mask_keeps,
                                                       n_boot=args.n_boot, seed=seed, group_word=gw, images=masked)

            rows[name]["tta_auto"] = tta_row(pred)  # the first round's 3-view "tta_flips" rows are in its JSON
        r = rows[name]
        r["by_seed"] = by_seed
        for part in ("val", "test"):
            v = [b[f"{part}_macro_f1"] for b in by_seed]
            r[f"{part}_macro_f1_mean"] = float(np.mean(v))
            r[f"{part}_macro_f1_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        print(f"{name}: val macro-F1 {r['val']['macro_f1']:.3f} AUC {r['val']['abnormal_auc']:.4f}; test macro-F1 "
              f"{r['test']['macro_f1']:.3f} [{r['test']['macro_f1_low']:.3f}, {r['test']['macro_f1_high']:.3f}] "
              f"AUC {r['test']['abnormal_auc']:.4f}; over {len(by_seed)} seed(s) val {r['val_macro_f1_mean']:.3f}, "
              f"test {r['test_macro_f1_mean']:.3f} +- {r['test_macro_f1_sd']:.3f}", flush=True)

    # ------------------------------------------------------------------ choice on validation, never test
    tuned = [n for n, r in rows.items() if r["kind"] == "ft"]
    key = lambda n: (round(rows[n]["val_macro_f1_mean"], 4), rows[n]["val"]["abnormal_auc"] or 0)  # noqa: E731
    chosen = max(tuned, key=key) if tuned else None
    probe_name = f"linear probe ({size} px)"
    verdict = None
    if chosen:
        c, p = rows[chosen]["test"], rows[probe_name]["test"]
        verdict = {"chosen_on_validation": chosen, "probe": probe_name,
                   "test_d_macro_f1": c["macro_f1"] - p["macro_f1"], "test_d_auc": c["abnormal_auc"] - p["abnormal_auc"],
                   "val_d_macro_f1": rows[chosen]["val"]["macro_f1"] - rows[probe_name]["val"]["macro_f1"],
                   "matches_or_beats_probe": bool(c["macro_f1"] >= p["macro_f1"] and c["abnormal_auc"] >= p["abnormal_auc"])}
        if "tta_auto" in rows[chosen] and "tta_auto" in rows[probe_name]:  # both rows as notebook 03 reports them
            ct, pt = rows[chosen]["tta_auto"]["chosen_test"], rows[probe_name]["tta_auto"]["chosen_test"]
            verdict["with_tta_as_notebook_03"] = {
                "fine_tuned_uses_flips": rows[chosen]["tta_auto"]["use_flips"],
                "probe_uses_flips": rows[probe_name]["tta_auto"]["use_flips"],
                "test_d_macro_f1": ct["macro_f1"] - pt["macro_f1"], "test_d_auc": ct["abnormal_auc"] - pt["abnormal_auc"],
                "matches_or_beats_probe": bool(ct["macro_f1"] >= pt["macro_f1"] and ct["abnormal_auc"] >= pt["abnormal_auc"])}
    some = next(iter(crops.values()))
    out = {"machine": info, "dataset": data_name, "group_unit": run.dataset.group_word,
           "small_crop_proxy": {"px": args.small_crops, "centre": args.centre} if args.small_crops else None,
           "cell_crop_proxy": {"px": args.cell_crops, "window": args.window, "per_image": args.per_image,
                               "centre": 0.7} if args.cell_crops else None,
           "keep_groups": args.keep_groups, "thin": thin or None,
           "image_size": size, "epochs": P["epochs"],
           "batch_size": bs, "seed": seed, "n": {"train": len(train_t), "val": len(val_t), "test": len(test_t),
                                                 "test_groups": int(test_t["group"].nunique())},
           "interval_method": some["1"]["interval_method"] if "1" in some else None,
           "selection": "grouped validation split: macro-F1 averaged over recipe seeds, then abnormal AUC (test never "
                        "used to choose)", "recipe_seeds": recipe_seeds,
           "rows": rows, "verdict": verdict, "border_crop": crops, "border_mask": masks, "keeps": keeps,
           "total_seconds": round(time.perf_counter() - t_all, 1)}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS, out)
    plot(out)
    print(f"chosen on validation: {chosen}; verdict {verdict}")
    print(f"wrote {RESULTS.relative_to(ROOT) if RESULTS.is_relative_to(ROOT) else RESULTS.name} and the figure "
          f"({out['total_seconds']:.0f} s)")
    return 0


def plot(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = out["rows"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.5 * len(names) + 2.5),
                             gridspec_kw={"width_ratios": [1, 1, 1.1]})
    chosen = (out.get("verdict") or {}).get("chosen_on_validation")
    ypos = np.arange(len(names))[::-1]
    # one colour per row in all three panels: probes orange/brown, the chosen row green, the others from the rest
    probe_cols, other_cols = iter(["C1", "C5", "C8"] * len(names)), iter(["C0", "C3", "C4", "C6", "C7", "C9"] * len(names))
    colour = {n: "C2" if n == chosen else next(probe_cols) if rows[n]["kind"] == "probe" else next(other_cols)
              for n in names}
    for ax, (metric, lo, hi, label) in zip(axes[:2], [("macro_f1", "macro_f1_low", "macro_f1_high", "test macro-F1"),
                                                      ("abnormal_auc", "auc_low", "auc_high", "test abnormal AUC")]):
        for y, n in zip(ypos, names):
            t = rows[n]["test"]
            ax.errorbar(t[metric], y, xerr=[[t[metric] - t[lo]], [t[hi] - t[metric]]], fmt="o", color=colour[n],
                        capsize=3)
            ax.plot(rows[n]["val"][metric], y, "x", color="grey")
        ax.set_yticks(ypos, names if ax is axes[0] else [""] * len(names))
        ax.set(xlabel=label + " (o, 95% group bootstrap) / validation (x)")
    proxy = out.get("small_crop_proxy")
    cells = out.get("cell_crop_proxy")
    what = out["dataset"].split(" (")[0] + (f", small-crop proxy {proxy['px']} px" if proxy else "") + (
        f", single-cell crops {cells['px']} px" if cells else "")
    if out.get("thin"):
        what += ", unbalanced (groups kept: " + ", ".join(f"{c} {f:.0%}" for c, f in sorted(out["thin"].items())) + ")"
    if out.get("keep_groups"):
        what += f", {out['keep_groups']:.0%} of the groups ({out['n']['train']} training images)"
    axes[0].set_title(f"{what}, grouped by {out.get('group_unit', 'source image')}, {out['image_size']} px; "
                      "green: chosen on validation", fontsize=9)
    ax = axes[2]
    for n, by_keep in out["border_crop"].items():
        by_keep = dict(sorted(by_keep.items(), key=lambda kv: -kv[1]["keep"]))
        ks = [r["keep"] for r in by_keep.values()]
        ax.plot(ks, [r["macro_f1"] for r in by_keep.values()], "-o", ms=3, label=n, color=colour.get(n, "grey"))
        mask = {**{k: v for k, v in by_keep.items() if v["keep"] == 1.0}, **out.get("border_mask", {}).get(n, {})}
        if len(mask) > 1:
            pts = sorted(((r["keep"], r["macro_f1"]) for r in mask.values()), reverse=True)
            ax.plot(*zip(*pts), ":", color=colour.get(n, "grey"))
    ax.set(xlabel="central fraction of each side kept at test time", ylabel="test macro-F1",
           title="Test borders cropped (solid) or painted over (dotted)")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_png(fig, FIGURE, dpi=110, close=True)


if __name__ == "__main__":
    sys.exit(main())
