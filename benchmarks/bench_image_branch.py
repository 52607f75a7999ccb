#!/usr/bin/env python3
"""Benchmarks of the image branch (targets, not unit tests).  Results: build/benchmarks/image_branch.json + .png

features   throughput of ``lib.image.features`` (decode from disk + backbone + pooling, tqdm off) versus a bare
           ``model.predict`` on the same images already decoded in memory, same model, same run.
           Target: ratio >= 0.8.  Also checks both give the same features, and times a cache hit.
notebooks  runs notebooks 02 and 03 with papermill (default: the full profile) and records wall time,
           peak RSS of the kernel, and training images/s per notebook.
           Budget (full profile, 4049-image stand-in, 224 px, 2 cores): 02+03 under 30 min, peak RSS < 6 GB.

    .venv/bin/python benchmarks/bench_image_branch.py features [--n-images 256 --image-size 224]
    .venv/bin/python benchmarks/bench_image_branch.py notebooks [--profile full] [--param image_size=128 ...]
    .venv/bin/python benchmarks/bench_image_branch.py notebooks --from-build CLONE/build

``--from-build`` records 02 and 03 from a pipeline run that already happened (its ``<profile>/notebooks/*.stamp.json``
wall time and kernel peak RSS, and its metrics), e.g. the clone ``bench_report.py --profile full --keep`` leaves,
instead of running them again.

``--param`` goes to both notebooks (``epochs`` also sets notebook 02's naive epochs).  The JSON records
the 1-minute load average at the start: on a shared machine wall times are upper bounds.
Each mode updates its own section of the JSON, so the two can run at different times; the figure is
redrawn from whatever the JSON holds.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from lib import config, plots  # the kit is installed editable (make venv)
from lib.atomic import read_json, write_json

OUT_DIR = config.build_dir() / "benchmarks"
RESULTS = OUT_DIR / "image_branch.json"
FIGURE = OUT_DIR / "image_branch.png"
TARGET_RATIO = 0.8
BUDGET_SECONDS = 30 * 60
BUDGET_RSS_MB = 6 * 1024
NOTEBOOKS = ("02_overfitting_baseline", "03_image_branch")


def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def _update(section: str, payload: dict) -> dict:
    data = read_json(RESULTS) if RESULTS.exists() else {}
    data[section] = payload
    write_json(RESULTS, data)
    return data


# --------------------------------------------------------------------------- features
def bench_features(args) -> dict:
    import numpy as np

    from lib.image import features, input_pipeline
    from lib.run import load_image_dataset

    config.seed_everything(args.seed)
    per_class = math.ceil(args.n_images / 5)
    ds = load_image_dataset(args.data_source, seed=args.seed, images_per_class=per_class)
    table = ds.table.sample(n=min(args.n_images, len(ds.table)), random_state=args.seed).reset_index(drop=True)
    n, size, bs = len(table), args.image_size, args.batch_size
    print(f"{n} images ({'synthetic' if ds.synthetic else ds.source}), {args.backbone} at {size} px, batch {bs}")

    t0 = time.perf_counter()
    model = features.feature_model(args.backbone, size, args.weights, args.seed)
    build_s = time.perf_counter() - t0
    arrays = input_pipeline.load_images(table, size)  # decoded once, in memory: the bare baseline's input

    # warm-up: trace both paths on one batch so neither measurement pays for tracing
    model.predict(arrays[:bs], batch_size=bs, verbose=0)
    features.compute_features(model, table.iloc[:bs], size, bs, progress=False)

    bare, piped = [], []
    ref = out = None
    for r in range(args.repeats):  # alternate the order: machine-load drift hits both alike
        for which in (("bare", "pipe") if r % 2 == 0 else ("pipe", "bare")):
            t = time.perf_counter()
            if which == "bare":
                ref = model.predict(arrays, batch_size=bs, verbose=0)
                bare.append(n / (time.perf_counter() - t))
            else:
                out = features.compute_features(model, table, size, bs, progress=False)
                piped.append(n / (time.perf_counter() - t))
        print(f"  repeat {r + 1}: bare predict {bare[-1]:.1f} img/s, lib.image.features {piped[-1]:.1f} img/s")
    max_diff = float(np.abs(ref - out).max())

    # end to end through the cache: a miss (model build + compute + atomic write), then a hit
    cache = OUT_DIR / "feature_cache"
    os.environ[config.ENV_CACHE] = str(cache)
    for old in (cache / "features").glob("*.npz"):
        old.unlink()
    t = time.perf_counter()
    features.extract_features(table, args.backbone, size, args.weights, bs, progress=False, seed=args.seed)
    miss_s = time.perf_counter() - t
    t = time.perf_counter()
    features.extract_features(table, args.backbone, size, args.weights, bs, progress=False, seed=args.seed)
    hit_s = time.perf_counter() - t

    med = lambda xs: float(np.median(xs))  # noqa: E731
    result = {
        "n_images": n, "image_size": size, "batch_size": bs, "backbone": args.backbone, "weights": str(args.weights),
        "synthetic": ds.synthetic, "repeats": args.repeats,
        "bare_predict_img_s": [round(x, 1) for x in bare], "lib_features_img_s": [round(x, 1) for x in piped],
        "ratio_median": round(med(piped) / med(bare), 3), "ratio_best": round(max(piped) / max(bare), 3),
        "target_ratio": TARGET_RATIO, "max_abs_diff_vs_bare": max_diff, "model_build_s": round(build_s, 1),
        "extract_cache_miss_s": round(miss_s, 1), "extract_cache_hit_s": round(hit_s, 3),
        "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    result["meets_target"] = result["ratio_median"] >= TARGET_RATIO
    print(f"ratio (median) {result['ratio_median']:.3f} (target >= {TARGET_RATIO}); max |diff| {max_diff:.2e}; "
          f"cache miss {miss_s:.1f} s, hit {hit_s * 1000:.0f} ms")
    return result


# --------------------------------------------------------------------------- notebooks
def _parse_params(items) -> dict:
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def bench_notebooks(args) -> dict:
    from lib.report import pipeline

    params = {"profile": args.profile, **_parse_params(args.param)}
    out_dir = OUT_DIR / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    source = "this run"
    if args.from_build:
        run_dir = Path(args.from_build) / args.profile
        stamps = {stem: run_dir / "notebooks" / f"{stem}.stamp.json" for stem in NOTEBOOKS}
        missing = [str(p) for p in stamps.values() if not p.exists()]
        if missing:
            raise SystemExit(f"--from-build: no pipeline record {missing}; run the pipeline there first")
        source = f"pipeline run in {run_dir}"
    for stem in NOTEBOOKS:
        if args.from_build:
            stats = read_json(stamps[stem])
            m = read_json(run_dir / "metrics" / f"{stem}.json")
        else:
            nb = ROOT / "notebooks" / f"{stem}.ipynb"
            print(f"running {stem} with {params} ...", flush=True)
            stats = pipeline.run_notebook(nb, out_dir / f"{stem}.ipynb", params)
            m = read_json(config.metrics_dir(args.profile) / f"{stem}.json")
        h = m["history"]
        n_eval = m.get("n_val", 0) * h["epochs_run"] + m.get("n_test", 0)
        runs[stem] = {
            "wall_s": stats["seconds"], "peak_rss_mb": stats["peak_rss_mb"],
            "fit_s": h["fit_seconds"], "epochs_run": h["epochs_run"], "n_train": m["n_train"],
            "train_images_per_s": h.get("train_images_per_s"),
            "images_per_s_wall": round((m["n_train"] * h["epochs_run"] + n_eval) / stats["seconds"], 1),
            "headline": m["headline"], "synthetic": m["synthetic"],
        }
        print(f"  {stem}: {stats['seconds']:.0f} s wall, peak RSS {stats['peak_rss_mb']:.0f} MB, "
              f"training {runs[stem]['train_images_per_s']} img/s", flush=True)
    total = sum(r["wall_s"] for r in runs.values())
    peak = max(r["peak_rss_mb"] for r in runs.values())
    result = {"params": params, "source": source, "runs": runs, "total_wall_s": round(total, 1), "peak_rss_mb": peak,
              "budget_s": BUDGET_SECONDS, "budget_rss_mb": BUDGET_RSS_MB,
              "within_budget": total < BUDGET_SECONDS and peak < BUDGET_RSS_MB,
              "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"02+03: {total / 60:.1f} min (budget {BUDGET_SECONDS / 60:.0f}), peak RSS {peak / 1024:.2f} GB "
          f"(budget {BUDGET_RSS_MB / 1024:.0f})")
    return result


# --------------------------------------------------------------------------- figure
def draw(data: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    f = data.get("features")
    if f:
        import numpy as np

        axes[0].bar(["bare predict", "lib.image.features"], [np.median(f["bare_predict_img_s"]),
                                                        np.median(f["lib_features_img_s"])], color=["grey", "C0"])
        axes[0].set(ylabel="images / s (median of repeats)",
                    title=f"Features, {f['n_images']} images at {f['image_size']} px\nratio {f['ratio_median']:.2f} "
                          f"(target {f['target_ratio']})")
    nbk = data.get("notebooks")
    if nbk:
        names = list(nbk["runs"])
        axes[1].bar(names, [nbk["runs"][k]["wall_s"] / 60 for k in names], color="C1")
        axes[1].axhline(nbk["budget_s"] / 60, ls="--", c="k", lw=1, label="budget 02+03")
        shown = ", ".join(f"{k}={v}" for k, v in nbk["params"].items())
        axes[1].set(ylabel="minutes", title=f"Wall time, total {nbk['total_wall_s'] / 60:.1f} min\n({shown})")
        axes[1].legend(fontsize=8)
        axes[2].bar(names, [nbk["runs"][k]["peak_rss_mb"] / 1024 for k in names], color="C2")
        axes[2].axhline(nbk["budget_rss_mb"] / 1024, ls="--", c="k", lw=1, label="budget")
        axes[2].set(ylabel="GB", title=f"Peak RSS of the kernel\nmax {nbk['peak_rss_mb'] / 1024:.2f} GB")
        axes[2].legend(fontsize=8)
        for ax in axes[1:]:
            ax.tick_params(axis="x", labelsize=8)
    for ax in axes:
        if not ax.has_data():
            ax.set_axis_off()
    fig.suptitle("Image branch benchmarks" + (" (synthetic stand-in data)" if (f or {}).get("synthetic", True) else ""))
    fig.tight_layout()
    plots.save_png(fig, FIGURE, dpi=100)
    return FIGURE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("features", help="lib.image.features throughput vs bare model.predict")
    f.add_argument("--n-images", type=int, default=256)
    f.add_argument("--image-size", type=int, default=224)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--backbone", default="efficientnet_lite0")
    f.add_argument("--weights", default="imagenet")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--data-source", default="auto")
    f.add_argument("--seed", type=int, default=42)
    n = sub.add_parser("notebooks", help="papermill 02 and 03: wall time, peak RSS, images/s")
    n.add_argument("--profile", default="full")
    n.add_argument("--param", action="append", help="extra notebook parameter, key=value (Python literal)")
    n.add_argument("--from-build", default=None, help="a build folder whose pipeline already ran 02 and 03: record those")
    args = ap.parse_args(argv)
    if getattr(args, "weights", None) == "None":
        args.weights = None
    result = bench_features(args) if args.mode == "features" else bench_notebooks(args)
    data = _update(args.mode, result)
    print(f"wrote {RESULTS} and {draw(data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
