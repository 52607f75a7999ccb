"""The one place where paths and run parameters are resolved.

Paths: an explicit argument wins, then an environment variable, then a folder of
the project.  Run parameters: a named profile (``smoke`` or ``full``) gives
defaults, explicit knobs override them, and every value is validated here so a
notebook fails in its first cell with a message naming the parameter.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENV_DATA = "CERVICAL_KIT_DATA"        # folder holding uci/ and sipakmed/
ENV_CACHE = "CERVICAL_KIT_CACHE"      # features, synthetic images, converted weights
ENV_BUILD = "CERVICAL_KIT_BUILD"      # executed notebooks, models, metrics JSON
ENV_FIGURES = "CERVICAL_KIT_FIGURES"  # figures the report embeds


def _resolve(path, env: str, default: Path) -> Path:
    if path is not None and str(path) != "":
        return Path(path).expanduser().resolve()
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser().resolve()
    return default


def data_root(path=None) -> Path:
    """Where raw data lives (read-only): argument, then $CERVICAL_KIT_DATA, then ``data/``."""
    return _resolve(path, ENV_DATA, ROOT / "data")


def cache_dir(path=None) -> Path:
    """Derived, reproducible files (safe to delete): argument, $CERVICAL_KIT_CACHE, ``.cache/``."""
    d = _resolve(path, ENV_CACHE, ROOT / ".cache")
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_dir(path=None) -> Path:
    """Outputs of a run (models, metrics, executed notebooks): argument, $CERVICAL_KIT_BUILD, ``build/``."""
    d = _resolve(path, ENV_BUILD, ROOT / "build")
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_dir(profile: str = "smoke", path=None) -> Path:
    """``build/<profile>/``: one profile's outputs never overwrite another's."""
    if profile not in PROFILES:
        raise ValueError(f"parameter 'profile': expected one of {sorted(PROFILES)}, got {profile!r}")
    d = build_dir(path) / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def models_dir(profile: str = "smoke", path=None) -> Path:
    """Saved Keras models and fitted preprocessing of one profile."""
    d = run_dir(profile, path) / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def metrics_dir(profile: str = "smoke", path=None) -> Path:
    """Metrics JSON of one profile; the report's tables are read from here."""
    d = run_dir(profile, path) / "metrics"
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir(path=None) -> Path:
    """Figures written by the notebooks: argument, $CERVICAL_KIT_FIGURES, ``figures/``."""
    d = _resolve(path, ENV_FIGURES, ROOT / "figures")
    d.mkdir(parents=True, exist_ok=True)
    return d


UCI_FILE = "risk_factors_cervical_cancer.csv"
#: the kit ships the original UCI table (102 kB, CC BY 4.0; see data/README.md): a fresh clone runs offline
EMBEDDED_UCI = ROOT / "data" / "uci" / UCI_FILE


def uci_csv_path(data_dir=None) -> Path:
    """The UCI risk-factors CSV: ``<data root>/uci/`` when a copy is there, else the embedded one."""
    candidate = data_root(data_dir) / "uci" / UCI_FILE
    return candidate if candidate.is_file() else EMBEDDED_UCI


def sipakmed_dir(data_dir=None) -> Path:
    """Expected location of real SIPaKMeD (official or Kaggle layout) under the data root."""
    return data_root(data_dir) / "sipakmed"


# --------------------------------------------------------------------------- profiles
PROFILES: dict[str, dict] = {
    # minutes on a 2-core CPU: a few images per class, small images, 1-2 epochs
    "smoke": dict(
        images_per_class=24,
        image_size=64,
        epochs=2,
        augmented_views=6,         # regularized recipe: augmented views per training image (lib.image.cached_finetune);
                                   # 6 chosen on LBC's grouped validation split (benchmarks/bench_finetune_lbc.py)
        fine_tune="auto",          # notebook 03: "top" (blocks 6c-7a), "deep" (3a-7a) or "auto" (deep for small crops)
        naive_epochs=8,            # the naive recipe needs a few epochs to overfit visibly
        naive_train_images=None,
        batch_size=16,
        backbone="efficientnet_lite0",
        weights="imagenet",
        tabular_cv_repeats=1,
        tabular_epochs=30,
        bootstrap=200,
        gradcam_check_images=None,  # notebook 06: Grad-CAM checks on every test image
        # notebook 06: how far trained-vs-randomised map agreement must fall below tape-vs-reference; smoke maps
        # are 2x2 grids of a weak model, so single rank correlations swing widely and the margin is smaller
        randomization_margin=0.15,
        head_dropout=0.3,           # notebook 03: dropout before and after the 512-d image embedding
        test_time_flips="auto",     # notebook 03: flip TTA per row (fine-tuned, probe): "auto" = chosen on the
                                    # grouped validation macro-F1 (ties: none), True / False force it (lib.image.tta)
        fusion_head_epochs=150,     # notebook 05: most epochs per fusion head (early stopping picks the best)
    ),
    # the real thing: every image, 224 px
    "full": dict(
        images_per_class=None,
        image_size="auto",         # 224 px, or 128 px for small crops (resolve_image_size, from the images' sizes)
        epochs=12,                 # upper bound: early stopping (patience 3, 5 for fine_tune="deep") usually ends sooner
        augmented_views=3,         # 6 won on LBC's grouped validation at 128 px, but at 224 px 6 views took 03 to 852 s and
                                   # 5.6 GB (3 views: 656 s, 4.2 GB): the full profile's time and memory budget decides
        fine_tune="auto",
        naive_epochs=6,
        naive_train_images=200,    # full fine-tuning runs ~6-7 img/s at 224 px on 2 cores: a stratified subset keeps 02 in budget
                                   # (500 took 480 s of 02's 523 s, 250 238 s of 294 s; fewer images only make the
                                   # overfitting plainer)
        batch_size=32,
        backbone="efficientnet_lite0",
        weights="imagenet",
        tabular_cv_repeats=5,
        tabular_epochs=200,
        bootstrap=1000,
        gradcam_check_images=200,   # notebook 06: each check is several Grad-CAM passes; a stratified sample
        randomization_margin=0.3,
        head_dropout=0.3,
        test_time_flips="auto",
        fusion_head_epochs=300,
    ),
}

IMAGE_SIZE_RANGE = (32, 600)
#: image_size="auto": the largest of these sizes that enlarges the median image's shorter side at most
#: MAX_UPSAMPLING times (the smallest when every size enlarges more)
AUTO_IMAGE_SIZES = (224, 128)
MAX_UPSAMPLING = 3.0


FINE_TUNE_CHOICES = ("auto", "top", "deep")


def small_crops(short_sides) -> tuple[bool, float]:
    """``(small, median)``: whether the images are small crops, i.e. the largest of :data:`AUTO_IMAGE_SIZES`
    would enlarge their median shorter side more than :data:`MAX_UPSAMPLING` times."""
    import numpy as np

    sides = np.asarray(list(short_sides), dtype=float)
    if sides.size == 0 or not np.all(np.isfinite(sides)) or np.any(sides <= 0):
        raise ValueError("image_size / fine_tune 'auto' need the images' sizes (positive widths and heights)")
    median = float(np.median(sides))
    return max(AUTO_IMAGE_SIZES) > MAX_UPSAMPLING * median, median


def resolve_fine_tune(fine_tune, short_sides) -> tuple[str, str | None]:
    """``(depth, reason)``: ``fine_tune`` itself when it is ``"top"`` or ``"deep"``; for ``"auto"``, ``"deep"``
    for small crops (:func:`small_crops`) and ``"top"`` otherwise, with a sentence saying why
    (:data:`lib.image.image_model.FINE_TUNE_DEPTHS` holds what each depth trains)."""
    if check_fine_tune(fine_tune) != "auto":
        return fine_tune, None
    small, median = small_crops(short_sides)
    if small:
        return "deep", (f"fine_tune='auto': deep, because the images are small crops (median shorter side "
                        f"{median:g} px), where frozen ImageNet features fit worst")
    return "top", f"fine_tune='auto': top, because the images are not small crops (median shorter side {median:g} px)"


def check_fine_tune(value):
    """``value`` if it is one of :data:`FINE_TUNE_CHOICES`, else ``ValueError`` naming the parameter."""
    if value not in FINE_TUNE_CHOICES:
        raise ValueError(f"parameter 'fine_tune': expected one of {list(FINE_TUNE_CHOICES)}, got {value!r}")
    return value


def resolve_image_size(image_size, short_sides) -> tuple[int, str | None]:
    """``(size, reason)``: ``image_size`` itself when it is a number (reason ``None``); for ``"auto"`` the
    largest of :data:`AUTO_IMAGE_SIZES` that enlarges the median shorter side of the images at most
    :data:`MAX_UPSAMPLING` times, and a sentence saying why.

    Why: enlarging a small crop adds no detail, only cost.  On a real 7-class set of 40 px crops, 224 px
    scored no better than 128 px and cost 2-3.5x more (issue 13); cells of ~90 px and 512 px fields keep 224.
    """
    if image_size != "auto":
        return image_size, None
    _, median = small_crops(short_sides)
    fits = [s for s in AUTO_IMAGE_SIZES if s <= MAX_UPSAMPLING * median]
    size = max(fits) if fits else min(AUTO_IMAGE_SIZES)
    return size, (f"image_size='auto': {size} px, the largest of {list(AUTO_IMAGE_SIZES)} px that enlarges the "
                  f"median image's shorter side ({median:g} px) at most {MAX_UPSAMPLING:g}x"
                  if fits else f"image_size='auto': {size} px, the smallest of {list(AUTO_IMAGE_SIZES)} px: the "
                  f"median image's shorter side is {median:g} px, so even that enlarges it "
                  f"{size / median:.1f}x (more adds no detail)")


def run_params(profile: str = "smoke", **overrides) -> dict:
    """Profile defaults overridden by explicit knobs (``None`` means "use the profile's").

    Raises ``ValueError`` naming the parameter when a value is out of range.
    """
    if profile not in PROFILES:
        raise ValueError(f"parameter 'profile': expected one of {sorted(PROFILES)}, got {profile!r}")
    params = dict(PROFILES[profile])
    params["profile"] = profile
    params.setdefault("seed", 42)
    for key, value in overrides.items():
        if value is not None:
            params[key] = value
    size = params["image_size"]
    if size != "auto" and (isinstance(size, bool) or not isinstance(size, int)
                           or not IMAGE_SIZE_RANGE[0] <= size <= IMAGE_SIZE_RANGE[1]):
        raise ValueError(
            f"parameter 'image_size': expected 'auto' (from the images' sizes) or an integer in "
            f"{IMAGE_SIZE_RANGE[0]}..{IMAGE_SIZE_RANGE[1]} px, got {size!r}"
        )
    for key in ("epochs", "batch_size"):
        if not isinstance(params[key], int) or params[key] < 1:
            raise ValueError(f"parameter {key!r}: expected a positive integer, got {params[key]!r}")
    ipc = params["images_per_class"]
    if ipc is not None and (not isinstance(ipc, int) or ipc < 2):
        raise ValueError(f"parameter 'images_per_class': expected None (all) or an integer >= 2, got {ipc!r}")
    check_test_time_flips(params["test_time_flips"])
    check_fine_tune(params["fine_tune"])
    return params


def check_test_time_flips(value):
    """``value`` if it is ``"auto"`` (flip TTA chosen on the validation split), True or False, else
    ``ValueError`` naming the parameter (:mod:`lib.image.tta` checks with this too)."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"parameter 'test_time_flips': expected 'auto' (choose on the validation split), "
                         f"True or False, got {value!r}")
    return value


def seed_everything(seed: int = 42) -> None:
    """Seed Python, NumPy and (if imported) TensorFlow, and ask TF for deterministic ops.

    A rerun with the same seed gives the same tables.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    import numpy as np

    np.random.seed(seed)
    import sys

    if "tensorflow" in sys.modules or "keras" in sys.modules:
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(seed)
        try:
            tf.config.experimental.enable_op_determinism()
        except Exception:  # pragma: no cover - older TF
            pass
