"""A local web app: one cell image (and a risk-factor record) in; the risk, Grad-CAM and the caveats out.

    make app [PROFILE=smoke|full]          # or: python -m lib.serve.app [--profile P] [--port N]

It serves a finished run (``build/<profile>/``; default the newest complete one) with Gradio on
127.0.0.1 only, analytics off, and asks nothing of the network (Gradio's bundled fonts and scripts).
Why a web page at all: the original work's future work asked for clinical usability; here it is a
teaching tool, so every number comes with what it does *not* mean.

* **Image only**: the image branch's class probabilities and its risk (the summed probability of the
  abnormal classes), with a Grad-CAM overlay of the likelier abnormal class.
* **Image + risk factors**: the same, plus the hybrid model's fused risk and the Grad-CAM of that risk.
  The two datasets share no patients: the fused number is always shown with the pairing caveat.

All validation and preprocessing is :mod:`lib.serve.inference`'s (the same as ``cervical-kit-infer``);
this module only turns a form into a record and results into components.  Bad input (a non-image file,
a decompression bomb, an out-of-range or non-numeric field, a run whose classes are not the ones its
card names) gets a message in the page, never a crash.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from lib import config  # noqa: E402
from lib.serve import inference  # noqa: E402
from lib.serve.inference import InputError  # noqa: E402

HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_FILE_SIZE = "25mb"
GALLERY_PER_CLASS = 3
MAKE_RUN = "make report PROFILE=smoke"

NOT_CLINICAL = ("**Teaching tool. Not for clinical use.** Nothing on this page is a diagnosis or medical advice; "
                "the models are small rebuilds trained for teaching.")
SYNTHETIC_BANNER = ("**SYNTHETIC DATA.** This run's image branch was trained on the procedurally drawn stand-in, "
                    "not on real Pap smears: its numbers say nothing about real cells.")
PAIRING_CAVEAT = ("*What the fused number means:* the cell images and the risk-factor records come from different "
                  "women - the two datasets share no patients. The hybrid model was trained on made-up pairs "
                  "(a seeded, label-conditioned pairing protocol); the fused risk shows how such a model reacts, "
                  "not evidence that image and record combine for one patient.")
MISSING_WORDS = ("unknown", "")


# --------------------------------------------------------------------------- where a run's files are
@dataclass(frozen=True)
class RunFiles:
    """The files of one run the app reads (the one place that knows their names)."""

    profile: str
    models: Path
    image_branch: Path
    hybrid: Path
    preprocessor: Path
    card: Path
    model_card_page: Path   # the report's rendered model card

    def missing(self) -> list[str]:
        need = (self.image_branch, self.hybrid, self.preprocessor, self.card)
        return [p.name for p in need if not p.is_file()]


def run_files(profile: str) -> RunFiles:
    """Paths of ``build/<profile>/``'s artifacts, by the names the run object gives them."""
    from lib.report.site import SITE
    from lib.run import artifact_path

    def at(name):
        return artifact_path(profile, name)

    card = at("hybrid_card")
    pre = at("hybrid_preprocessor")
    if card.is_file():  # the card names the preprocessor it was saved with
        pre = pre.with_name(inference.read_card(card.parent).get("files", {}).get("preprocessor", pre.name))
    return RunFiles(profile, at("models"), at("image_branch"), at("hybrid_keras"), pre, card,
                    SITE / "model_card.html")


def newest_complete_run() -> str:
    """The profile whose complete run was written last; :class:`InputError` (with the command) when none is."""
    done = {}
    for p in config.PROFILES:
        try:
            f = run_files(p)
        except InputError:
            continue
        if not f.missing():
            done[p] = f.card.stat().st_mtime
    if not done:
        raise InputError(f"no finished run under {config.build_dir()}: build one with `{MAKE_RUN}` "
                         "(minutes on a laptop), then start the app again")
    return max(done, key=done.get)


# --------------------------------------------------------------------------- the loaded run
@dataclass
class Field:
    """One risk-factor input: the preprocessor's column, its training range and allowed limits."""

    name: str
    binary: bool
    train: tuple | None
    allowed: tuple | None
    unit: str = ""

    @property
    def info(self) -> str:
        if self.binary:
            return "no / yes; unknown is imputed as in training"
        parts = []
        if self.train:
            parts.append(f"training data {self.train[0]:g}-{self.train[1]:g}{' ' + self.unit if self.unit else ''}")
        if self.allowed:
            parts.append(f"allowed {self.allowed[0]:g}-{self.allowed[1]:g}")
        return "; ".join(parts + ["empty or 'unknown': imputed with the training median"])


def unit_of(column: str) -> str:
    """Units of the UCI risk-factor columns, read from their names (empty when the name does not say)."""
    c = column.lower()
    if "packs/year" in c:
        return "packs per year"
    if "(years)" in c or c in ("age", "first sexual intercourse") or c.startswith("stds: time since"):
        return "years" if c != "first sexual intercourse" else "years of age"
    if c.startswith(("number", "num ")) or "(number)" in c or "number of" in c:
        return "count"
    return ""


@dataclass
class LoadedRun:
    """A run's models in memory (loaded once: per-request loading would cost seconds)."""

    files: RunFiles
    card: dict
    branch: object
    hybrid: object
    pre: object
    size: int
    threshold: float
    synthetic: bool
    fields: list
    classes: list = field(default_factory=list)
    abnormal_idx: list = field(default_factory=list)
    abnormal: list = field(default_factory=list)
    problem: str | None = None          # a run the app cannot score (e.g. another dataset's classes)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load_keras(path: Path):
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"model file {path}: cannot be loaded ({' '.join(str(e).split())[:300]})") from None


def load_run(profile: str | None = None) -> LoadedRun:
    """Load the run's two models, preprocessor and card; a run the app cannot score keeps ``problem``."""
    from lib.fusion.hybrid import DEFAULT_THRESHOLD
    from lib.tabular import mlp

    profile = profile or newest_complete_run()
    files = run_files(profile)
    if files.missing():
        raise InputError(f"run {profile!r} in {files.models} is incomplete: {files.missing()} missing; build it "
                         f"with `make report PROFILE={profile}`")
    card = inference.read_card(files.models)
    try:
        pre = mlp.load_preprocessor(files.preprocessor)
    except ValueError as e:
        raise InputError(" ".join(str(e).split())) from None
    branch, hybrid = _load_keras(files.image_branch), _load_keras(files.hybrid)
    size = int(branch.get_layer("image").output.shape[1])
    ranges = pre.metadata.get("feature_ranges") or {}
    fields = [Field(c, bool(ranges.get(c, {}).get("binary")),
                    (ranges[c]["train_min"], ranges[c]["train_max"]) if c in ranges else None,
                    tuple(ranges[c]["allowed"]) if c in ranges else None, unit_of(c)) for c in pre.columns]
    run = LoadedRun(files, card, branch, hybrid, pre, size, float(card.get("threshold", DEFAULT_THRESHOLD)),
                    bool(card.get("synthetic", False)), fields)
    try:
        run.abnormal_idx, run.abnormal = inference.abnormal_indices(card, int(branch.output.shape[-1]))
        run.classes = list(card.get("image_classes") or [])
        if not run.classes:
            from lib.data.manifest import CLASSES
            run.classes = list(CLASSES)
        hy_size = int(hybrid.get_layer("image").output.shape[1])
        want = int({t.name: t for t in hybrid.inputs}["tabular"].shape[-1])
        if hy_size != size:
            raise InputError(f"{files.hybrid.name} takes {hy_size} px images but {files.image_branch.name} takes "
                             f"{size} px: the two files come from different runs")
        if want != pre.n_features_out:
            raise InputError(f"{files.preprocessor.name} gives {pre.n_features_out} features but {files.hybrid.name} "
                             f"expects {want}: the two files come from different runs")
    except InputError as e:
        run.problem = f"run {profile!r} cannot be scored: {e}"
    return run


# --------------------------------------------------------------------------- requests
def record_from_form(fields: list, values) -> dict:
    """Form values -> the ``{column: value}`` record :func:`inference.validate_record` checks."""
    if len(values) != len(fields):
        raise InputError(f"risk-factor form: expected {len(fields)} values, got {len(values)}")
    rec = {}
    for f, v in zip(fields, values):
        if v is None or (isinstance(v, str) and v.strip().lower() in MISSING_WORDS):
            rec[f.name] = None
        elif f.binary and isinstance(v, str) and v.strip().lower() in ("no", "yes"):
            rec[f.name] = 1 if v.strip().lower() == "yes" else 0
        else:
            rec[f.name] = v.strip() if isinstance(v, str) else v
    return rec


def _shown_name(message: str, path) -> str:
    """Messages name the uploaded file by its own name, not the server's temporary path."""
    return message.replace(str(path), Path(str(path)).name) if path else message


def _image(run: LoadedRun, image_path):
    if image_path is None or str(image_path) == "":
        raise InputError("no image: upload a cell image or pick one from the gallery")
    path = getattr(image_path, "path", image_path)
    try:
        return inference.load_image_array(path, run.size)
    except InputError as e:
        raise InputError(_shown_name(str(e), path)) from None


def score_image(run: LoadedRun, image_path, with_gradcam: bool = True) -> dict:
    """Image branch alone: probabilities, risk = P(abnormal classes), Grad-CAM of the likelier abnormal class."""
    from lib.explain import gradcam

    if run.problem:
        raise InputError(run.problem)
    x = _image(run, image_path)
    with run.lock:
        probs = inference.image_probabilities(run.branch, x, run.card)[0]  # flip TTA when notebook 03 chose it
        risk = float(probs[run.abnormal_idx].sum())
        target = int(run.abnormal_idx[int(np.argmax(probs[run.abnormal_idx]))])
        heat = gradcam.gradcam_tape(run.branch, None, target=target, inputs={"image": x})[0] if with_gradcam else None
    return {"image_risk": risk, "probabilities": dict(zip(run.classes, map(float, probs))),
            "image_class": "abnormal" if risk >= run.threshold else "normal", "threshold": run.threshold,
            "gradcam_target": run.classes[target], "x": x, "heat": heat,
            "notes": [f"image branch: {inference.FLIPS_NOTE}"] if inference.uses_flips(run.card) else []}


def score_fused(run: LoadedRun, image_path, record: dict, with_gradcam: bool = True) -> dict:
    """Both: the image branch's numbers and the hybrid model's fused risk (Grad-CAM of the fused risk)."""
    from lib.explain import gradcam

    if run.problem:
        raise InputError(run.problem)
    frame, notes = inference.validate_record(record, run.pre.columns, run.pre.metadata.get("feature_ranges"),
                                             "risk-factor form")
    x_tab = run.pre.transform(frame).astype("float32")
    out = score_image(run, image_path, with_gradcam=False)
    feed = {"image": out["x"], "tabular": x_tab}
    with run.lock:
        fused = float(gradcam.predict(run.hybrid, inputs=feed).reshape(-1)[0])
        heat = gradcam.gradcam_tape(run.hybrid, None, target=None, inputs=feed)[0] if with_gradcam else None
    out.update(fused_risk=fused, fused_class="abnormal" if fused >= run.threshold else "normal", heat=heat,
               notes=out["notes"] + notes, gradcam_target="fused risk")
    return out


# --------------------------------------------------------------------------- the page
def _overlay_png(run: LoadedRun, res: dict, folder: Path) -> str | None:
    from lib.explain import gradcam

    if res.get("heat") is None:
        return None
    fd, name = tempfile.mkstemp(suffix=".png", prefix="gradcam_", dir=folder)
    os.close(fd)
    return str(gradcam.save_overlay_png(name, res["x"][0], res["heat"], synthetic=run.synthetic))


def _public(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("x", "heat")}


def _split_test_images(profile: str):
    """The test rows of the split the run saved, or None for a run made before the run object existed."""
    from lib.run import saved_split

    table = saved_split(profile)
    return None if table is None else table[table["split"] == "test"]


def test_images(run: LoadedRun) -> tuple[list, str]:
    """``([(path, caption)], note)``: a few of the run's held-out test images per class for the gallery,
    read from the split the run saved; when there is none (or its images moved) the note says why."""
    listed = _split_test_images(run.files.profile)
    if listed is None:
        return [], (f"no gallery: run {run.files.profile!r} has no saved split (it was built before the kit saved "
                    f"one); rebuild it with `{MAKE_RUN}`, or upload an image")
    test = listed[listed["path"].map(lambda p: Path(p).is_file())]
    if test.empty:
        return [], f"no gallery: none of the run's {len(listed)} test images is where the run found them"
    picked = test.groupby("label", sort=False).head(GALLERY_PER_CLASS)
    return [(p, c) for p, c in zip(picked["path"], picked["label"])], \
        f"{len(picked)} of the run's {len(test)} test images"


def notes_markdown(notes: list) -> str:
    """inference's notes as a list, the many "field ... is missing: imputed" notes folded into one line."""
    import re

    rx = re.compile(r"field '(.+)' is missing: imputed with the training median$")
    missing = [m.group(1) for m in map(rx.match, notes) if m]
    rest = [n for n in notes if not rx.match(n)]
    lines = [f"- {n}" for n in rest]
    if missing:
        lines.append(f"- {len(missing)} field(s) unknown, imputed with the training median: {', '.join(missing)}")
    return ("**Notes on the record**\n\n" + "\n".join(lines)) if lines else ""


def _md_error(message: str) -> str:
    return f"### Cannot score this input\n\n**{message}**"


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def build_app(run: LoadedRun, gallery: list | None = None, gallery_note: str = ""):
    """The Gradio ``Blocks``: inputs, the two submit buttons (API ``/image_only`` and ``/fused``), outputs."""
    import gradio as gr

    out_dir = Path(tempfile.mkdtemp(prefix="cervical_kit_app_"))
    files = run.files
    head = [NOT_CLINICAL] + ([SYNTHETIC_BANNER] if run.synthetic else [])
    card_link = (f"[the report's model card](/gradio_api/file={files.model_card_page})"
                 if files.model_card_page.is_file() else
                 f"the report's model card (not built yet: `make report PROFILE={files.profile}`)")
    with gr.Blocks(title="Cervical-risk teaching kit: one image") as demo:
        gr.Markdown("# Cervical-risk teaching kit\n" + "\n\n".join(head), elem_id="banner")
        gr.Markdown(f"Run **{files.profile}** (`build/{files.profile}/`), images scaled to {run.size} px, threshold "
                    f"{run.threshold:g}. See {card_link} for what the models were trained on and how they score.",
                    elem_id="run-info")
        if run.problem:
            gr.Markdown(_md_error(run.problem), elem_id="run-problem")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Cell image (bmp, png, jpg, tif)", type="filepath", elem_id="image-input")
                pick = gr.Gallery(value=gallery or None, label=f"or pick a test image ({gallery_note})", columns=5,
                                  height=220, allow_preview=False, elem_id="gallery", interactive=False)
                with gr.Row():
                    b_image = gr.Button("Image only", variant="secondary", elem_id="btn-image")
                    b_fused = gr.Button("Image + risk factors", variant="primary", elem_id="btn-fused")
                gr.Markdown("**Image + risk factors** also reads the risk-factor form below the results.")
            with gr.Column(scale=1):
                status = gr.Markdown("", elem_id="status")
                image_md = gr.Markdown("", elem_id="image-risk")
                probs = gr.Label(label="Class probabilities (image branch)", num_top_classes=len(run.classes) or None,
                                 show_heading=False, elem_id="probabilities")
                fused_md = gr.Markdown("", elem_id="fused-risk")
                cam = gr.Image(label="Grad-CAM overlay (top_activation)", type="filepath", interactive=False,
                               elem_id="gradcam", height=300)
                notes_md = gr.Markdown("", elem_id="notes")
                details = gr.JSON(label="Details", elem_id="details", open=False)
        gr.Markdown("## Risk factors\nEvery field the tabular preprocessor was fitted on; leave a field empty or type "
                    "'unknown' where the record does not say (imputed as in training). Used only by "
                    "**Image + risk factors**.")
        inputs = []
        for i in range(0, len(run.fields), 4):
            with gr.Row():
                for f in run.fields[i:i + 4]:
                    label = f.name + (f" ({f.unit})" if f.unit and "(" not in f.name else "")
                    if f.binary:
                        inputs.append(gr.Radio(["unknown", "no", "yes"], value="unknown", label=label, info=f.info))
                    else:
                        inputs.append(gr.Textbox(value="", label=label, info=f.info, placeholder="unknown",
                                                 max_lines=1))
        gr.Markdown(NOT_CLINICAL)

        outputs = [status, image_md, probs, fused_md, cam, details, notes_md]

        def present(res: dict, fused: bool):
            img = (f"**Image-only risk: {_fmt(res['image_risk'])}** ({res['image_class']} at threshold "
                   f"{res['threshold']:g}); risk = P({' + '.join(run.abnormal)}), the image branch alone.")
            fmd = ""
            if fused:
                fmd = (f"**Fused risk (image + risk factors): {_fmt(res['fused_risk'])}** ({res['fused_class']} at "
                       f"threshold {res['threshold']:g})\n\n{PAIRING_CAVEAT}")
            msg = "Scored" + (f" (Grad-CAM target: {res['gradcam_target']})" if res.get("heat") is not None else "")
            msg += "." + (" **SYNTHETIC DATA**: the image branch learnt from the stand-in." if run.synthetic else "")
            return [msg, img, res["probabilities"], fmd, _overlay_png(run, res, out_dir), _public(res),
                    notes_markdown(res["notes"])]

        def failed(e: Exception):
            return [_md_error(str(e)), "", None, "", None, {"error": str(e)}, ""]

        def image_only(image_file):
            try:
                return present(score_image(run, image_file), fused=False)
            except InputError as e:
                return failed(e)

        def fused(image_file, *values):
            try:
                return present(score_fused(run, image_file, record_from_form(run.fields, values)), fused=True)
            except InputError as e:
                return failed(e)

        def picked(evt: gr.SelectData):
            return gallery[evt.index][0] if gallery and evt.index is not None else None

        picked.__annotations__["evt"] = gr.SelectData  # a real class, not the string `from __future__` makes

        b_image.click(image_only, [image], outputs, api_name="image_only")
        b_fused.click(fused, [image] + inputs, outputs, api_name="fused")
        pick.select(picked, None, image, api_name=False)
    return demo


def allowed_paths(run: LoadedRun, gallery: list) -> list[str]:
    """Files the page may serve: the gallery's images and the report's site (the model card and what it embeds)."""
    paths = {str(Path(p).parent) for p, _ in gallery}
    if run.files.model_card_page.is_file():
        paths.add(str(run.files.model_card_page.parent))
    return sorted(paths)


def launch(profile: str | None = None, port: int | None = None, block: bool = True, quiet: bool = False):
    """Load the run, build the page, serve it on 127.0.0.1; returns ``(demo, url)`` (``block=False``)."""
    run = load_run(profile)
    gallery, note = ([], "") if run.problem else test_images(run)
    demo = build_app(run, gallery, note)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=HOST, server_port=port or DEFAULT_PORT, share=False, inbrowser=False,
                            prevent_thread_lock=not block, quiet=quiet, show_error=False, ssr_mode=False,
                            max_file_size=MAX_FILE_SIZE, allowed_paths=allowed_paths(run, gallery),
                            footer_links=["api"], pwa=False, mcp_server=False, enable_monitoring=False)
    return demo, url


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.serve.app", description=__doc__.splitlines()[0],
                                 epilog="Teaching tool: not for clinical use.")
    ap.add_argument("--profile", choices=sorted(config.PROFILES), help="the run to serve (default: newest complete)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                    help=f"port on {HOST} (default {DEFAULT_PORT})")
    args = ap.parse_args(argv)
    try:
        launch(args.profile, args.port)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return inference.EXIT_INPUT
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
