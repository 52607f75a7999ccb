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
  ``build/<profile>/pipeline.json`` for the benchmarks;
- one pipeline per build folder (a lock), and a notebook that fails or is interrupted
  leaves the folder's results exactly as they were before it ran (see
  :mod:`lib.report.runguard`);
- the kernel's own start-up and shutdown chatter stays out of the log, its real errors
  do not; every error ends the command with one line, not a traceback.

Usage: ``python -m lib.report.pipeline --profile smoke [--data-dir D] [--force] [--only 01_eda]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from lib import config
from lib.atomic import atomic_path, read_json, write_json
from lib.report.runguard import PipelineBusy, RunLock, Snapshot, clean_temp_files

NOTEBOOKS_DIR = config.ROOT / "notebooks"
# modules that build the report around the notebooks; editing them must not retrain anything
REPORT_ONLY_MODULES = {"pipeline", "runguard", "site", "browser_check"}


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
    """A notebook raised or could not be run; the message names the notebook (and the failing cell)."""


# Lines the kernel process writes to its own stderr that say nothing about the notebook:
# ipykernel warns about its loopback TCP transport at every start, and logs
# "KeyboardInterrupt caught in kernel" when jupyter_client interrupts it at shutdown;
# TensorFlow's import prints two INFO notices before its log level applies (no environment
# variable silences them, short of turning oneDNN off). Warnings and errors pass.
KERNEL_CHATTER = re.compile("|".join([
    r"Kernel is running over TCP without encryption",
    r"KeyboardInterrupt caught in kernel",
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on",
    r"node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool",
    r"generator_dataset_op\.cc:\d+\] Memory patch applied",
]))
# For the kernel's environment only; a value the user has set wins. Level 2 hides TensorFlow's
# C++ INFO/WARNING start-up lines (errors still show). TF_ENABLE_ONEDNN_OPTS is left alone on
# purpose: turning oneDNN off halves CPU speed.
KERNEL_ENV_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2"}


class _KernelLog:
    """Copies the kernel's stderr to ours line by line, without :data:`KERNEL_CHATTER`.

    Muted once the pipeline is stopping: a kernel torn down in the middle of a cell prints
    tracebacks about its closed sockets, which would bury the one line that matters.
    """

    def __init__(self):
        self.muted = threading.Event()
        self._threads: list[threading.Thread] = []

    def attach(self, fd: int) -> None:
        t = threading.Thread(target=self._pump, args=(fd,), daemon=True, name="kernel-stderr")
        t.start()
        self._threads.append(t)

    def _pump(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace")
                if self.muted.is_set() or KERNEL_CHATTER.search(line):
                    continue
                sys.stderr.write(line)
                sys.stderr.flush()

    def wait(self, timeout: float = 3.0) -> None:
        """Let the copies finish (the pipe closes when the kernel exits)."""
        for t in self._threads:
            t.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]


_KERNEL_LOG = _KernelLog()


class QuietKernelManager(AsyncKernelManager):
    """The kernel manager nbclient uses by default, with the kernel's stderr piped through
    :class:`_KernelLog` and :data:`KERNEL_ENV_DEFAULTS` plus ``extra_env`` in its environment."""

    extra_env: dict = {}

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        env = dict(kw.get("env") or os.environ)
        for key, value in KERNEL_ENV_DEFAULTS.items():
            env.setdefault(key, value)
        env.update(self.extra_env)
        kw["env"] = env
        if any("ipykernel" in str(part) for part in kernel_cmd):
            # C-level writes (TensorFlow's C++ start-up notices) go to this process's stderr, which the
            # filter below reads, instead of into the notebook's cells and so onto the report's pages
            kernel_cmd = [*kernel_cmd, "--IPKernelApp.capture_fd_output=False"]
        read_fd, write_fd = os.pipe()
        kw["stderr"] = write_fd
        try:
            await super()._async_launch_kernel(kernel_cmd, **kw)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        _KERNEL_LOG.attach(read_fd)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return text if len(text) <= 400 else text[:397] + "..."


def run_notebook(notebook: Path, output: Path, params: dict, kernel_env: dict | None = None) -> dict:
    """Execute one notebook with papermill into ``output`` (atomically).

    On failure the partial copy is kept in ``build/<profile>/failed/`` for inspection and
    :class:`NotebookFailed` names the cell; the earlier good copy stays. Any other error
    (the kernel died, the disk is full while papermill writes) is a :class:`NotebookFailed`
    naming the notebook, in one line.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    km_class = type("PipelineKernelManager", (QuietKernelManager,), {"extra_env": dict(kernel_env or {})})
    _KERNEL_LOG.muted.clear()
    t0 = time.perf_counter()
    try:
        with _PeakRSS() as mem, atomic_path(output) as tmp:
            try:
                pm.execute_notebook(str(notebook), str(tmp), parameters=params, cwd=str(notebook.parent),
                                    kernel_name="python3", progress_bar=sys.stderr.isatty(), log_output=False,
                                    kernel_manager_class=km_class)
            except PapermillExecutionError as err:
                failed = output.parent.parent / "failed" / output.name
                failed.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o644)  # mkstemp made it 0600; it is meant to be read
                os.replace(tmp, failed)
                first = (err.source.strip().splitlines() or [""])[0][:60]
                raise NotebookFailed(
                    f"{notebook.name} failed at cell {err.cell_index} (In [{err.exec_count}]), "
                    f"which starts {first!r}: {err.ename}: {_one_line(err.evalue)} "
                    f"(executed copy with the traceback: {failed})"
                ) from None
    except NotebookFailed:
        raise
    except Exception as err:
        raise NotebookFailed(f"{notebook.name} could not be run: {type(err).__name__}: {_one_line(err)}") from err
    finally:
        _KERNEL_LOG.wait()
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(mem.peak / 2**20, 1)}


def _recover(run: Path, out_dir: Path) -> None:
    """Undo what a killed run left: results half-written by the notebook it died in, temporary files."""
    snap = Snapshot.leftover(run)
    if snap is not None:
        notebook, what = snap.notebook, snap.restore()
        print(f"{run}: an earlier run stopped inside {notebook}; its results were put back as before "
              f"that notebook ({what})", flush=True)
    gone = clean_temp_files(out_dir, run, run / "failed")
    if gone:
        print(f"{run}: removed {len(gone)} temporary file(s) left by an earlier run: {', '.join(gone)}", flush=True)


def run_pipeline(profile: str = "full", data_dir=None, force: bool = False, only=None, build=None,
                 notebooks_dir=None, data_source=None, dataset=None, abnormal_classes=None,
                 group_pattern=None) -> dict:
    """Run every numbered notebook in order; skip the up-to-date ones. Returns the run record.

    Holds the run folder's lock throughout (:class:`PipelineBusy` if another pipeline has it).
    A notebook that fails or is interrupted leaves the folder's results as they were before it
    ran; results of the notebooks that succeeded before it stay.
    """
    config.run_params(profile)  # validates the profile name
    run = config.run_dir(profile, build)
    params = {"profile": profile}
    if data_dir is not None:
        params["data_dir"] = str(Path(data_dir).resolve())
    # the dataset is set once, here, for every notebook; checked now, before any image is decoded
    if any(v is not None for v in (data_source, dataset, abnormal_classes, group_pattern)):
        from lib.run import check_inputs

        resolved = check_inputs(data_dir, data_source or "auto", dataset, abnormal_classes, group_pattern)
        params.update({k: v for k, v in dict(
            data_source=data_source and resolved["data_source"], dataset=dataset,
            abnormal_classes=resolved["abnormal_classes"] if abnormal_classes is not None else None,
            group_pattern=group_pattern).items() if v is not None})
    paths = notebook_paths(NOTEBOOKS_DIR if notebooks_dir is None else notebooks_dir)
    wanted = None
    if only:
        wanted = {o.removesuffix(".ipynb") for o in only}
        unknown = wanted - {p.stem for p in paths}
        if unknown:
            raise ValueError(f"--only: unknown notebook(s) {sorted(unknown)}; have {[p.stem for p in paths]}")
    # the kernel writes models and metrics where this run keeps its executed notebooks
    kernel_env = {config.ENV_BUILD: str(config.build_dir(build))}
    with RunLock(run):
        out_dir = executed_dir(profile, build)
        _recover(run, out_dir)
        record_path = run / "pipeline.json"
        record = read_json(record_path) if record_path.exists() else {}
        record.setdefault("notebooks", {})
        record["profile"] = profile
        upstream = ""
        t_all = time.perf_counter()
        for i, nb in enumerate(paths, 1):
            tag = f"[{i}/{len(paths)}] {nb.name}"
            fp = fingerprint(nb, params, upstream, data_dir)
            upstream = fp
            output = out_dir / nb.name
            stamp = output.with_suffix(".stamp.json")
            if wanted is not None and nb.stem not in wanted:
                print(f"{tag}: not selected (--only), not checked", flush=True)
                continue
            if not force and output.exists() and stamp.exists() and read_json(stamp).get("fingerprint") == fp:
                print(f"{tag}: up to date, skipped", flush=True)
                continue
            print(f"{tag}: running (profile={profile}) ...", flush=True)
            try:
                snap = Snapshot.take(run, nb.name)
            except OSError as err:
                raise NotebookFailed(f"{nb.name} not run: could not copy the results in {run} first "
                                     f"(nothing was changed): {_one_line(err)}") from err
            try:
                stats = run_notebook(nb, output, params, kernel_env)
            except BaseException as err:
                if isinstance(err, KeyboardInterrupt):
                    _KERNEL_LOG.muted.set()
                    err.notebook = nb.name
                what = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                try:
                    print(f"{tag}: {what}; results in {run} put back as before it ran ({snap.restore()})", flush=True)
                except Exception as restore_err:
                    print(f"{tag}: {what}; could not put the results in {run} back ({_one_line(restore_err)}); "
                          f"the next run restores them from {snap.path.name}", flush=True)
                raise
            snap.drop()
            write_json(stamp, {"fingerprint": fp, **stats})
            timings = run / "timings" / f"{nb.stem}.json"  # wall-clock numbers the notebook kept out of its metrics
            if timings.exists():
                stats = {**stats, "inside": read_json(timings)}
            record["notebooks"][nb.stem] = stats
            write_json(record_path, record)  # earlier successes stay recorded if a later notebook fails
            print(f"{tag}: done in {stats['seconds']} s, kernel peak RSS {stats['peak_rss_mb']:.0f} MB", flush=True)
        record["last_run_seconds"] = round(time.perf_counter() - t_all, 1)
        write_json(record_path, record)
    return record


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by :func:`main`'s signal handler. A KeyboardInterrupt, so papermill
    and nbclient let it through and every ``finally`` (temporary files, snapshot) runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signal(signum, frame):
    _KERNEL_LOG.muted.set()
    raise Stopped(signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.report.pipeline", description="Run the kit's notebooks with papermill.")
    ap.add_argument("--profile", default="full", choices=sorted(config.PROFILES))
    ap.add_argument("--data-dir", default=None, help="folder with uci/ and sipakmed/ (default: $CERVICAL_KIT_DATA or data/)")
    ap.add_argument("--force", action="store_true", help="rerun notebooks even if their inputs did not change")
    ap.add_argument("--only", nargs="*", help="run only these notebooks (by stem, e.g. 01_eda)")
    ap.add_argument("--traceback", action="store_true", help="on an error, show the full Python traceback (for debugging the kit)")
    ap.add_argument("--data-source", default=None,
                    help="the images: 'synthetic', 'sipakmed', or a folder-per-class dataset (default: auto)")
    ap.add_argument("--dataset", default=None, help="a dataset preset, e.g. 'lbc' (abnormal classes + group pattern)")
    ap.add_argument("--abnormal-classes", default=None, help="comma-separated positive class folders, e.g. HSIL,LSIL,SCC")
    ap.add_argument("--group-pattern", default=None,
                    help="regex searched in each file stem; its capture names the source image (copies share a group)")
    args = ap.parse_args(argv)
    abnormal = None if args.abnormal_classes is None else [c.strip() for c in args.abnormal_classes.split(",") if c.strip()]
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_stop_signal)
    try:
        run_pipeline(args.profile, args.data_dir, args.force, args.only, data_source=args.data_source,
                     dataset=args.dataset, abnormal_classes=abnormal, group_pattern=args.group_pattern)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        during = f" while {err.notebook} was running" if getattr(err, "notebook", None) else ""
        how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"pipeline {how}{during}", file=sys.stderr)
        return 128 + signum
    except Exception as err:
        if args.traceback:
            raise
        known = isinstance(err, (NotebookFailed, PipelineBusy, FileNotFoundError, ValueError))
        print(f"pipeline stopped: {'' if known else type(err).__name__ + ': '}{_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
