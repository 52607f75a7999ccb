#!/usr/bin/env python3
"""Benchmark: peak memory of the cached fine-tuning (lib.image.cached_finetune) by stage and cut.

Why: notebook 03's kernel once peaked at 5.4 GB on small crops fine-tuned ``"deep"`` (cut at block 3a),
and the stage that did it was not the training step but the head-only stage's scoring of the frozen
features (:func:`cached_finetune.pooled_features`), called eagerly in batches of 256; the kit now
runs it as one traced ``tf.function``.  This measures, in a fresh
process per configuration (so each peak is its own), the kernel's high-water mark (``VmHWM``) after:

* ``built``: the recipe's model built (untrained weights: memory does not depend on them);
* ``pooled``: the frozen top blocks scored every cached view (what the head-only stage starts with);
* ``fine-tuned``: one epoch of fine-tuning the top blocks on the cached views.

for each fine-tuning depth of :data:`lib.image.image_model.FINE_TUNE_DEPTHS`, the kit's traced call against
the old eager calls (same batches of 256) as the baseline measured in the same run.  The cached activations are
random arrays of the cut's shape (``--views`` x ``--images``): no image data is needed.  Writes
``build/benchmarks/finetune_memory.json`` and ``.png``.

    .venv/bin/python benchmarks/bench_finetune_memory.py [--image-size 128] [--images 320] [--views 6]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from lib import config, plots
from lib.atomic import write_json

BATCH = 32  # the recipe's training batch
MODES = ("eager", "graph")  # the old way (baseline), the kit's


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def one(depth: str, mode: str, image_size: int, n: int, views: int) -> dict:
    """One configuration, in this process: the high-water mark after each stage (MB) and the stage times."""
    import time

    import numpy as np
    import pandas as pd

    from lib.image import cached_finetune, image_model

    spec = image_model.FINE_TUNE_DEPTHS[depth]
    y = np.arange(n) % 4
    rec = image_model.regularized_recipe(4, image_size=image_size, weights=None, train_labels=y, linear_probe_epochs=0,
                                         unfreeze_from=spec["unfreeze_from"], lr=spec["lr"],
                                         patience=spec.get("patience", 3))
    _, bottom, _, cut = cached_finetune.split_model(rec.model)
    shape = tuple(int(s) for s in bottom.output.shape[1:])
    rng = np.random.default_rng(0)
    acts = {"train": rng.standard_normal((views, n) + shape, dtype=np.float32),
            "val": rng.standard_normal((n // 5,) + shape, dtype=np.float32),
            "cut_layer": cut, "views": views, "cache_seconds": 0.0}
    out = {"depth": depth, "mode": mode, "cut_layer": cut, "cut_shape": list(shape),
           "cache_mb": round((acts["train"].nbytes + acts["val"].nbytes) / 2**20, 1), "peak_mb": {}, "seconds": {}}
    out["peak_mb"]["built"] = round(_hwm_mb(), 1)
    t = time.perf_counter()
    if mode == "graph":
        cached_finetune.pooled_features(rec.model, acts["train"])
    else:  # the baseline: what pooled_features did before, eager calls on batches of 256
        import keras

        pool = keras.Model(rec.model.get_layer(cut).input, rec.model.get_layer("avg_pool").output)
        flat = acts["train"].reshape((-1,) + shape)
        np.concatenate([np.asarray(pool(flat[i:i + 256], training=False)) for i in range(0, len(flat), 256)])
    out["seconds"]["pooled"] = round(time.perf_counter() - t, 2)
    out["peak_mb"]["pooled"] = round(_hwm_mb(), 1)
    t = time.perf_counter()
    cached_finetune.fit_top(rec, pd.DataFrame({"label_idx": y}), pd.DataFrame({"label_idx": np.arange(n // 5) % 4}),
                            image_size, BATCH, 1, views=views, log=False, progress=False, activations=acts)
    out["seconds"]["fine-tuned"] = round(time.perf_counter() - t, 2)
    out["peak_mb"]["fine-tuned"] = round(_hwm_mb(), 1)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["built", "pooled", "fine-tuned"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [s + (i - (len(rows) - 1) / 2) * width for s in range(len(stages))]
        label = f"{r['depth']} (cut {r['cut_layer'].split('_')[0]}), " + (
            "traced tf.function (kit)" if r["mode"] == "graph" else "eager calls (old)")
        ax.bar(xs, [r["peak_mb"][s] for s in stages], width, label=label)
    ax.set_xticks(range(len(stages)), ["model built", "frozen features pooled", "one fine-tuning epoch"])
    ax.set_ylabel("process peak RSS so far (MB)")
    ax.set_title("Cached fine-tuning: peak memory by stage (fresh process each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save_png(fig, path, dpi=110, close=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=128, help="px (128: what small crops run at)")
    ap.add_argument("--images", type=int, default=320, help="training images (cached views are random arrays)")
    ap.add_argument("--views", type=int, default=6, help="augmented views per image")
    ap.add_argument("--one", nargs=2, metavar=("DEPTH", "MODE"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.image_size, args.images, args.views)))
        return 0
    from lib.image.image_model import FINE_TUNE_DEPTHS

    rows = []
    for depth in FINE_TUNE_DEPTHS:
        for mode in MODES:
            print(f"{depth}, {mode} ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", depth, mode, "--image-size",
                                   str(args.image_size), "--images", str(args.images), "--views", str(args.views)],
                                  capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"configuration {depth}/{mode} failed (exit {proc.returncode})")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  peak MB {rows[-1]['peak_mb']}, seconds {rows[-1]['seconds']}", flush=True)
    row = {(r["depth"], r["mode"]): r for r in rows}
    saving = {d: round(row[d, "eager"]["peak_mb"]["pooled"] - row[d, "graph"]["peak_mb"]["pooled"], 1)
              for d in FINE_TUNE_DEPTHS}
    out_dir = config.ROOT / "build" / "benchmarks"
    record = {"image_size": args.image_size, "images": args.images, "views": args.views,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "rows": rows, "pooled_peak_saving_mb": saving}
    write_json(out_dir / "finetune_memory.json", record)
    plot(rows, out_dir / "finetune_memory.png")
    print(f"peak saved at the pooled stage, traced vs eager (MB): {saving}")
    print(f"wrote {(out_dir / 'finetune_memory.json').relative_to(config.ROOT)} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
