"""lib.report.pipeline runs real notebooks with papermill; tools/nbclean keeps sources clean (the site: test_site.py)."""
import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from lib import config
from lib.report import pipeline

ROOT = config.ROOT


def _nb(path, code_cells, title="# Demo"):
    nb = new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nb.cells.append(new_markdown_cell(title))
    params = new_code_cell('profile = "smoke"\nvalue = 1')
    params.metadata["tags"] = ["parameters"]
    nb.cells.append(params)
    nb.cells += [new_code_cell(c) for c in code_cells]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    _nb(d / "01_first.ipynb", ["print('first', profile, value)"])
    _nb(d / "02_second.ipynb", ["print('second')"])
    return d


def test_pipeline_runs_in_order_and_skips_unchanged(nbdir, tmp_path, capsys):
    build = tmp_path / "build"
    rec = pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    out = build / "smoke" / "notebooks"
    executed = json.loads((out / "01_first.ipynb").read_text())
    texts = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert "first smoke 1" in texts  # papermill injected the profile
    assert set(rec["notebooks"]) == {"01_first", "02_second"}
    assert rec["notebooks"]["01_first"]["peak_rss_mb"] > 10  # the kernel was measured
    capsys.readouterr()
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    assert capsys.readouterr().out.count("up to date, skipped") == 2
    # changing the first notebook reruns it and everything after it
    _nb(nbdir / "01_first.ipynb", ["print('first v2')"])
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    assert capsys.readouterr().out.count("running") == 2


def test_pipeline_failure_names_cell_and_keeps_previous_output(nbdir, tmp_path):
    build = tmp_path / "build"
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    good = (build / "smoke" / "notebooks" / "02_second.ipynb").read_text()
    _nb(nbdir / "02_second.ipynb", ["x = 1", "raise ValueError('column Biopsy missing')"])
    with pytest.raises(pipeline.NotebookFailed, match=r"02_second.ipynb failed at cell 4 \(In \[4\]\).*raise ValueError.*ValueError: column Biopsy"):
        pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    assert (build / "smoke" / "notebooks" / "02_second.ipynb").read_text() == good
    assert (build / "smoke" / "failed" / "02_second.ipynb").exists()


def test_pipeline_rejects_unknown_profile_and_only(nbdir, tmp_path):
    with pytest.raises(ValueError, match="profile"):
        pipeline.run_pipeline("huge", notebooks_dir=nbdir, build=tmp_path)
    with pytest.raises(ValueError, match="unknown notebook"):
        pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=tmp_path, only=["09_nope"])


def test_fingerprint_changes_with_params(nbdir):
    nb = nbdir / "01_first.ipynb"
    assert pipeline.fingerprint(nb, {"profile": "smoke"}, "") != pipeline.fingerprint(nb, {"profile": "full"}, "")
    assert pipeline.fingerprint(nb, {"profile": "smoke"}, "") == pipeline.fingerprint(nb, {"profile": "smoke"}, "")


def test_nbclean_strips_outputs_keeps_tags(tmp_path):
    path = _nb(tmp_path / "01_x.ipynb", ["print(1)"])
    nb = json.loads(path.read_text())
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    nb["cells"][2]["execution_count"] = 5
    nb["cells"][1]["metadata"]["papermill"] = {"duration": 0.1}
    path.write_text(json.dumps(nb))
    tool = [sys.executable, str(ROOT / "tools" / "nbclean.py")]
    assert subprocess.run(tool + ["--check", str(path)], capture_output=True).returncode == 1
    assert subprocess.run(tool + [str(path)], capture_output=True).returncode == 0
    clean = json.loads(path.read_text())
    assert clean["cells"][2]["outputs"] == [] and clean["cells"][2]["execution_count"] is None
    assert clean["cells"][1]["metadata"] == {"tags": ["parameters"]}
    assert subprocess.run(tool + ["--check", str(path)], capture_output=True).returncode == 0


def test_committed_notebooks_are_clean():
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs, "no notebooks found"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "nbclean.py"), "--check", *map(str, nbs)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# --- one run per build folder, no half-updated results, no temporary files, one-line errors ---------------------

_WRITE = '''from pathlib import Path
from lib import config
def write(sub, name, text):
    d = config.run_dir(profile) / sub
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)
'''


def _listing(root):
    """Every file under ``root`` with its bytes, so "exactly as before" can be compared."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _wait_for(path, timeout=90):
    import time

    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def _results(run):
    return {k: v for k, v in _listing(run).items() if not k.startswith(("notebooks/", "failed/"))
            and k not in ("pipeline.json", ".pipeline.lock")}


def test_failed_notebook_puts_results_back_and_keeps_earlier_successes(tmp_path, capsys, monkeypatch):
    nbdir, build = tmp_path / "notebooks", tmp_path / "build"
    nbdir.mkdir()
    monkeypatch.setenv(config.ENV_BUILD, str(build))
    _nb(nbdir / "01_first.ipynb", [_WRITE, "write('metrics', '01_first.json', '{\"v\": 1}')"])
    _nb(nbdir / "02_second.ipynb", [_WRITE, "write('metrics', '02_second.json', '{\"v\": 1}')",
                                     "write('models', 'branch.keras', 'weights v1')"])
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    run = build / "smoke"
    before = _results(run)
    assert set(before) == {"metrics/01_first.json", "metrics/02_second.json", "models/branch.keras"}
    # 01 changes and succeeds; 02 rewrites its files (one in place, as Keras does), adds new ones, then fails late
    _nb(nbdir / "01_first.ipynb", [_WRITE, "write('metrics', '01_first.json', '{\"v\": 2}')"])
    _nb(nbdir / "02_second.ipynb", [
        _WRITE, "write('metrics', '02_second.json', '{\"v\": 2, \"half\": true}')",
        "with open(config.run_dir(profile) / 'models' / 'branch.keras', 'r+') as f:\n    f.write('WEIGHTS v2')",
        "write('figures', 'cam.png', 'png'); write('models', 'new.h5', 'h5')",
        "raise RuntimeError('late cell failed')"])
    capsys.readouterr()
    with pytest.raises(pipeline.NotebookFailed, match="02_second.ipynb failed at cell 7 .*late cell failed"):
        pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    out = capsys.readouterr().out
    after = _results(run)
    assert after["metrics/01_first.json"] == b'{"v": 2}'  # the earlier notebook of this run succeeded: kept
    after["metrics/01_first.json"] = before["metrics/01_first.json"]
    assert after == before  # 02's rewrites undone, its new files gone
    assert not (run / "figures").exists() and not (run / ".pipeline-snapshot").exists()
    assert "02_second.ipynb: failed; results in" in out and "(2 new files removed, 2 changed files restored)" in out
    assert (run / "failed" / "02_second.ipynb").exists()  # the executed copy with the traceback is kept
    assert json.loads((run / "pipeline.json").read_text())["notebooks"]["01_first"]["seconds"] >= 0


def _pipeline_process(nbdir, build, *args):
    code = ("import sys; from pathlib import Path; from lib.report import pipeline; "
            "pipeline.NOTEBOOKS_DIR = Path(sys.argv[1]); sys.exit(pipeline.main(sys.argv[2:]))")
    env = {**__import__("os").environ, config.ENV_BUILD: str(build), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, str(nbdir), "--profile", "smoke", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _slow_notebook(nbdir):
    """A notebook that writes a result, says it is inside its long cell, and sleeps there."""
    _nb(nbdir / "01_first.ipynb", [_WRITE, "write('metrics', '01_first.json', 'half-written')",
                                    "write('.', 'inside.txt', 'yes')\nimport time\ntime.sleep(120)"])


def test_second_pipeline_on_one_folder_is_refused_and_a_killed_run_blocks_nothing(tmp_path, capsys, monkeypatch):
    import signal

    nbdir, build = tmp_path / "notebooks", tmp_path / "build"
    nbdir.mkdir()
    run = build / "smoke"
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / "01_first.json").write_text("good")
    _slow_notebook(nbdir)
    first = _pipeline_process(nbdir, build)
    try:
        _wait_for(run / "inside.txt")
        with pytest.raises(pipeline.PipelineBusy) as err:
            pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
        assert str(run) in str(err.value) and f"pid {first.pid}" in str(err.value)
        # the same refusal from the command line: one line, exit 1
        monkeypatch.setenv(config.ENV_BUILD, str(build))
        monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", nbdir)
        capsys.readouterr()
        assert pipeline.main(["--profile", "smoke"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"pipeline stopped: {run} is in use by another pipeline (pid {first.pid}); "
                         "wait for it to finish or stop it, then run again"]
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup at all, as when the machine kills it
        first.wait(30)
    temps = list((run / "notebooks").glob(".01_first.ipynb.*.ipynb"))
    assert len(temps) == 1 and (run / "metrics" / "01_first.json").read_text() == "half-written"
    # the lock died with its holder; the next run undoes what the killed one left, then runs
    _nb(nbdir / "01_first.ipynb", ["print('quick')"])
    capsys.readouterr()
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    out = capsys.readouterr().out
    assert "an earlier run stopped inside 01_first.ipynb" in out and "(1 new file removed, 1 changed file restored)" in out
    assert f"removed 1 temporary file(s) left by an earlier run: {temps[0].name}" in out
    assert not temps[0].exists() and not (run / "inside.txt").exists()
    assert (run / "metrics" / "01_first.json").read_text() == "good"
    assert "quick" in (run / "notebooks" / "01_first.ipynb").read_text()


@pytest.mark.parametrize("signame, rc, said", [("SIGINT", 130, "interrupted (Ctrl-C)"),
                                               ("SIGTERM", 143, "stopped by SIGTERM")])
def test_ctrl_c_restores_results_cleans_temp_files_and_says_one_line(tmp_path, signame, rc, said):
    import signal

    nbdir, build = tmp_path / "notebooks", tmp_path / "build"
    nbdir.mkdir()
    run = build / "smoke"
    _slow_notebook(nbdir)
    proc = _pipeline_process(nbdir, build)
    try:
        _wait_for(run / "inside.txt")
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == rc, err
    assert err.strip().splitlines() == [f"pipeline {said} while 01_first.ipynb was running"]
    assert "01_first.ipynb: interrupted; results in" in out and "(2 new files removed" in out
    assert _results(run) == {} and list((run / "notebooks").iterdir()) == []  # no temporary notebook left
    assert not (run / ".pipeline-snapshot").exists()


def test_only_says_not_selected_for_notebooks_it_did_not_check(nbdir, tmp_path, capsys):
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=tmp_path / "build", only=["02_second"])
    out = capsys.readouterr().out
    assert "[1/2] 01_first.ipynb: not selected (--only), not checked" in out
    assert "up to date" not in out and "[2/2] 02_second.ipynb: running" in out
    assert not (tmp_path / "build" / "smoke" / "notebooks" / "01_first.ipynb").exists()


def test_disk_full_while_writing_the_notebook_is_one_line(nbdir, tmp_path, capsys, monkeypatch):
    import papermill

    def full_disk(input_path, output_path, **kw):
        with open(output_path, "w") as f:  # papermill had started writing the output
            f.write("{")
        raise OSError(28, "No space left on device")

    build = tmp_path / "build"
    monkeypatch.setattr(papermill, "execute_notebook", full_disk)
    monkeypatch.setenv(config.ENV_BUILD, str(build))
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", nbdir)
    assert pipeline.main(["--profile", "smoke"]) == 1
    cap = capsys.readouterr()
    assert cap.err == "pipeline stopped: 01_first.ipynb could not be run: OSError: [Errno 28] No space left on device\n"
    assert list((build / "smoke" / "notebooks").iterdir()) == []  # no temporary notebook left behind
    # any other error is one line too (and --traceback gives the whole story to whoever debugs the kit)
    monkeypatch.setattr(pipeline, "notebook_paths", lambda d: (_ for _ in ()).throw(RuntimeError("bad\nthing")))
    assert pipeline.main(["--profile", "smoke"]) == 1
    assert capsys.readouterr().err == "pipeline stopped: RuntimeError: bad thing\n"
    with pytest.raises(RuntimeError):
        pipeline.main(["--profile", "smoke", "--traceback"])


def test_kernel_chatter_stays_out_of_the_log_real_errors_and_tf_quiet_env_do_not(tmp_path, capfd, monkeypatch):
    import os

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv(config.ENV_BUILD, raising=False)
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _nb(nbdir / "01_first.ipynb", ["import os\nprint('env', os.environ.get('TF_CPP_MIN_LOG_LEVEL'), "
                                   "os.environ.get('TF_ENABLE_ONEDNN_OPTS'), os.environ.get('CERVICAL_KIT_BUILD'))\n"
                                   "os.write(2, b'kernel says: a real problem\\n')"])
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=tmp_path / "build")
    err = capfd.readouterr().err
    assert "without encryption" not in err and "kernel says: a real problem" in err
    executed = (tmp_path / "build" / "smoke" / "notebooks" / "01_first.ipynb").read_text()
    # TF quiet in the kernel, oneDNN (speed) left alone, results go to the build folder the pipeline was given
    assert f"env 2 None {tmp_path / 'build'}" in executed
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ  # the pipeline's own environment is untouched
    # the filter itself, on the known chatter lines ("KeyboardInterrupt caught" comes at random shutdowns,
    # the last two from `import tensorflow`)
    log = pipeline._KernelLog()
    r, w = os.pipe()
    log.attach(r)
    os.write(w, b"[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All communication\n"
                b"[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.\nTraceback: a real one\n"
                b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                b"I0000 00:00:1796116243.889113   23345 port.cc:153] oneDNN custom operations are on. You may\n"
                b"E0000 00:00:1796116243.889113   23345 node_def_util.cc:680] a real TF error\n")
    os.close(w)
    log.wait()
    assert capfd.readouterr().err == ("Traceback: a real one\n"
                                      "E0000 00:00:1796116243.889113   23345 node_def_util.cc:680] a real TF error\n")
