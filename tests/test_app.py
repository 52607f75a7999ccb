"""The Gradio app (lib.serve.app) served on a free loopback port over a tiny real run.

API tests go through ``gradio_client``; one test drives Debian's Chromium with Playwright and saves
screenshots to ``build/screenshots_app/``.
"""
from __future__ import annotations

import json
import shutil
import socket
import struct
import zlib
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_sipakmed_tree, tiny_branch

CLASSES = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]
ABNORMAL = CLASSES[:2]
SIZE = 32
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "build" / "screenshots_app"

pytestmark = pytest.mark.slow


def make_run(build: Path, profile: str = "smoke", classes=CLASSES) -> Path:
    """``build/<profile>/`` as notebooks 03 and 05 leave it: image branch, hybrid, preprocessor and card.

    The models are tiny and untrained (the app is under test, not them); the preprocessor is fitted on the
    real UCI table, so the form has the kit's real fields and ranges.
    """
    from lib.data import uci
    from lib.fusion import hybrid
    from lib.tabular import mlp

    models = build / profile / "models"
    models.mkdir(parents=True)
    branch = tiny_branch(len(CLASSES), SIZE)
    branch.save(models / "image_branch.keras")
    data = uci.load_uci()
    split = np.where(np.arange(len(data.frame)) % 10 < 7, "train", "test")
    pre, _, _ = mlp.fit_preprocessor(data, split)
    model = hybrid.assemble(branch, hybrid.build_head("fused", pre.n_features_out))
    card = {"name": "hybrid_cervical_model", "threshold": 0.5, "synthetic": True, "image_classes": list(classes),
            "abnormal_classes": ABNORMAL if classes == CLASSES else list(classes[-2:]), "profile": profile}
    hybrid.save_hybrid(model, models, preprocessor=pre, card=card)
    return build / profile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A 300-byte PNG whose header claims side x side pixels: Pillow refuses it as a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny run, a tiny SIPaKMeD (its test images feed the gallery) and the app serving it."""
    root = tmp_path_factory.mktemp("app")
    clusters = {c: {f"{i:03d}": 2 for i in range(1, 7)} for c in CLASSES}
    make_sipakmed_tree(root / "data" / "sipakmed", clusters=clusters, size=(40, 36))
    mp = pytest.MonkeyPatch()
    mp.setenv("CERVICAL_KIT_BUILD", str(root / "build"))
    mp.setenv("CERVICAL_KIT_DATA", str(root / "data"))
    mp.setenv("CERVICAL_KIT_CACHE", str(root / "cache"))
    make_run(root / "build")
    from lib.run import Run

    Run.open("smoke", data_dir=str(root / "data"), build=root / "build")  # run.json + split.csv: the gallery's source
    from lib.serve import app

    demo, url = app.launch("smoke", port=free_port(), block=False, quiet=True)
    cell = Path(make_sipakmed_tree(root / "cells", clusters={"Parabasal": {"001": 1}}, size=(48, 40)))
    cell = next(cell.rglob("*.bmp"))
    yield {"root": root, "url": url, "demo": demo, "cell": cell, "models": root / "build" / "smoke" / "models"}
    demo.close()
    mp.undo()


@pytest.fixture(scope="module")
def client(world):
    from gradio_client import Client

    return Client(world["url"], verbose=False)


def fields(world):
    from lib.serve import app

    return app.load_run("smoke").fields


def form(world, **values):
    """Form values in field order: binary fields 'unknown', others '' unless given."""
    return [values.get(f.name, "unknown" if f.binary else "") for f in fields(world)]


def details(result):
    return result[5]


# --------------------------------------------------------------------------- serving
def test_serves_on_loopback_with_analytics_off(world):
    import os

    u = urlparse(world["url"])
    assert u.hostname == "127.0.0.1"
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_form_follows_the_preprocessor(world):
    from lib.serve import app
    from lib.tabular import mlp

    pre = mlp.load_preprocessor(world["models"] / "hybrid_tabular_preprocessor.json")
    fs = fields(world)
    assert [f.name for f in fs] == pre.columns and len(fs) == 28
    age = fs[pre.columns.index("Age")]
    rng = pre.metadata["feature_ranges"]["Age"]
    assert not age.binary and age.train == (rng["train_min"], rng["train_max"]) and age.allowed == (0.0, 120.0)
    assert f"training data {rng['train_min']:g}-{rng['train_max']:g} years" in age.info and "unknown" in age.info
    assert fs[pre.columns.index("Smokes")].binary
    assert app.unit_of("Smokes (packs/year)") == "packs per year" and app.unit_of("IUD (years)") == "years"
    assert app.unit_of("Num of pregnancies") == "count" and app.unit_of("Dx:CIN") == ""


def test_record_from_form_maps_unknown_and_yes_no(world):
    from lib.serve import app

    fs = fields(world)
    rec = app.record_from_form(fs, form(world, Age=" 35 ", Smokes="yes", IUD="no"))
    assert rec["Age"] == "35" and rec["Smokes"] == 1 and rec["IUD"] == 0 and rec["Dx"] is None
    with pytest.raises(app.InputError, match="expected 28 values, got 1"):
        app.record_from_form(fs, ["35"])


# --------------------------------------------------------------------------- good requests, through the API
def test_image_only_matches_the_cli(world, client):
    from gradio_client import handle_file

    from lib.serve import inference

    r = client.predict(handle_file(str(world["cell"])), api_name="/image_only")
    d = details(r)
    cli = inference.predict_one(world["cell"], model_dir=world["models"])
    assert d["image_risk"] == pytest.approx(cli["risk"], abs=1e-5)
    assert set(d["probabilities"]) == set(CLASSES) and sum(d["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert d["gradcam_target"] in ABNORMAL and "fused_risk" not in d
    assert f"Image-only risk: {d['image_risk']:.3f}" in r[1] and "P(Dyskeratotic + Koilocytotic)" in r[1]
    assert r[3] == ""  # no fused number without a record
    with Image.open(r[4]) as im:  # the overlay, upscaled, with the SYNTHETIC band under it
        assert im.format == "PNG" and im.width >= 256 and im.height > im.width


def test_fused_matches_the_cli_and_carries_the_caveat(world, client, tmp_path):
    from gradio_client import handle_file

    from lib.serve import app, inference

    values = form(world, **{"Age": "35", "Smokes": "yes", "Num of pregnancies": "2", "First sexual intercourse": "90"})
    r = client.predict(handle_file(str(world["cell"])), *values, api_name="/fused")
    d = details(r)
    assert "error" not in d, d
    rec = app.record_from_form(fields(world), values)
    (tmp_path / "r.json").write_text(json.dumps(rec))
    cli = inference.predict_one(world["cell"], tmp_path / "r.json", model_dir=world["models"])
    assert d["fused_risk"] == pytest.approx(cli["risk"], abs=1e-5)
    assert d["image_risk"] == pytest.approx(inference.predict_one(world["cell"], model_dir=world["models"])["risk"],
                                            abs=1e-5)
    assert f"Fused risk (image + risk factors): {d['fused_risk']:.3f}" in r[3]
    assert "share no patients" in r[3]  # beside the fused number
    assert "field 'First sexual intercourse' = 90 is outside the training range" in r[6]
    assert "24 field(s) unknown, imputed with the training median: Number of sexual partners" in r[6]
    assert d["gradcam_target"] == "fused risk" and Path(r[4]).is_file()


# --------------------------------------------------------------------------- bad requests: a message, no crash
@pytest.mark.parametrize("kind, needles", [
    ("text", ["notes.png", "is not a readable image"]),
    ("bomb", ["bomb.png", "DecompressionBombError"]),
    ("none", ["no image: upload a cell image or pick one from the gallery"]),
])
def test_bad_images_get_a_message(world, client, tmp_path, kind, needles):
    from gradio_client import handle_file

    if kind == "text":
        f = tmp_path / "notes.png"
        f.write_text("this is not a picture\n")
    elif kind == "bomb":
        f = bomb_png(tmp_path / "bomb.png")
    for api, extra in (("/image_only", []), ("/fused", form(world))):
        r = client.predict(handle_file(str(f)) if kind != "none" else None, *extra, api_name=api)
        msg = details(r)["error"]
        for n in needles:
            assert n in msg and n in r[0], (n, msg)
        assert "/gradio" not in msg and str(tmp_path) not in msg  # the file's own name, not the server's path
        assert r[0].startswith("### Cannot score this input") and not r[2] and r[4] is None


@pytest.mark.parametrize("values, needle", [
    ({"Age": "150"}, "field 'Age' = '150' is out of range: expected 0..120"),
    ({"Age": "thirty"}, "field 'Age' = 'thirty' is not a number"),
    ({"Num of pregnancies": "-1"}, "field 'Num of pregnancies' = '-1' is out of range"),
    ({"IUD (years)": "inf"}, "field 'IUD (years)' = 'inf' is not a finite number"),
])
def test_bad_fields_get_a_message(world, client, values, needle):
    from gradio_client import handle_file

    r = client.predict(handle_file(str(world["cell"])), *form(world, **values), api_name="/fused")
    assert needle in details(r)["error"] and needle in r[0]
    assert "risk-factor form" in r[0] and r[3] == ""


def test_the_server_survives_bad_requests(world, client):
    from gradio_client import handle_file

    # a yes/no field is a radio button: Gradio itself refuses other values, naming the choices
    with pytest.raises(Exception, match=r"'2'.*is not in the list of choices: \['unknown', 'no', 'yes'\]"):
        client.predict(handle_file(str(world["cell"])), *form(world, Smokes="2"), api_name="/fused")

    r = client.predict(handle_file(str(world["cell"])), api_name="/image_only")
    assert 0.0 <= details(r)["image_risk"] <= 1.0


def test_model_card_link_serves_the_report_page(world, tmp_path):
    import dataclasses

    import httpx

    from lib.serve import app

    site = tmp_path / "_site"
    (site / "site_libs").mkdir(parents=True)
    (site / "model_card.html").write_text("<html><link href='site_libs/s.css'><h1>Model card</h1></html>")
    (site / "site_libs" / "s.css").write_text("h1 {color: red}")
    (tmp_path / "secret.txt").write_text("outside the site")
    run = app.load_run("smoke")
    run.files = dataclasses.replace(run.files, model_card_page=site / "model_card.html")
    demo = app.build_app(run)
    info = [b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "run-info"][0]
    link = f"/gradio_api/file={site / 'model_card.html'}"
    assert f"[the report's model card]({link})" in info
    _, url, _ = demo.launch(server_name=app.HOST, server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            allowed_paths=app.allowed_paths(run, []))
    try:
        page = httpx.get(url.rstrip("/") + link)
        assert page.status_code == 200 and "Model card" in page.text
        assert page.headers["content-type"].startswith("text/html")
        css = httpx.get(url.rstrip("/") + f"/gradio_api/file={site / 'site_libs' / 's.css'}")  # relative links resolve
        assert css.status_code == 200 and "color: red" in css.text
        assert httpx.get(url.rstrip("/") + f"/gradio_api/file={tmp_path / 'secret.txt'}").status_code == 403
    finally:
        demo.close()


def test_flip_tta_chosen_in_notebook_03_is_used_and_said(world, tmp_path, monkeypatch):
    """A card saying notebook 03 chose flip TTA: the app's image risk is the four-view mean, the same number as
    the CLI's, and the page's notes say so; without the choice, one pass and no note."""
    from lib.serve import app, inference

    rng = np.random.default_rng(1)
    img = tmp_path / "asym.png"
    Image.fromarray(rng.integers(0, 255, (SIZE + 8, SIZE, 3), dtype=np.uint8)).save(img)
    run = tmp_path / "build" / "smoke"
    shutil.copytree(world["root"] / "build" / "smoke", run)
    card_path = run / "models" / "hybrid_cervical_model_card.json"
    card = json.loads(card_path.read_text())
    monkeypatch.setenv("CERVICAL_KIT_BUILD", str(tmp_path / "build"))
    risks = {}
    for flips in (False, True):
        card_path.write_text(json.dumps({**card, "image_branch": {"test_time_flips": flips}}))
        res = app.score_image(app.load_run("smoke"), img, with_gradcam=False)
        cli = inference.predict_one(img, model_dir=run / "models")
        assert res["image_risk"] == pytest.approx(cli["risk"], abs=1e-6)
        assert any("four flip views" in n for n in res["notes"]) is flips
        risks[flips] = res["image_risk"]
    assert risks[True] != pytest.approx(risks[False], abs=1e-6)


# --------------------------------------------------------------------------- runs the app cannot serve
def test_run_with_another_datasets_classes(world, tmp_path, monkeypatch):
    from lib.serve import app

    run = tmp_path / "build" / "smoke"
    shutil.copytree(world["root"] / "build" / "smoke", run)
    card_path = run / "models" / "hybrid_cervical_model_card.json"
    card = json.loads(card_path.read_text())
    card.update(image_classes=["NL", "LSIL", "HSIL", "SCC"], abnormal_classes=["HSIL", "SCC"])  # an LBC run's card
    card_path.write_text(json.dumps(card))
    monkeypatch.setenv("CERVICAL_KIT_BUILD", str(tmp_path / "build"))
    loaded = app.load_run("smoke")
    assert loaded.problem and "image branch has 5 classes" in loaded.problem
    with pytest.raises(app.InputError, match="cannot be scored: image branch has 5 classes"):
        app.score_image(loaded, world["cell"])
    demo = app.build_app(loaded)  # the page still builds and shows the problem
    blocks = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "run-problem"]
    assert blocks and "Cannot score" in blocks[0].value


def test_no_run_says_which_command_makes_one(tmp_path, monkeypatch, capsys):
    from lib.serve import app

    monkeypatch.setenv("CERVICAL_KIT_BUILD", str(tmp_path / "empty"))
    with pytest.raises(app.InputError, match="make report PROFILE=smoke"):
        app.newest_complete_run()
    assert app.main(["--port", str(free_port())]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_newest_complete_run_is_the_default(world, tmp_path, monkeypatch):
    import os

    from lib.serve import app

    build = tmp_path / "build"
    shutil.copytree(world["root"] / "build" / "smoke", build / "smoke")
    shutil.copytree(world["root"] / "build" / "smoke", build / "full")
    monkeypatch.setenv("CERVICAL_KIT_BUILD", str(build))
    card = "models/hybrid_cervical_model_card.json"
    os.utime(build / "full" / card, (1e9, 1e9))
    assert app.newest_complete_run() == "smoke"
    os.utime(build / "smoke" / card, (1e8, 1e8))
    assert app.newest_complete_run() == "full"
    (build / "full" / "models" / "image_branch.keras").unlink()  # incomplete: never the default
    assert app.newest_complete_run() == "smoke"


# --------------------------------------------------------------------------- a real browser
def test_browser_upload_fill_submit_and_a_bad_file(world, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium) for the browser test")
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    bad = tmp_path / "report.png"
    bad.write_text("not an image, just text with a .png name\n")
    hosts = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            # CI machines are shared 2-core boxes: an upload can take tens of seconds under load
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            page.on("request", lambda req: hosts.add(urlparse(req.url).hostname)
                    if urlparse(req.url).scheme in ("http", "https", "ws", "wss") else None)  # data:/blob: are local
            page.goto(world["url"], wait_until="networkidle")
            expect(page.get_by_text("Not for clinical use.").first).to_be_visible()
            expect(page.get_by_text("SYNTHETIC DATA.").first).to_be_visible()
            expect(page.locator("#gallery img").first).to_be_visible()
            page.locator("#image-input input[type=file]").set_input_files(str(world["cell"]))
            expect(page.locator("#image-input").get_by_text(world["cell"].name)).to_be_visible(timeout=60_000)
            page.get_by_label("Age (years)").fill("35")
            page.get_by_label("Num of pregnancies (count)").fill("2")
            page.locator("#btn-fused").click()
            expect(page.locator("#fused-risk")).to_contain_text("Fused risk (image + risk factors):", timeout=60_000)
            expect(page.locator("#fused-risk")).to_contain_text("share no patients")
            expect(page.locator("#image-risk")).to_contain_text("Image-only risk:")
            expect(page.locator("#gradcam img")).to_be_visible(timeout=60_000)
            page.wait_for_function("() => (document.querySelector('#gradcam img') || {}).naturalWidth >= 256",
                                   timeout=60_000)  # the overlay PNG itself, upscaled
            page.screenshot(path=str(SHOTS / "app_fused.png"), full_page=True)

            page.locator("#image-input button[aria-label='Clear']").first.click()
            page.locator("#image-input input[type=file]").set_input_files(str(bad))
            expect(page.locator("#image-input").get_by_text(bad.name)).to_be_visible(timeout=60_000)
            page.locator("#btn-image").click()
            expect(page.locator("#status")).to_contain_text("Cannot score this input", timeout=60_000)
            expect(page.locator("#status")).to_contain_text("report.png")
            expect(page.locator("#status")).to_contain_text("is not a readable image")
            expect(page.locator("#fused-risk")).not_to_contain_text("Fused risk")
            page.screenshot(path=str(SHOTS / "app_bad_file.png"), full_page=True)

            page.locator("#gallery img").first.click()  # a test image from the gallery replaces the upload
            expect(page.locator("#image-input").get_by_text(".bmp")).to_be_visible(timeout=60_000)
            page.locator("#btn-image").click()
            expect(page.locator("#image-risk")).to_contain_text("Image-only risk:", timeout=60_000)
            page.screenshot(path=str(SHOTS / "app_gallery_pick.png"), full_page=True)
        finally:
            browser.close()
    assert hosts == {"127.0.0.1"}, f"the page asked other hosts: {hosts}"
