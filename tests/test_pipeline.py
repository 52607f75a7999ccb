"""lib.report.pipeline runs real notebooks with papermill; lib.report.site renders them; tools/nbclean keeps sources clean."""
import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from lib import config
from lib.report import pipeline, site

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


def test_site_renders_with_nbconvert(nbdir, tmp_path, monkeypatch):
    """Stage executed notebooks, then build the fallback site; the banner appears for synthetic results."""
    build = tmp_path / "build"
    monkeypatch.setenv(config.ENV_BUILD, str(build))
    monkeypatch.setattr(site, "STAGE", build / "report")
    pipeline.run_pipeline("smoke", notebooks_dir=nbdir, build=build)
    from lib.atomic import write_json

    write_json(config.metrics_dir("smoke") / "01_first.json",
               {"notebook": "01_first", "synthetic": True, "headline": {"accuracy": 0.5}})
    staged = site.stage("smoke")
    assert [p.name for p in staged] == ["01_first.ipynb", "02_second.ipynb"]
    first = json.loads(staged[0].read_text())
    assert "SYNTHETIC DATA" in "".join(first["cells"][1]["source"])
    assert "SYNTHETIC DATA" not in json.dumps(json.loads(staged[1].read_text()))
    head = (build / "report" / "_headline.md").read_text()
    assert "| 01_first | synthetic stand-in | accuracy | 0.500 |" in head  # no curated list: first keys shown
    write_json(config.metrics_dir("smoke") / "03_image_branch.json",
               {"synthetic": False, "headline": {"macro_f1": 0.9751, "noise": 1.0}})
    head = site.headline_markdown("smoke")
    assert "| 03_image_branch | real | macro-F1, 5 classes (test) | 0.975 |" in head and "noise" not in head
    out = tmp_path / "site"
    out.mkdir()
    site.render_nbconvert(staged, out)
    names = sorted(p.name for p in out.glob("*.html"))
    assert names == ["01_first.html", "02_second.html", "data_provenance.html", "index.html", "model_card.html"]
    assert "rendered with nbconvert" in (out / "index.html").read_text()


def test_rendered_pages_show_a_progress_bar_once_not_every_redraw():
    outs = [{"output_type": "stream", "name": "stderr", "text": ["\r", "views 0%|  | 0/9"]},
            {"output_type": "stream", "name": "stderr", "text": "\rviews 50%|# | 4/9\rviews 100%|##| 9/9\n"},
            {"output_type": "stream", "name": "stdout", "text": "epoch 1/2\r\nepoch 2/2\n"},
            {"output_type": "display_data", "data": {"text/plain": "x"}, "metadata": {}}]
    got = site.collapse_progress(outs)
    assert [o["output_type"] for o in got] == ["stream", "stream", "display_data"]
    assert got[0]["text"] == "views 100%|##| 9/9\n"
    assert got[1]["text"] == "epoch 1/2\nepoch 2/2\n"  # Windows line ends are not redraws
    assert got[2] == outs[3] and outs[0]["text"] == ["\r", "views 0%|  | 0/9"]  # input untouched
