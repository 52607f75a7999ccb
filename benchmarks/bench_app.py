#!/usr/bin/env python3
"""Benchmark of the local web app (lib.serve.app): start-up, per-request latency, peak memory.

For each image size (64 px: the smoke profile; 224 px: the full profile) it serves a run in its own app
process on 127.0.0.1 and measures, through ``gradio_client`` (upload + preprocessing + model + Grad-CAM +
the overlay PNG, as a browser user waits for it):

* start-up: process start to the first answered request (TensorFlow import, model loading, first call);
* p50 / p95 latency over ``--requests`` requests of the image-only path and of the fused path;
* the app process's peak resident memory (``VmHWM``).

It serves the finished run of that profile when one exists at that size, else it builds a run of the
kit's real architecture (EfficientNet-Lite0 image branch, untrained weights: latency does not depend on
them; fused head on the real UCI preprocessor) in a temporary build folder.  Writes
``build/benchmarks/app.json`` and ``app.png``.  Target (2-core CPU): p50 under 1 s with Grad-CAM at 224 px.

    .venv/bin/python benchmarks/bench_app.py [--requests 50] [--sizes 64 224]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lib import config, plots
from lib.atomic import write_json

PROFILE_OF_SIZE = {64: "smoke", 224: "full"}
TARGET_P50_224 = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def existing_run(profile: str, size: int) -> bool:
    """A finished run of ``profile`` whose image branch takes ``size`` px (read from its model card)."""
    from lib.serve import app

    f = app.run_files(profile)
    if f.missing():
        return False
    return int(json.loads(f.card.read_text()).get("image_size", -1)) == size


def build_run(build: Path, profile: str, size: int) -> None:
    """``build/<profile>/models`` with the kit's architecture at ``size`` px (untrained)."""
    from lib.data import uci
    from lib.data.manifest import ABNORMAL, CLASSES
    from lib.fusion import hybrid
    from lib.tabular import mlp
    from lib.image import image_model

    models = build / profile / "models"
    models.mkdir(parents=True, exist_ok=True)
    branch = image_model.build_image_classifier(len(CLASSES), "efficientnet_lite0", size, weights=None)
    image_model.save_model(branch, models / hybrid.IMAGE_BRANCH_FILE)
    data = uci.load_uci()
    split = np.where(np.arange(len(data.frame)) % 10 < 7, "train", "test")
    pre, _, _ = mlp.fit_preprocessor(data, split)
    model = hybrid.assemble(branch, hybrid.build_head("fused", pre.n_features_out))
    card = {"name": hybrid.MODEL_NAME, "threshold": 0.5, "synthetic": True, "image_classes": list(CLASSES),
            "abnormal_classes": list(ABNORMAL), "image_size": size, "profile": profile,
            "note": "benchmark run: untrained weights"}
    hybrid.save_hybrid(model, models, preprocessor=pre, card=card)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_image() -> Path:
    """A real photograph (scikit-learn's bundled 427x640 JPEG): decoding and resizing are part of a request."""
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"


def form_values(build: Path, profile: str) -> list:
    from lib.tabular import mlp

    pre = mlp.load_preprocessor(build / profile / "models" / "hybrid_tabular_preprocessor.json")
    ranges = pre.metadata.get("feature_ranges", {})
    given = {"Age": "35", "Num of pregnancies": "2", "Smokes": "no", "Number of sexual partners": "3"}
    return [given.get(c, "unknown" if ranges.get(c, {}).get("binary") else "") for c in pre.columns]


def measure(size: int, n: int, tmp: Path) -> dict:
    from gradio_client import Client, handle_file

    profile = PROFILE_OF_SIZE[size]
    env = dict(os.environ)
    if existing_run(profile, size):
        build, source = config.build_dir(), f"finished run build/{profile}/"
    else:
        build, source = tmp / f"build_{size}", "built here: EfficientNet-Lite0 branch + fused head, untrained"
        t0 = time.perf_counter()
        build_run(build, profile, size)
        print(f"{size} px: built a run in {time.perf_counter() - t0:.1f} s", flush=True)
    env["CERVICAL_KIT_BUILD"] = str(build)
    port = free_port()
    t0 = time.perf_counter()
    log = open(tmp / f"app_{size}.log", "w+")  # a file, not a pipe: an undrained pipe would block the app
    proc = subprocess.Popen([sys.executable, "-m", "lib.serve.app", "--profile", profile, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}/"
    image = handle_file(str(test_image()))
    try:
        client = None
        while client is None:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the app exited with {proc.returncode}: {log.read()[-2000:]}")
            try:
                client = Client(url, verbose=False)
            except Exception:
                time.sleep(0.2)
        first = client.predict(image, api_name="/image_only")
        startup = time.perf_counter() - t0
        assert "error" not in first[5], first[5]
        values = form_values(build, profile)
        lat = {}
        for path, args in (("image_only", [image]), ("fused", [image] + values)):
            client.predict(*args, api_name=f"/{path}")  # one warm-up call per path (Grad-CAM graph of that model)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                r = client.predict(*args, api_name=f"/{path}")
                times.append(time.perf_counter() - t)
                assert "error" not in r[5] and r[4], r[5]
            lat[path] = {"p50_s": float(np.percentile(times, 50)), "p95_s": float(np.percentile(times, 95)),
                         "mean_s": float(np.mean(times)), "n": n}
            print(f"{size} px {path}: p50 {lat[path]['p50_s']:.3f} s, p95 {lat[path]['p95_s']:.3f} s", flush=True)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    print(f"{size} px: start-up to first response {startup:.1f} s, peak RSS {rss:.0f} MB", flush=True)
    return {"image_size": size, "profile": profile, "run": source, "startup_to_first_response_s": startup,
            "peak_rss_mb": rss, "latency": lat}


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels, p50, p95 = [], [], []
    for r in runs:
        for k, v in r["latency"].items():
            labels.append(f"{r['image_size']} px\n{k.replace('_', '-')}")
            p50.append(v["p50_s"])
            p95.append(v["p95_s"])
    x = np.arange(len(labels))
    axes[0].bar(x - 0.2, p50, 0.4, label="p50", color="#2e86c1")
    axes[0].bar(x + 0.2, p95, 0.4, label="p95", color="#85c1e9")
    axes[0].axhline(TARGET_P50_224, color="#c0392b", ls="--", lw=1, label="target p50 at 224 px")
    axes[0].set_xticks(x, labels)
    axes[0].set_ylabel("seconds per request")
    axes[0].set_title(f"latency incl. Grad-CAM ({runs[0]['latency']['image_only']['n']} requests each)")
    axes[0].legend(fontsize=8)
    sizes = [f"{r['image_size']} px" for r in runs]
    axes[1].bar(sizes, [r["startup_to_first_response_s"] for r in runs], color="#27ae60")
    axes[1].set_ylabel("seconds")
    axes[1].set_title("start-up to first response")
    axes[2].bar(sizes, [r["peak_rss_mb"] for r in runs], color="#8e44ad")
    axes[2].set_ylabel("MB")
    axes[2].set_title("app process peak RSS")
    fig.suptitle(f"make app on {result['machine']['cpus']} CPU(s)", fontsize=10)
    fig.tight_layout()
    plots.save_png(fig, path, dpi=100, close=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224], choices=sorted(PROFILE_OF_SIZE))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_app_") as tmp:
        runs = [measure(s, args.requests, Path(tmp)) for s in args.sizes]
    result = {"benchmark": "app", "runs": runs, "target_p50_224_s": TARGET_P50_224,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    out = config.build_dir() / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "app.json", result)
    figure(result, out / "app.png")
    print(f"wrote {out / 'app.json'} and {out / 'app.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
