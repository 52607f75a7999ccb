"""The image branch: an EfficientNet classifier built flat, two training recipes, evaluation.

Graph (CONTRIBUTING.md, "Image branch model")::

    image (0..255 RGB) -> [aug_rotation, aug_flip, aug_zoom, aug_brightness, aug_contrast]
      -> backbone layers (flat, preprocessing inside) -> top_activation -> avg_pool -> head_dropout_1
      -> image_embedding (Dense 512, ReLU) -> head_dropout_2 -> class_probs (softmax, n_classes)

Augmentation layers are inside the model (active in ``fit`` only; see :mod:`lib.image.input_pipeline`).
Dropout layers are always present (rate 0 in the naive recipe) so both recipes share one graph.

Recipes (:func:`naive_recipe`, :func:`regularized_recipe`) build and compile a model and say how to
fit it; :func:`train` fits and returns a plain history dict; :func:`gap` is the train-minus-val
accuracy; :func:`evaluate` gives the confusion matrix, per-class precision/recall/F1, macro-F1 and
the binary risk view (abnormal score = sum of the abnormal classes' probabilities).

Nothing here knows SIPaKMeD: the number of classes, their names and the abnormal set come from
the :class:`lib.data.image_data.ImageDataset`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.atomic import atomic_path
from lib.image.input_pipeline import augmentation_layers

HEAD_LAYERS = ("avg_pool", "head_dropout_1", "image_embedding", "head_dropout_2", "class_probs")
LEARNING_RATE = 1e-4  # the published recipe's Adam learning rate (regularized recipe)
NAIVE_LEARNING_RATE = 1e-3  # Keras's Adam default: what a first attempt uses
# Linear-probe-then-fine-tune (benchmarks/bench_finetune_lbc.py, LBC grouped, chosen on validation over 3 seeds):
# the head alone first, then the top blocks at a lower rate.  Validation macro-F1 0.964 vs 0.955 for the joint
# recipe (head and top blocks together from a random head at 1e-4), test spread over seeds 0.005 vs 0.026.
LINEAR_PROBE_EPOCHS = 40  # regularized recipe: most head-only epochs on frozen features (early stopping; 0: off)
LINEAR_PROBE_LR = 1e-3  # Adam learning rate of that head-only stage
LP_FT_LEARNING_RATE = 3e-5  # fine-tuning rate after the head-only stage (the head is already fitted)
#: what the regularized recipe's early stopping may watch on the validation split (``regularized_recipe(monitor=)``);
#: the recipes keep accuracy: macro-F1 stopped earlier and lower on an unbalanced proxy (bench_finetune_lbc.py)
MONITORS = ("val_accuracy", "val_macro_f1")
UNFREEZE_FROM = "block6c"  # regularized recipe: the top three MBConv blocks (6c, 6d, 7a) and top_conv fine-tuned
#: how much of the backbone the regularized recipe fine-tunes (the run's ``fine_tune`` knob, lib.config):
#: "top" for images the backbone sees at their own scale; "deep" (blocks 3a-7a at a higher rate) for small
#: crops, where ImageNet's frozen mid-level features fit worst and the deeper cut is cheap at 128 px.  Chosen on
#: grouped validation of three small-crop proxies (benchmarks/bench_finetune_lbc.py --small-crops 40, LBC also with
#: --keep-groups 0.4): from block 3a beat 4a on all three (validation macro-F1 0.930 vs 0.915 and 0.927 vs 0.923,
#: means of 3 seeds; stand-in 0.944 vs 0.942, one seed), and 4a beat 5a and 6c.  "deep" waits 5 epochs without
#: progress, not 3: with 645 training images patience 3 ended 2 of 6 runs at a plateau before their best epoch
#: (0.887 -> 0.924, 0.896 -> 0.942); with 1600-2900 images it changed nothing (4 of 4 runs identical).
#: Checked afterwards on a fourth proxy, single-cell crops cut from LBC's fields (--cell-crops 40, 3200 training
#: crops): validation macro-F1 deep 0.836 (3 seeds) vs top 0.763 vs linear probe 0.725
FINE_TUNE_DEPTHS = {
    "top": dict(unfreeze_from=UNFREEZE_FROM, lr=LP_FT_LEARNING_RATE),
    "deep": dict(unfreeze_from="block3a", lr=1e-4, patience=5),
}


# --------------------------------------------------------------------------- building
_MIRRORED = []  # one MirroredStrategy per process: variables and optimizer must share the same instance


def strategy():
    """``MirroredStrategy`` when more than one GPU is visible (the same instance on every call), else
    TensorFlow's default strategy.  Build and compile under ``with strategy().scope():``."""
    import tensorflow as tf

    if len(tf.config.list_logical_devices("GPU")) > 1:
        if not _MIRRORED:
            _MIRRORED.append(tf.distribute.MirroredStrategy())
        return _MIRRORED[0]
    return tf.distribute.get_strategy()


def build_image_classifier(n_classes: int, backbone: str = "efficientnet_lite0", image_size: int = 224,
                           weights="imagenet", dropout: float = 0.3, embedding_dim: int = 512,
                           augment: bool = True, seed: int = 42, dist=None):
    """The image branch as one flat functional ``keras.Model`` (not compiled).

    Input ``image``: float RGB 0..255 ``(image_size, image_size, 3)``; output ``class_probs``.
    ``dist``: a ``tf.distribute`` strategy (default :func:`strategy`).
    """
    import keras

    from lib.image import backbones

    if not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ValueError(f"parameter 'n_classes': expected an integer >= 2, got {n_classes!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"parameter 'dropout': expected a rate in [0, 1), got {dropout!r}")
    dist = dist or strategy()
    with dist.scope():
        inp = keras.Input(shape=(image_size, image_size, 3), name="image")
        x = inp
        if augment:
            for layer in augmentation_layers(seed):
                x = layer(x)
        base = backbones.build_backbone(backbone, image_size, weights=weights, input_tensor=x)
        top = base.get_layer("top_activation").output
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(top)
        x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout_1")(x)
        # seeded initialisers: the head's first weights must not depend on what else drew from the
        # global Keras RNG before (a cold weights cache, another model built first)
        x = keras.layers.Dense(embedding_dim, activation="relu", name="image_embedding",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2))(x)
        x = keras.layers.Dropout(dropout, seed=seed + 1, name="head_dropout_2")(x)
        out = keras.layers.Dense(int(n_classes), activation="softmax", name="class_probs",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 3))(x)
        return keras.Model(inp, out, name=f"image_branch_{backbone}")


def embedding_model(model):
    """``image`` -> ``image_embedding`` (the 512-d vector the fusion notebook concatenates)."""
    import keras

    return keras.Model(model.get_layer("image").output, model.get_layer("image_embedding").output,
                       name="image_embedder")


def backbone_view(model):
    """A model sharing the classifier's layers from ``image`` to ``top_activation`` (no copy)."""
    import keras

    return keras.Model(model.get_layer("image").output, model.get_layer("top_activation").output,
                       name="backbone_view")


def is_batchnorm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def trainable_summary(model) -> dict:
    """Counts that show what a recipe trains: layers/params trainable, BatchNorm layers trainable."""
    import keras

    params = lambda ws: int(sum(np.prod(w.shape) for w in ws))  # noqa: E731
    weighted = [layer for layer in model.layers if layer.weights]
    return {
        "layers_with_weights": len(weighted),
        "trainable_layers": sum(1 for layer in weighted if layer.trainable),
        "trainable_params": params(model.trainable_weights),
        "frozen_params": params(model.non_trainable_weights),
        "batchnorm_layers": sum(1 for layer in weighted if is_batchnorm(layer)),
        "batchnorm_trainable": sum(1 for layer in weighted if is_batchnorm(layer) and layer.trainable),
        "first_trainable_backbone_layer": next(
            (layer.name for layer in weighted if layer.trainable and layer.name not in HEAD_LAYERS
             and not isinstance(layer, keras.layers.Dense)), None),
    }


# --------------------------------------------------------------------------- recipes
@dataclass
class Recipe:
    """A compiled model plus how to fit it.  ``fit_kwargs`` go to :func:`train`."""

    name: str
    model: object
    callbacks: list = field(default_factory=list)
    class_weight: dict | None = None
    settings: dict = field(default_factory=dict)
    lr: float = NAIVE_LEARNING_RATE  # Adam learning rate the model was compiled with

    @property
    def fit_kwargs(self) -> dict:
        return {"callbacks": list(self.callbacks), "class_weight": self.class_weight}


def _compile(model, lr: float, dist=None) -> None:
    import keras

    with (dist or strategy()).scope():
        # jit_compile=False: Keras's "auto" turns XLA on for CPU models without augmentation layers,
        # and compiling a whole EfficientNet train step with XLA takes minutes on 2 cores
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)


def class_weights(labels, n_classes: int, imbalance_threshold: float = 1.2) -> dict | None:
    """Balanced class weights ``n / (k * n_c)`` when the largest class exceeds the smallest by more than
    ``imbalance_threshold`` (ratio of counts), else ``None`` (balanced enough: no reweighting)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes).astype(float)
    if (counts == 0).any():
        missing = [i for i in range(n_classes) if counts[i] == 0]
        raise ValueError(f"training labels: class index(es) {missing} have no training images")
    if counts.max() / counts.min() <= imbalance_threshold:
        return None
    w = counts.sum() / (n_classes * counts)
    return {i: float(w[i]) for i in range(n_classes)}


def naive_recipe(n_classes: int, backbone: str = "efficientnet_lite0", image_size: int = 224, weights="imagenet",
                 seed: int = 42, lr: float = NAIVE_LEARNING_RATE) -> Recipe:
    """What a first attempt looks like: Keras defaults (Adam at its default learning rate 1e-3), no
    augmentation, no dropout, every layer trainable (BatchNorm included, updating its statistics on
    small batches), no early stopping, no class weights."""
    dist = strategy()
    model = build_image_classifier(n_classes, backbone, image_size, weights, dropout=0.0, augment=False,
                                   seed=seed, dist=dist)
    for layer in model.layers:  # per layer: model.trainable=True is a no-op when already True
        layer.trainable = True
    _compile(model, lr, dist)
    return Recipe("naive", model, callbacks=[], class_weight=None, lr=lr, settings=dict(
        augmentation=False, dropout=0.0, trainable="all layers (BatchNorm too)", early_stopping=False,
        class_weight=None, optimizer=f"Adam lr={lr:g}", loss="sparse categorical cross-entropy"))


def regularized_recipe(n_classes: int, backbone: str = "efficientnet_lite0", image_size: int = 224,
                       weights="imagenet", seed: int = 42, train_labels=None, dropout: float = 0.3,
                       lr: float | None = None, patience: int = 3, unfreeze_from: str = UNFREEZE_FROM,
                       linear_probe_epochs: int = LINEAR_PROBE_EPOCHS, linear_probe_lr: float = LINEAR_PROBE_LR,
                       linear_probe_patience: int = 5, lr_schedule: str = "constant",
                       label_smoothing: float = 0.0, monitor: str = "val_accuracy") -> Recipe:
    """The published recipe: augmentation, dropout ``dropout`` (0.2-0.3), lower blocks frozen and the top
    blocks fine-tuned with BatchNorm frozen (:func:`lib.image.backbones.unfreeze_top` from ``unfreeze_from``, a
    block prefix such as ``"block6c"`` or a layer name), Adam ``lr``, EarlyStopping on ``val_accuracy``
    restoring the best weights, and balanced class weights when ``train_labels`` are unbalanced
    (:func:`class_weights`).

    Options read by :func:`lib.image.cached_finetune.fit_top` (kept in ``settings``):
    ``linear_probe_epochs`` > 0 trains the head alone on frozen features first, at Adam ``linear_probe_lr``
    with its own early stopping (``linear_probe_patience``), before the top blocks are unfrozen at ``lr``
    (linear-probe-then-fine-tune, Kumar et al., ICLR 2022); ``lr_schedule`` ``"constant"`` or ``"cosine"``
    (decay to 0 over the fine-tuning epochs); ``label_smoothing`` in [0, 0.5); ``monitor``, what early stopping
    and the head-only comparison judge on (:data:`MONITORS`: ``"val_macro_f1"`` is computed each epoch by
    ``fit_top``, an ablation knob for unbalanced classes).  ``lr`` ``None``:
    :data:`LP_FT_LEARNING_RATE` after a head-only stage, else :data:`LEARNING_RATE` (the published recipe's)."""
    import keras

    from lib.image import backbones

    if isinstance(linear_probe_epochs, bool) or not isinstance(linear_probe_epochs, (int, np.integer)) \
            or linear_probe_epochs < 0:
        raise ValueError(f"parameter 'linear_probe_epochs': expected an integer >= 0 (0: no head-only stage), "
                         f"got {linear_probe_epochs!r}")
    if lr is None:
        lr = LP_FT_LEARNING_RATE if linear_probe_epochs > 0 else LEARNING_RATE
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"parameter 'lr_schedule': expected 'constant' or 'cosine', got {lr_schedule!r}")
    if monitor not in MONITORS:
        raise ValueError(f"parameter 'monitor': expected one of {MONITORS}, got {monitor!r}")
    if not 0.0 <= float(label_smoothing) < 0.5:
        raise ValueError(f"parameter 'label_smoothing': expected a value in [0, 0.5), got {label_smoothing!r}")
    dist = strategy()
    model = build_image_classifier(n_classes, backbone, image_size, weights, dropout=dropout, augment=True,
                                   seed=seed, dist=dist)
    view = backbone_view(model)
    names = backbones.backbone_layer_names(view)
    start = unfreeze_from if unfreeze_from in names else next(
        (n for n in backbones.block_start_layers(view) if n.startswith(f"{unfreeze_from}_")), None)
    if start is None:
        raise ValueError(f"parameter 'unfreeze_from': {unfreeze_from!r} is neither a layer nor a block of {backbone} "
                         f"(blocks start at {backbones.block_start_layers(view)})")
    backbones.unfreeze_top(view, from_layer_name=start)
    for name in HEAD_LAYERS:
        model.get_layer(name).trainable = True
    for layer in model.layers:  # whatever unfreeze_top did: BatchNorm stays frozen (inference mode)
        if is_batchnorm(layer):
            layer.trainable = False
    _compile(model, lr, dist)
    cw = class_weights(train_labels, n_classes) if train_labels is not None else None
    stop = keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=patience, restore_best_weights=True)
    summary = trainable_summary(model)
    return Recipe("regularized", model, callbacks=[stop], class_weight=cw, lr=lr, settings=dict(
        augmentation=True, dropout=float(dropout),
        trainable=f"top of the backbone from {summary['first_trainable_backbone_layer']} + head, BatchNorm frozen",
        early_stopping=f"{monitor}, patience {patience}, restore best weights", monitor=monitor,
        class_weight=cw, optimizer=f"Adam lr={lr:g}" + (", cosine decay" if lr_schedule == "cosine" else ""),
        loss="sparse categorical cross-entropy" + (f", label smoothing {label_smoothing:g}" if label_smoothing else ""),
        linear_probe_epochs=int(linear_probe_epochs), linear_probe_lr=float(linear_probe_lr),
        linear_probe_patience=int(linear_probe_patience), lr_schedule=lr_schedule,
        label_smoothing=float(label_smoothing)))


# --------------------------------------------------------------------------- training
def _epoch_logger_class():
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """One line per epoch on stdout, metrics only (no timings: stable text for notebooks)."""

        def __init__(self, epochs: int, stream=None):
            super().__init__()
            self.epochs, self.stream = epochs, stream

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1") if k in logs]
            text = "  ".join(f"{k} {float(logs[k]):.3f}" for k in keys)
            print(f"epoch {epoch + 1:>2}/{self.epochs}  {text}", file=self.stream or sys.stdout, flush=True)

    return EpochLogger


def train(model, train_ds, val_ds, epochs: int, callbacks=None, class_weight=None, log: bool = True,
          n_train: int | None = None) -> dict:
    """``model.fit`` (``verbose=0``; one line per epoch when ``log``) -> a JSON-ready history dict.

    Keys: the per-epoch lists Keras records (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``),
    ``epochs_run``, ``best_epoch`` (1-based epoch of the best ``val_accuracy``, or of ``fit_history``'s
    ``monitor``), ``restored_best``
    (True when EarlyStopping put the best epoch's weights back, so the model *is* that epoch),
    ``fit_seconds`` and, with ``n_train``, ``train_images_per_s``.
    """
    return fit_history(model, train_ds, epochs, callbacks, log=log, n_train=n_train, validation_data=val_ds,
                       class_weight=class_weight, shuffle=False)  # training datasets shuffle themselves


def check_epochs(epochs) -> int:
    """``epochs`` as an int, or ``ValueError`` naming the parameter."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"parameter 'epochs': expected a positive integer, got {epochs!r}")
    return int(epochs)


def fit_history(model, data, epochs: int, callbacks=None, log: bool = True, n_train: int | None = None,
                started: float | None = None, monitor: str = "val_accuracy", **fit_kwargs) -> dict:
    """``model.fit(data, epochs=epochs, verbose=0, **fit_kwargs)`` -> :func:`train`'s history dict.

    The one place a fit becomes a record, for :func:`train` and :func:`lib.image.cached_finetune.fit_top`.
    ``started``: a ``time.perf_counter()`` value ``fit_seconds`` counts from (default: now), so work
    done for the fit before it (e.g. caching activations) is part of its cost.
    """
    import keras

    check_epochs(epochs)
    cbs = list(callbacks or [])
    if log:
        cbs.append(_epoch_logger_class()(int(epochs)))
    t0 = time.perf_counter() if started is None else started
    h = model.fit(data, epochs=int(epochs), callbacks=cbs, verbose=0, **fit_kwargs)
    seconds = time.perf_counter() - t0
    hist = {k: [float(v) for v in vals] for k, vals in h.history.items()}
    n_run = len(hist.get("loss", []))
    val = hist.get(monitor) or hist.get("val_accuracy")
    restored = any(isinstance(c, keras.callbacks.EarlyStopping) and c.restore_best_weights
                   and c.best_weights is not None for c in cbs)
    hist.update(epochs_run=n_run, best_epoch=int(np.argmax(val)) + 1 if val else n_run,
                restored_best=bool(restored), fit_seconds=round(seconds, 2))
    if n_train:
        hist["train_images_per_s"] = round(n_train * n_run / seconds, 1)
    return hist


def gap(history: dict, epoch: int | None = None) -> float:
    """Train accuracy minus validation accuracy at ``epoch`` (1-based).

    Default: the epoch whose weights the model holds - the best epoch when EarlyStopping restored it
    (``restored_best``), else the last.  Train accuracy is Keras's running value during the epoch, in
    training mode (augmentation and dropout active when the recipe has them).
    """
    if "accuracy" not in history or "val_accuracy" not in history:
        raise ValueError("history: expected 'accuracy' and 'val_accuracy' lists (fit with validation data)")
    if epoch is None:
        epoch = history["best_epoch"] if history.get("restored_best") else len(history["accuracy"])
    i = int(epoch) - 1
    return float(history["accuracy"][i] - history["val_accuracy"][i])


def headline_accuracies(history: dict) -> dict:
    """``train_acc``, ``val_acc``, ``gap`` and the epoch they are read at (see :func:`gap`)."""
    epoch = history["best_epoch"] if history.get("restored_best") else len(history["accuracy"])
    return dict(train_acc=history["accuracy"][epoch - 1], val_acc=history["val_accuracy"][epoch - 1],
                gap=gap(history, epoch), epoch=epoch, best_val_acc=max(history["val_accuracy"]))


def curve_summary(history: dict, val_labels=None) -> dict:
    """What a learning curve says, read off the whole curve (peak and best epoch), not its last point:
    the last epoch of a noisy run can hide a clear overfit, or fake one."""
    tr, va = list(history["accuracy"]), list(history["val_accuracy"])
    vl = list(history.get("val_loss", []))
    out = dict(peak_train_acc=float(max(tr)), peak_train_epoch=int(np.argmax(tr)) + 1,
               best_val_acc=float(max(va)), best_val_epoch=int(np.argmax(va)) + 1,
               last_train_acc=float(tr[-1]), last_val_acc=float(va[-1]), epochs=len(tr))
    if vl:
        out.update(first_val_loss=float(vl[0]), last_val_loss=float(vl[-1]), best_val_loss=float(min(vl)),
                   best_val_loss_epoch=int(np.argmin(vl)) + 1)
    if val_labels is not None and len(val_labels):
        counts = np.unique(np.asarray(val_labels), return_counts=True)[1]
        out["majority_rate"] = float(counts.max() / counts.sum())
    return out


#: accuracy on its own training images (inference mode) from which a network has memorised them; and the
#: drop from training to inference mode on those images that counts as BatchNorm collapse
MEMORISED, COLLAPSE_DROP = 0.9, 0.15
# What each mechanism of :func:`gap_mechanism` means, in the words 02's conclusion and the report's index
# table print (one place: they are read from here, with the key 02 saves in its metrics record)
MECHANISMS = {
    "memorisation": "memorisation: the network fits its training images in inference mode too",
    "batchnorm_collapse": "BatchNorm collapse: in inference mode the training images score far lower, so much of "
                          "the gap is small-batch statistics, not memorisation",
    "both": "both: the training images fit only with batch statistics, yet in inference mode they still score "
            "above validation",
    "underfit": "neither: the network does not fit its own training images in inference mode",
}


def gap_mechanism(accs: dict) -> tuple[str, str]:
    """``(mechanism, verdict)`` from :func:`batchnorm_diagnosis`'s four accuracies; :data:`MECHANISMS` says
    what each mechanism means in one line, and each verdict starts with that line's first words.

    The measured gap (training images in training mode vs validation in inference mode, both scored after
    training; not 02's curve gap of peak training vs best validation) splits into two parts: batch statistics (the same training images, training vs inference mode) and what the
    network memorised (training vs validation images, both in inference mode).  ``"memorisation"``: the
    training images fit in inference mode too; ``"batchnorm_collapse"``: they fall by
    :data:`COLLAPSE_DROP` or more without batch statistics, and that drop is the larger part;
    ``"both"``: they fit only with batch statistics and memorisation is at least as large a part;
    ``"underfit"``: they fit in neither mode.  The verdict always prints both parts.
    """
    tr_inf, tr_bat = accs["train, inference mode"], accs["train, training mode"]
    val_inf = accs["validation, inference mode"]
    parts = (f"the gap of {tr_bat - val_inf:.3f} between training images with batch statistics and validation "
             f"images splits into {tr_bat - tr_inf:.3f} from batch statistics (training images, training vs "
             f"inference mode) and {tr_inf - val_inf:.3f} memorised (training vs validation images, inference mode)")
    if tr_bat < MEMORISED and tr_inf < MEMORISED:
        return "underfit", (f"neither: the network does not fit its own training images in inference mode "
                            f"({tr_inf:.3f}) nor with batch statistics ({tr_bat:.3f}); it has not trained long "
                            "enough to memorise")
    if tr_inf >= MEMORISED:
        return "memorisation", (f"memorisation: the trained network classifies its own training images correctly "
                                f"in inference mode too ({tr_inf:.3f}), while validation images reach {val_inf:.3f}; "
                                + parts)
    if tr_bat - tr_inf >= COLLAPSE_DROP and tr_bat - tr_inf > tr_inf - val_inf:
        return "batchnorm_collapse", (f"BatchNorm collapse: with batch statistics the training images score "
                                      f"{tr_bat:.3f}, with the moving statistics only {tr_inf:.3f}; the moving "
                                      "averages no longer match what the layers see, so part of the train/validation "
                                      "gap is an artefact of small-batch statistics; " + parts)
    return "both", (f"both: with batch statistics the training images score {tr_bat:.3f}, in inference mode "
                     f"{tr_inf:.3f}, and validation images {val_inf:.3f}; " + parts)


def batchnorm_diagnosis(model, train_table, val_table, image_size: int, batch_size: int = 32) -> dict:
    """Tell memorisation from BatchNorm collapse by measurement.

    Scores the training and validation images with the trained weights in inference mode
    (moving BatchNorm statistics, what validation and test see) and in training mode (the
    statistics of each batch, what fit-time accuracy measured).  Training mode would update the
    moving statistics, so the weights are restored afterwards: the model is left as it was.
    """
    from lib.image.input_pipeline import load_images
    from lib.predict import predict

    def acc(table, training):
        # shuffled (seeded) like fit's batches: class-sorted batches would give batch statistics fit never saw
        order = np.random.default_rng(0).permutation(len(table))
        x = load_images(table.iloc[order], image_size)
        y = table["label_idx"].to_numpy()[order]
        return float((predict(model, x, batch_size=batch_size, training=training).argmax(axis=1) == y).mean())

    saved = [w.copy() for w in model.get_weights()]
    try:
        accs = {"train, inference mode": acc(train_table, False), "train, training mode": acc(train_table, True),
                "validation, inference mode": acc(val_table, False),
                "validation, training mode": acc(val_table, True)}
    finally:
        model.set_weights(saved)
    mech, verdict = gap_mechanism(accs)
    return {"accuracies": accs, "mechanism": mech, "verdict": verdict, "n_train": int(len(train_table)),
            "n_val": int(len(val_table))}


# --------------------------------------------------------------------------- evaluation
def predict_probs(model, ds) -> np.ndarray:
    """Class probabilities for a ``tf.data`` dataset built with ``training=False`` (:func:`lib.predict.predict`)."""
    from lib.predict import predict

    return predict(model, ds)


def evaluate(model, ds, table, classes, abnormal_classes, n_boot: int = 200, seed: int = 42,
             group_word: str = "groups") -> dict:
    """Multi-class and binary-risk evaluation of ``model`` on ``ds`` (built from ``table`` unshuffled);
    see :func:`score_probs` for what it returns."""
    probs = predict_probs(model, ds)
    if probs.shape != (len(table), len(list(classes))):
        raise ValueError(f"predictions have shape {probs.shape}, expected ({len(table)}, {len(list(classes))}): "
                         "build the dataset from this table with training=False")
    return score_probs(probs, table, classes, abnormal_classes, n_boot=n_boot, seed=seed, group_word=group_word)


def accuracy(model, table, image_size: int, batch_size: int = 32) -> float:
    """Accuracy of ``model`` on the rows of ``table`` in inference mode (no augmentation, moving BatchNorm
    statistics): how validation and test images are scored."""
    from lib.image.input_pipeline import load_images

    from lib.predict import predict

    pred = predict(model, load_images(table, image_size), batch_size=batch_size).argmax(axis=1)
    return float((pred == table["label_idx"].to_numpy()).mean())


def macro_f1(y, pred, n_labels: int) -> float:
    """Macro-F1 over all ``n_labels`` classes (a class never predicted, or absent, scores 0 rather than
    being dropped): the kit's one definition, for evaluation, intervals and early stopping."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(n_labels)), average="macro", zero_division=0))


def macro_f1_interval(y, pred, groups, n_labels: int, n_boot: int = 1000, seed: int = 42, ci: float = 0.95) -> dict:
    """Percentile-bootstrap interval of macro-F1 that resamples whole groups within each class, so
    images of one cluster or source image count once, as they should."""
    y, pred, groups = np.asarray(y), np.asarray(pred), np.asarray(groups)
    by_class = {}
    for g in dict.fromkeys(groups.tolist()):
        members = np.flatnonzero(groups == g)
        by_class.setdefault(int(y[members[0]]), []).append(members)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([m for groups_c in by_class.values()
                              for k in rng.integers(0, len(groups_c), len(groups_c)) for m in [groups_c[k]]])
        vals.append(macro_f1(y[idx], pred[idx], n_labels))
    a = (1 - ci) / 2
    n_groups = sum(len(v) for v in by_class.values())
    return {"value": macro_f1(y, pred, n_labels),
            "ci_low": float(np.quantile(vals, a)), "ci_high": float(np.quantile(vals, 1 - a)),
            "method": f"{ci:.0%} percentile bootstrap over {n_groups} groups, resampled within class, {n_boot} draws"}


def score_probs(probs, table, classes, abnormal_classes, n_boot: int = 200, seed: int = 42,
                group_word: str = "groups") -> dict:
    """Scores of class probabilities ``probs`` for the rows of ``table``: the one evaluation every image
    model of the kit goes through (fine-tuned or linear probe), intervals resampling ``table['group']``.

    Returns ``n``, ``accuracy``, ``macro_f1`` (+ ``macro_f1_ci``), ``confusion_matrix`` (rows true,
    columns predicted), ``per_class`` (sklearn ``classification_report`` dict), ``abnormal_classes``,
    ``binary`` (:func:`lib.metrics.binary_report` of abnormal score vs abnormal truth with a group
    bootstrap, or ``None`` when the set has only one of the two), and arrays ``y_true``, ``probs``,
    ``abnormal_score``, ``y_abnormal`` (not JSON: see :func:`evaluation_summary`).
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    from lib import metrics

    classes = list(classes)
    unknown = [c for c in abnormal_classes if c not in classes]
    if unknown:
        raise ValueError(f"parameter 'abnormal_classes': {unknown} not among the classes {classes}")
    probs = np.asarray(probs)
    y = table["label_idx"].to_numpy().astype(int)
    groups = table["group"].to_numpy()
    pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    abn_idx = [classes.index(c) for c in abnormal_classes]
    score = probs[:, abn_idx].sum(axis=1) if abn_idx else np.zeros(len(y))
    y_abn = np.isin(y, abn_idx)
    binary = None
    if abn_idx and 0 < y_abn.sum() < len(y_abn):
        binary = metrics.binary_report(y_abn, score, n_boot=n_boot, seed=seed, groups=groups, group_names=group_word)
    return {
        "n": int(len(y)),
        "n_groups": int(len(set(groups.tolist()))),
        "classes": classes,
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": macro_f1(y, pred, len(classes)),
        "macro_f1_ci": macro_f1_interval(y, pred, groups, len(classes), n_boot=n_boot, seed=seed),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "per_class": classification_report(y, pred, labels=labels, target_names=classes, output_dict=True,
                                           zero_division=0),
        "abnormal_classes": list(abnormal_classes),
        "binary": binary,
        "y_true": y, "probs": probs, "abnormal_score": score, "y_abnormal": y_abn,
    }


def comparison_table(evals: dict):
    """One row per image model (fine-tuned, linear probe, ...): macro-F1 and abnormal AUC with intervals."""
    import pandas as pd

    rows = {}
    for name, ev in evals.items():
        b = ev["binary"] or {}
        auc = b.get("auc", {})
        rows[name] = {"macro_f1": ev["macro_f1"], "macro_f1_low": ev["macro_f1_ci"]["ci_low"],
                      "macro_f1_high": ev["macro_f1_ci"]["ci_high"], "abnormal_auc": auc.get("value"),
                      "auc_low": auc.get("ci_low"), "auc_high": auc.get("ci_high"), "accuracy": ev["accuracy"],
                      "n_test": ev["n"], "test_groups": ev["n_groups"]}
    return pd.DataFrame(rows).T


def evaluation_summary(ev: dict) -> dict:
    """``evaluate``'s result without the per-image arrays (for metrics JSON)."""
    return {k: v for k, v in ev.items() if not isinstance(v, np.ndarray)}


def per_class_table(ev: dict):
    """Per-class precision / recall / F1 / support as a DataFrame (rows: classes, then macro/weighted avg)."""
    import pandas as pd

    rep = ev["per_class"]
    rows = {k: v for k, v in rep.items() if isinstance(v, dict)}
    df = pd.DataFrame(rows).T[["precision", "recall", "f1-score", "support"]]
    df["support"] = df["support"].astype(int)
    return df.round(3)


# --------------------------------------------------------------------------- figures (returned, not saved)
def plot_learning_curves(histories: dict, title: str | None = None):
    """Accuracy and loss per epoch for ``{run name: history}``; train solid, validation dashed."""
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        ep = np.arange(1, len(h["accuracy"]) + 1)
        ax_acc.plot(ep, h["accuracy"], "-o", ms=3, color=color, label=f"{name}: train")
        ax_acc.plot(ep, h["val_accuracy"], "--o", ms=3, color=color, label=f"{name}: validation")
        ax_loss.plot(ep, h["loss"], "-o", ms=3, color=color, label=f"{name}: train")
        ax_loss.plot(ep, h["val_loss"], "--o", ms=3, color=color, label=f"{name}: validation")
        if h.get("kept_linear_probe"):  # no fine-tuning epoch won: the model is the head-only stage
            ax_acc.axhline(max(h["linear_probe"]["val_accuracy"]), color=color, lw=0.8, ls=":",
                           label=f"{name}: head-only stage kept (validation)")
        elif h.get("restored_best"):
            ax_acc.axvline(h["best_epoch"], color=color, lw=0.8, ls=":", label=f"{name}: restored epoch")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    ax_loss.set(xlabel="epoch", ylabel="loss (cross-entropy)", title="Loss")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_loss.legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm, classes, title: str | None = None):
    """Counts with row percentages (recall per true class); rows true, columns predicted."""
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 2))
    ax.imshow(pct, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n{pct[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if pct[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), classes, rotation=35, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix (count, % of true class)")
    ax.grid(False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- saving
def save_model(model, path) -> Path:
    """Save as ``.keras`` atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"model path {str(path)!r}: expected a '.keras' file")
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path


def load_model(path):
    """Load a saved image branch (augmentation layers included; inactive at inference)."""
    import keras

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image branch model {str(path)!r} not found: run notebooks/03_image_branch.ipynb")
    import warnings

    with warnings.catch_warnings():
        # the optimizer state is not needed to predict or explain; Keras warns with its own file path
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer", category=UserWarning)
        return keras.saving.load_model(path)
