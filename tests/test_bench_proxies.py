"""The benchmark's harder stand-ins (benchmarks/bench_finetune_lbc.py): small crops and few groups, written to the
cache, never into or beside the data they come from."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_finetune_lbc", ROOT / "benchmarks" / "bench_finetune_lbc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _folder(tmp_path) -> tuple[Path, pd.DataFrame]:
    src = tmp_path / "data" / "cells"
    rows = []
    rng = np.random.default_rng(0)
    for label in ("A", "B"):
        (src / label).mkdir(parents=True)
        for g in range(10):
            for k in range(2):  # two images per group, as LBC's augmented copies
                f = src / label / f"{label}{g}_{k}.png"
                Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(f)
                rows.append({"path": str(f), "label": label, "group": f"{label}{g}"})
    return src, pd.DataFrame(rows)


def test_group_subset_keeps_whole_groups_per_class_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CERVICAL_KIT_CACHE", str(tmp_path / "cache"))
    bench = _bench()
    src, table = _folder(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    out = bench.group_subset(table, src, 0.4, seed=1)
    assert out.parent == tmp_path / "cache" / "proxies" and out.is_dir()
    kept = sorted(out.rglob("*.png"))
    stems = {(p.parent.name, p.stem.rsplit("_", 1)[0]) for p in kept}
    assert len(kept) == 2 * len(stems)  # every kept group is whole
    assert sorted(lab for lab, _ in stems) == ["A"] * 4 + ["B"] * 4  # 40 % of each class's 10 groups
    f = kept[0]
    assert f.read_bytes() == (src / f.relative_to(out)).read_bytes()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before  # source untouched
    assert bench.group_subset(table, src, 0.4, seed=1) == out  # written once


def test_group_subset_refuses_a_fraction_outside_0_1(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("CERVICAL_KIT_CACHE", str(tmp_path / "cache"))
    src, table = _folder(tmp_path)
    with pytest.raises(ValueError, match="--keep-groups"):
        _bench().group_subset(table, src, 1.5, seed=1)


def test_small_crop_proxy_cuts_the_centre_to_px_and_keeps_names(tmp_path, monkeypatch):
    monkeypatch.setenv("CERVICAL_KIT_CACHE", str(tmp_path / "cache"))
    src, _ = _folder(tmp_path)
    out = _bench().small_crop_proxy(src, 40, 0.5)
    assert out.parent == tmp_path / "cache" / "proxies"
    made = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert made == sorted(p.relative_to(src) for p in src.rglob("*.png"))
    with Image.open(out / made[0]) as im:
        assert im.size == (40, 40)


def test_cell_crop_proxy_cuts_the_darkest_blobs_and_keeps_the_groups(tmp_path, monkeypatch):
    """Two dark nuclei drawn in a light field: the two crops are centred on them, named so the LBC preset groups
    them with their source image, and the source stays as it was."""
    import re

    from lib.data.datasets import PRESETS

    monkeypatch.setenv("CERVICAL_KIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "data" / "fields"
    rows = []
    for label, copies in (("HSIL", ("HSIL_1 (3)_0_4446", "HSIL_1 (3)_0_6782")), ("NL", ("NL_10_ (2)",))):
        (src / label).mkdir(parents=True)
        for stem in copies:
            field = np.full((200, 200, 3), 220, np.uint8)
            field[60:70, 50:60] = 20    # darkest nucleus
            field[140:150, 130:140] = 60
            field[0:20, 0:20] = 0       # outside the central 70 %: ignored
            Image.fromarray(field).save(src / label / f"{stem}.jpg", quality=95)
            group = f"{label}/{stem.rsplit('_', 2)[0]}" if label == "HSIL" else f"{label}/{stem}.jpg"
            rows.append({"path": str(src / label / f"{stem}.jpg"), "label": label, "group": group})
    before = {p: p.read_bytes() for p in src.rglob("*.jpg")}
    out = _bench().cell_crop_proxy(pd.DataFrame(rows), src, 16, window=40, per_image=2)
    crops = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert crops == ["HSIL/HSIL_1 (3)_0_0.png", "HSIL/HSIL_1 (3)_0_1.png", "HSIL/HSIL_1 (3)_1_0.png",
                     "HSIL/HSIL_1 (3)_1_1.png", "NL/NL_10_ (2)_0_0.png", "NL/NL_10_ (2)_0_1.png"]
    pattern = re.compile(PRESETS["lbc"]["group_pattern"])
    assert {pattern.match(Path(c).stem)["group"] for c in crops} == {"HSIL_1 (3)", "NL_10_ (2)"}
    first = np.asarray(Image.open(out / "NL" / "NL_10_ (2)_0_0.png"))
    second = np.asarray(Image.open(out / "NL" / "NL_10_ (2)_0_1.png"))
    assert first.shape == (16, 16, 3)
    assert first[6:10, 6:10].mean() < 80 and second[6:10, 6:10].mean() < 120  # each nucleus in its crop's centre
    assert first[6:10, 6:10].mean() < second[6:10, 6:10].mean()             # the darker one first
    assert {p: p.read_bytes() for p in src.rglob("*.jpg")} == before


def test_group_subset_thins_only_the_named_classes(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("CERVICAL_KIT_CACHE", str(tmp_path / "cache"))
    bench = _bench()
    src, table = _folder(tmp_path)
    out = bench.group_subset(table, src, {"B": 0.3}, seed=1)
    assert out.name.endswith("_tB30_s1")
    stems = {(p.parent.name, p.stem.rsplit("_", 1)[0]) for p in out.rglob("*.png")}
    assert sorted(lab for lab, _ in stems) == ["A"] * 10 + ["B"] * 3  # A whole, 30 % of B's 10 groups
    with pytest.raises(ValueError, match="no class"):
        bench.group_subset(table, src, {"Z": 0.5}, seed=1)
    with pytest.raises(ValueError, match="fraction"):
        bench.group_subset(table, src, {"B": 0.0}, seed=1)
