"""The notebook pipeline behind ``make report``: papermill runs the numbered notebooks in
order, with one profile, into ``build/<profile>/notebooks/``.

Why it looks like this:
- source notebooks stay clean; executed copies are build outputs;
- it stops at the first failing notebook and says which cell failed, keeping the
  previous good executed copy (outputs are replaced atomically);
- a rerun skips a notebook whose inputs did not change (its source, ``lib/``, the
  parameters, the data folder, and every notebook before it), so a report rebuild
  after a prose fix in notebook 06 does not retrain notebook 03;
- wall time and peak memory of each notebook's kernel are recorded in
  ``build/<profile>/pipeline.json`` for the benchmarks.

Usage: ``python -m lib.report.pipeline --profile smoke [--data-dir D] [--force] [--only 01_eda]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from lib import config
from lib.atomic import atomic_path, read_json, write_json

NOTEBOOKS_DIR = config.ROOT / "notebooks"
# modules that build the report around the notebooks; editing them must not retrain anything
REPORT_ONLY_MODULES = {"pipeline", "site", "browser_check"}


def notebook_paths(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks (``01_eda.ipynb`` ...) in the order they must run."""
    paths = sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) found in {notebooks_dir}")
    return paths


def executed_dir(profile: str, build=None) -> Path:
    d = config.run_dir(profile, build) / "notebooks"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _data_fingerprint(data_dir) -> str:
    """Cheap fingerprint of the data a run sees: the root, the UCI file's size/mtime and
    the top of the SIPaKMeD folder (a new download changes it)."""
    root = config.data_root(data_dir)
    parts = [str(root)]
    uci = config.uci_csv_path(data_dir)
    if uci.exists():
        st = uci.stat()
        parts.append(f"uci:{st.st_size}:{int(st.st_mtime)}")
    sip = config.sipakmed_dir(data_dir)
    if sip.is_dir():
        for p in sorted(sip.iterdir()):
            parts.append(f"sip:{p.name}:{int(p.stat().st_mtime)}")
    return "|".join(parts)


def fingerprint(notebook: Path, params: dict, upstream: str, data_dir=None) -> str:
    """Hash of everything a notebook's results depend on."""
    h = hashlib.sha256()
    h.update(Path(notebook).read_bytes())
    for py in sorted((config.ROOT / "lib").rglob("*.py")) + sorted((config.ROOT / "lib").rglob("*.json")):
        if py.stem in REPORT_ONLY_MODULES:
            continue
        h.update(py.relative_to(config.ROOT).as_posix().encode())
        h.update(py.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(upstream.encode())
    h.update(_data_fingerprint(data_dir).encode())
    return h.hexdigest()


class _PeakRSS:
    """Polls the resident memory of this process's children (the Jupyter kernel) and keeps the peak."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            try:
                for child in me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the failing cell."""


def run_notebook(notebook: Path, output: Path, params: dict) -> dict:
    """Execute one notebook with papermill into ``output`` (atomically).

    On failure the partial copy is kept in ``build/<profile>/failed/`` for inspection and :class:`NotebookFailed` names the cell; the earlier good copy stays.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    t0 = time.perf_counter()
    with _PeakRSS() as mem:
        with atomic_path(output) as tmp:
            try:
                pm.execute_notebook(str(notebook), str(tmp), parameters=params, cwd=str(notebook.parent),
                                    kernel_name="python3", progress_bar=sys.stderr.isatty(), log_output=False)
            except PapermillExecutionError as err:
                failed = output.parent.parent / "failed" / output.name
                failed.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, failed)
                raise NotebookFailed(
                    f"{notebook.name} failed at cell {err.cell_index} (In [{err.exec_count}]), "
                    f"which starts {err.source.strip().splitlines()[0][:60]!r}: "
                    f"{err.ename}: {err.evalue}\n  executed copy with the traceback: {failed}"
                ) from None
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(mem.peak / 2**20, 1)}


def run_pipeline(profile: str = "full", data_dir=None, force: bool = False, only=None, build=None,
                 notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    """Run every numbered notebook in order; skip the up-to-date ones. Returns the run record."""
    config.run_params(profile)  # validates the profile name
    out_dir = executed_dir(profile, build)
    record_path = config.run_dir(profile, build) / "pipeline.json"
    record = read_json(record_path) if record_path.exists() else {}
    record.setdefault("notebooks", {})
    params = {"profile": profile}
    if data_dir is not None:
        params["data_dir"] = str(Path(data_dir).resolve())
    paths = notebook_paths(notebooks_dir)
    if only:
        wanted = {o.removesuffix(".ipynb") for o in only}
        unknown = wanted - {p.stem for p in paths}
        if unknown:
            raise ValueError(f"--only: unknown notebook(s) {sorted(unknown)}; have {[p.stem for p in paths]}")
    upstream = ""
    t_all = time.perf_counter()
    for i, nb in enumerate(paths, 1):
        fp = fingerprint(nb, params, upstream, data_dir)
        output = out_dir / nb.name
        stamp = output.with_suffix(".stamp.json")
        skip = (only and nb.stem not in wanted) or (
            not force and output.exists() and stamp.exists() and read_json(stamp).get("fingerprint") == fp)
        if skip:
            print(f"[{i}/{len(paths)}] {nb.name}: up to date, skipped", flush=True)
        else:
            print(f"[{i}/{len(paths)}] {nb.name}: running (profile={profile}) ...", flush=True)
            stats = run_notebook(nb, output, params)
            write_json(stamp, {"fingerprint": fp, **stats})
            record["notebooks"][nb.stem] = stats
            print(f"[{i}/{len(paths)}] {nb.name}: done in {stats['seconds']} s, kernel peak RSS "
                  f"{stats['peak_rss_mb']:.0f} MB", flush=True)
        upstream = fp
    record["profile"] = profile
    record["last_run_seconds"] = round(time.perf_counter() - t_all, 1)
    write_json(record_path, record)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.report.pipeline", description="Run the kit's notebooks with papermill.")
    ap.add_argument("--profile", default="full", choices=sorted(config.PROFILES))
    ap.add_argument("--data-dir", default=None, help="folder with uci/ and sipakmed/ (default: $CERVICAL_KIT_DATA or data/)")
    ap.add_argument("--force", action="store_true", help="rerun notebooks even if their inputs did not change")
    ap.add_argument("--only", nargs="*", help="run only these notebooks (by stem, e.g. 01_eda)")
    args = ap.parse_args(argv)
    try:
        run_pipeline(args.profile, args.data_dir, args.force, args.only)
    except (NotebookFailed, FileNotFoundError, ValueError) as err:
        print(f"pipeline stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
