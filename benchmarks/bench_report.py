#!/usr/bin/env python3
"""Benchmark of the whole report build (a target, not a unit test).

Clones the committed HEAD into a fresh folder, then times ``make report PROFILE=<profile>``
there from nothing: virtual-environment install (from the package cache), every notebook,
the render. Records the total, the install, each notebook's wall time and its kernel's peak
RSS (from the pipeline's own ``pipeline.json``) into ``build/benchmarks/report_<profile>.json``
and a bar chart ``report_<profile>.png``.

Targets (2-core CPU): smoke under 10 minutes including install; full under 30 minutes including
install, with every notebook's kernel under 5 GB peak RSS (so an 8 GB laptop runs the full report).

    .venv/bin/python benchmarks/bench_report.py --profile smoke [--keep] [--data-dir D]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from lib import config, plots
from lib.atomic import read_json, write_json

TARGET_SECONDS = {"smoke": 10 * 60, "full": 30 * 60}
TARGET_PEAK_RSS_MB = 5000


def run(cmd, cwd, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True)
    return time.perf_counter() - t0


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nbs = result["notebooks"]
    names = ["install"] + list(nbs) + ["render"]
    secs = [result["install_seconds"]] + [nbs[n]["seconds"] for n in nbs] + [result["render_seconds"]]
    rss = [0] + [nbs[n]["peak_rss_mb"] for n in nbs] + [0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].barh(names, secs, color="#2e86c1")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("seconds")
    axes[0].set_title(f"make report PROFILE={result['profile']}: {result['total_seconds'] / 60:.1f} min "
                      f"(target {result['target_seconds'] / 60:.0f})")
    axes[1].axvline(result.get("target_peak_rss_mb", TARGET_PEAK_RSS_MB), color="#c0392b", ls="--", lw=1)
    axes[1].barh(names, rss, color="#8e44ad")
    axes[1].invert_yaxis()
    axes[1].set_xlabel("kernel peak RSS (MB)")
    axes[1].set_yticklabels([])
    fig.tight_layout()
    plots.save_png(fig, path, dpi=100, close=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke", choices=sorted(config.PROFILES))
    ap.add_argument("--data-dir", default=None, help="passed on as DATA= (default: $CERVICAL_KIT_DATA)")
    ap.add_argument("--keep", action="store_true", help="keep the fresh clone for inspection")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_report."))
    clone = work / "kit"
    env = dict(os.environ)
    for var in (config.ENV_BUILD, config.ENV_CACHE, config.ENV_FIGURES):
        env.pop(var, None)  # the clone uses its own build/, .cache/ and figures/
    data = ["DATA=" + str(Path(args.data_dir).resolve())] if args.data_dir else []
    try:
        subprocess.run(["git", "clone", "-q", str(config.ROOT), str(clone)], check=True)
        t_start = time.perf_counter()
        install = run(["make", "venv"], clone, env)
        notebooks = run(["make", "notebooks", f"PROFILE={args.profile}", *data], clone, env)
        render = run(["make", "site", f"PROFILE={args.profile}"], clone, env)
        total = time.perf_counter() - t_start
        record = read_json(clone / "build" / args.profile / "pipeline.json")
        result = {
            "profile": args.profile,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "total_seconds": round(total, 1),
            "install_seconds": round(install, 1),
            "notebooks_seconds": round(notebooks, 1),
            "render_seconds": round(render, 1),
            "notebooks": record["notebooks"],
            "peak_rss_mb": max(n["peak_rss_mb"] for n in record["notebooks"].values()),
            "target_seconds": TARGET_SECONDS[args.profile],
            "target_peak_rss_mb": TARGET_PEAK_RSS_MB,
        }
        result["meets_target"] = total <= result["target_seconds"] and result["peak_rss_mb"] <= TARGET_PEAK_RSS_MB
        out = config.build_dir() / "benchmarks"
        write_json(out / f"report_{args.profile}.json", result)
        figure(result, out / f"report_{args.profile}.png")
        print(f"make report PROFILE={args.profile} from a fresh clone: {total / 60:.1f} min "
              f"(install {install:.0f} s, notebooks {notebooks:.0f} s, render {render:.0f} s); "
              f"peak kernel RSS {result['peak_rss_mb']:.0f} MB; target {'met' if result['meets_target'] else 'MISSED'}")
    finally:
        if args.keep:
            print(f"fresh clone kept at {clone}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
