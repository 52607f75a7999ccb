"""Tests of the SIPaKMeD-layout synthetic stand-in (lib.scaffold.synthetic).

Small sets only: the layout tests draw the first 3 cluster images per class
(103 images), the statistics tests render 300 images in memory.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.data import manifest
from lib.scaffold import synthetic as S

K = 3  # cluster images per class for the on-disk tests


def _bmps(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*.bmp")}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "sipakmed"
    out = S.make_synthetic_sipakmed(root, seed=7, clusters_per_class=K)
    return out


@pytest.fixture(scope="module")
def sample():
    """300 images rendered in memory: 5 classes x 15 cluster images x 4 cells, with features."""
    rows = []
    for cls in S.CLASSES:
        for nnn in range(1, 16):
            for mm in range(1, 5):
                a = S.render_image(3, cls, nnn, mm)
                f = a.astype(np.float32)
                g = f.mean(2)
                rows.append({
                    "cls": cls, "group": f"{cls}/{nnn:03d}",
                    "r": f[..., 0].mean(), "g": f[..., 1].mean(), "b": f[..., 2].mean(),
                    "sr": f[..., 0].std(), "sg": f[..., 1].std(), "sb": f[..., 2].std(),
                    "width": a.shape[1], "height": a.shape[0],
                    "dark": (g < 100).mean(), "darkish": (g < 150).mean(),
                    # background estimate: the bright tail of each channel
                    "bg_r": np.percentile(f[..., 0], 97), "bg_g": np.percentile(f[..., 1], 97),
                    "bg_b": np.percentile(f[..., 2], 97),
                })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- layout and marker


def test_layout_and_names_are_a_subset_of_the_manifest(small_set):
    files = _bmps(small_set)
    expected = S.synthetic_file_table(K)
    assert set(files) == set(expected["kaggle_layout_relpath"])
    man = manifest.sipakmed_manifest()
    assert set(files) <= set(man["kaggle_layout_relpath"])
    for cls in S.CLASSES:
        got = {p.split("/")[-1] for p in files if p.startswith(f"im_{cls}/im_{cls}/CROPPED/")}
        nnn = sorted({int(n[:3]) for n in man.loc[man["class"] == cls, "file_name"]})[:K]
        want = set(man.loc[(man["class"] == cls) & man["file_name"].str[:3].astype(int).isin(nnn), "file_name"])
        assert got == want, cls
    # nothing else in the folder but the marker
    others = [p for p in small_set.rglob("*") if p.is_file() and p.suffix != ".bmp"]
    assert [p.name for p in others] == [S.MARKER_NAME]
    im = Image.open(next(iter(files.values())))
    assert im.format == "BMP" and im.mode == "RGB"


def test_full_table_is_the_whole_manifest():
    t = S.synthetic_file_table(None)
    assert len(t) == 4049 and t["group"].nunique() == 966


def test_marker_content(small_set):
    text = (small_set / S.MARKER_NAME).read_text(encoding="utf-8")
    assert text.startswith("SYNTHETIC")
    mk = S.read_marker(small_set)
    assert mk["synthetic"] == "true"
    assert mk["seed"] == "7" and mk["clusters_per_class"] == str(K)
    assert mk["generator_version"] == str(S.GENERATOR_VERSION)
    assert mk["n_images"] == str(len(S.synthetic_file_table(K)))
    assert mk["params"] == {"clusters_per_class": K, "generator_sha": S.GENERATOR_SHA,
                            "generator_version": S.GENERATOR_VERSION, "seed": 7}
    some = next(iter(_bmps(small_set).values()))
    assert S.find_marker(some) == small_set / S.MARKER_NAME
    assert S.find_marker(small_set.parent) is None


# --------------------------------------------------------------------------- determinism and idempotence


def test_same_seed_is_byte_identical_and_subsets_match(small_set, tmp_path):
    a = S.make_synthetic_sipakmed(tmp_path / "a", seed=7, clusters_per_class=1)
    b = S.make_synthetic_sipakmed(tmp_path / "b", seed=7, clusters_per_class=1)
    fa, fb, fk = _bmps(a), _bmps(b), _bmps(small_set)
    assert fa.keys() == fb.keys() and set(fa) < set(fk)
    for rel in fa:
        data = fa[rel].read_bytes()
        assert data == fb[rel].read_bytes(), rel
        assert data == fk[rel].read_bytes(), rel  # a subset equals the same files of a bigger set
    c = S.make_synthetic_sipakmed(tmp_path / "c", seed=8, clusters_per_class=1)
    fc = _bmps(c)
    assert sum(fa[r].read_bytes() != fc[r].read_bytes() for r in fa) == len(fa)


def test_second_call_does_not_rewrite_but_new_parameters_do(tmp_path):
    root = S.make_synthetic_sipakmed(tmp_path / "s", seed=1, clusters_per_class=1)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    os.utime(root / S.MARKER_NAME, ns=(1, 1))  # a rewrite would change this
    before[root / S.MARKER_NAME] = 1
    assert S.make_synthetic_sipakmed(tmp_path / "s", seed=1, clusters_per_class=1) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before

    S.make_synthetic_sipakmed(root, seed=2, clusters_per_class=1)
    assert S.read_marker(root)["seed"] == "2"
    assert (root / S.MARKER_NAME).stat().st_mtime_ns != 1
    assert not list(tmp_path.glob(".s.synth-*"))


def test_a_set_drawn_by_other_drawing_code_is_redrawn(tmp_path, monkeypatch):
    root = S.make_synthetic_sipakmed(tmp_path / "s", seed=1, clusters_per_class=1)
    some = sorted(root.rglob("*.bmp"))[0]
    good = some.read_bytes()
    some.write_bytes(good[:-7] + bytes(7))  # what an older generator's pixels look like to the cache
    # same GENERATOR_VERSION, other code: the set must be redrawn, not trusted
    monkeypatch.setattr(S, "GENERATOR_SHA", "0" * 16)
    S.make_synthetic_sipakmed(root, seed=1, clusters_per_class=1)
    assert S.read_marker(root)["params"]["generator_sha"] == "0" * 16
    assert some.read_bytes() == good


def test_interrupted_run_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    real = S.render_image
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args)

    monkeypatch.setattr(S, "render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.make_synthetic_sipakmed(tmp_path / "x", seed=1, clusters_per_class=1)
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".x.synth-*"))

    # an existing good set survives an interrupted regeneration untouched
    monkeypatch.setattr(S, "render_image", real)
    root = S.make_synthetic_sipakmed(tmp_path / "x", seed=1, clusters_per_class=1)
    calls["n"] = 0
    monkeypatch.setattr(S, "render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.make_synthetic_sipakmed(root, seed=2, clusters_per_class=1)
    assert S.read_marker(root)["seed"] == "1"
    assert len(_bmps(root)) == len(S.synthetic_file_table(1))


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone: the folder below is a leftover of a killed run
    stale = tmp_path / f".z.synth-tmp-{dead.pid}-0000"
    (stale / "im_Parabasal").mkdir(parents=True)
    live = tmp_path / f".z.synth-tmp-{os.getpid()}-0000"  # a run in progress is left alone
    live.mkdir()
    S.make_synthetic_sipakmed(tmp_path / "z", seed=1, clusters_per_class=1)
    assert not stale.exists() and live.exists()


def test_bad_arguments_and_foreign_folders(tmp_path):
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "keep.bmp").write_bytes(b"x")
    with pytest.raises(ValueError, match="SYNTHETIC.txt"):
        S.make_synthetic_sipakmed(foreign, clusters_per_class=1)
    assert (foreign / "keep.bmp").read_bytes() == b"x"
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="clusters_per_class"):
            S.make_synthetic_sipakmed(tmp_path / "y", clusters_per_class=bad)
    for bad in (-1, 1.0, None):
        with pytest.raises(ValueError, match="seed"):
            S.make_synthetic_sipakmed(tmp_path / "y", seed=bad, clusters_per_class=1)
    with pytest.raises(ValueError, match="cls"):
        S.draw_cell(np.random.default_rng(0), "Normal")
    assert not (tmp_path / "y").exists()


# --------------------------------------------------------------------------- images and statistics


def test_helpers_return_images():
    a = S.draw_cell(np.random.default_rng(0), "Koilocytotic")
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    style = S.sample_cluster_style(np.random.default_rng(1))
    b = S.draw_cell(np.random.default_rng(0), "Koilocytotic", style)
    assert not np.array_equal(a, b)  # same cell draws, another cluster style
    grid = S.preview_grid(seed=1, n_per_class=2, tile=64)
    assert grid.shape == (5 * 68 + 4, 2 * 68 + 4, 3)


def test_crop_sizes_like_real_crops(sample):
    assert sample["width"].between(48, 320).all() and sample["height"].between(48, 320).all()
    assert (sample["width"] != sample["height"]).mean() > 0.7
    med = (sample["width"] * sample["height"]).groupby(sample["cls"]).median()
    assert med["Superficial-Intermediate"] > 1.8 * med["Parabasal"]
    assert med["Koilocytotic"] > med["Parabasal"] and med["Dyskeratotic"] < med["Superficial-Intermediate"]
    assert sample["width"].max() > 200 and sample["width"].min() < 90


def test_class_dependent_morphology(sample):
    by = sample.groupby("cls").mean(numeric_only=True)
    # parabasal: dense cytoplasm, large nucleus -> darker than flat superficial cells
    assert by.loc["Parabasal", "darkish"] > by.loc["Superficial-Intermediate", "darkish"]
    # dyskeratotic: orangeophilic -> redder than the blue-green metaplastic and parabasal cells
    rb = by["r"] - by["b"]
    assert rb["Dyskeratotic"] > rb["Metaplastic"] + 10 and rb["Dyskeratotic"] > rb["Parabasal"] + 10

    rng = np.random.default_rng(0)
    p = pd.DataFrame([{"cls": c, **asdict(S.sample_cell_params(rng, c))} for c in S.CLASSES for _ in range(300)])
    m = p.groupby("cls").mean(numeric_only=True)
    assert m.loc["Superficial-Intermediate", "nc_ratio"] < m.loc["Metaplastic", "nc_ratio"] < m.loc["Parabasal", "nc_ratio"]
    assert m.loc["Koilocytotic", "halo"] > 0.4 and m.drop("Koilocytotic")["halo"].max() < 0.25
    assert m.loc["Koilocytotic", "binucleate"] > 0.1
    assert m.loc[["Dyskeratotic", "Koilocytotic"], "nuc_od"].min() > m.loc[["Parabasal", "Metaplastic"], "nuc_od"].max()
    assert m.loc[["Dyskeratotic", "Koilocytotic"], "nuc_irregularity"].min() > m.loc["Parabasal", "nuc_irregularity"]
    assert m["radius"].idxmax() == "Superficial-Intermediate"


def test_cells_of_a_cluster_are_correlated(sample):
    """Background tint is shared within a cluster image: most of its variance is between clusters."""
    for ch in ("bg_r", "bg_g", "bg_b"):
        within = sample.groupby("group")[ch].var().mean()
        assert within < 0.35 * sample[ch].var(), ch


def test_learnable_but_not_trivially_separable(sample):
    """Colour/size summaries under a grouped split: clearly above chance (0.2), clearly below perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cols = ["r", "g", "b", "sr", "sg", "sb", "width", "height", "dark", "darkish"]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    acc = cross_val_score(model, sample[cols].to_numpy(), sample["cls"], groups=sample["group"], cv=cv).mean()
    assert 0.35 < acc < 0.95, acc
