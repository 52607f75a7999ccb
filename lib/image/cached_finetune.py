"""Fine-tune the top blocks of the image branch on cached activations of its frozen bottom.

Why: in the regularized recipe blocks 1-6b are frozen and their BatchNorm runs in inference mode,
so for a given (augmented) image their output never changes during training.  Recomputing it every
epoch is ~80 % of an epoch's time on a CPU.  Here it is computed once per *view* and the trainable
top (the remaining blocks, ``top_conv`` and the head) is trained on those activations:

    image -> [augmentation, training=True]  -> view k of the image            (K random views, drawn once)
          -> frozen bottom (training=False)  -> activation at the cut, cached  (K x n_train arrays)
    cached activation -> trainable top (the model's own layers) -> class_probs  (``fit``, epochs cycle views)

The top is a ``keras.Model`` over the *same layer objects* as the image branch, so training it
trains the image branch itself: the saved model is the usual flat graph with its augmentation
layers (inactive at inference), usable by Grad-CAM and the fusion notebook unchanged.

What differs from end-to-end ``fit``: augmentation is drawn ``views`` times per image up front
("offline augmentation") instead of afresh every epoch; each epoch shows every training image once,
in one of its views (a seeded random choice per image and epoch).  Dropout, frozen BatchNorm,
class weights, Adam and early stopping on validation accuracy with best weights restored are as
in :func:`lib.image.image_model.regularized_recipe`.  Validation images are not augmented.

Options of the recipe read here (``recipe.settings``): ``linear_probe_epochs`` > 0 first trains the
head alone on pooled features of the cached views through the still-frozen top blocks (cheap: no
convolution is trained), then fine-tunes top blocks + head (linear-probe-then-fine-tune, Kumar et al.,
ICLR 2022); ``lr_schedule`` (constant or cosine) and ``label_smoothing`` apply to the fine-tuning.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from lib.image.input_pipeline import make_dataset

DEFAULT_VIEWS = 6  # lib.config.PROFILES augmented_views: chosen on LBC validation (benchmarks/bench_finetune_lbc.py)


def split_model(model):
    """``(augmenter, bottom, top, cut_layer)`` of a regularized image branch.

    ``cut_layer`` is the first trainable backbone layer; ``bottom`` maps the backbone's input (after
    augmentation) to that layer's input and must be entirely frozen; ``top`` maps that tensor to
    ``class_probs`` and shares its layers with ``model``; ``augmenter`` holds the ``aug_*`` layers
    (``None`` when the model has none).  Raises ``ValueError`` when nothing is trainable or a
    connection bypasses the cut.
    """
    import keras

    from lib.image.image_model import trainable_summary

    cut_name = trainable_summary(model)["first_trainable_backbone_layer"]
    if cut_name is None:
        raise ValueError(f"model {model.name!r}: no trainable backbone layer - nothing to fine-tune")
    layers = model.layers
    names = [layer.name for layer in layers]
    aug = [layer for layer in layers if layer.name.startswith("aug_")]
    after_aug = layers[names.index(aug[-1].name) + 1] if aug else layers[1]
    bottom_in = after_aug.input
    cut_tensor = model.get_layer(cut_name).input
    if isinstance(cut_tensor, (list, tuple)):
        raise ValueError(f"layer {cut_name!r} has several inputs: cannot cut the model there")
    bottom = keras.Model(bottom_in, cut_tensor, name="frozen_bottom")  # frozen: the cut is the first trainable layer
    try:
        top = keras.Model(cut_tensor, model.output, name="trainable_top")
    except ValueError as exc:  # a skip connection crosses the cut
        raise ValueError(f"cannot cut {model.name!r} at {cut_name!r}: {exc}") from exc
    augmenter = keras.Sequential(aug, name="augmenter") if aug else None
    return augmenter, bottom, top, cut_name


def compute_views(augmenter, bottom, table, image_size: int, batch_size: int, views: int,
                  progress: bool = True) -> np.ndarray:
    """Bottom activations of every row of ``table``: ``(views, n, *cut_shape)`` float32.

    ``views=0`` means the clean images only (no augmentation; what validation uses), returned with a
    leading axis of 1.  Each view draws fresh augmentation from the ``augmenter``'s layers, whose
    seeds are fixed when the model is built (so a rerun draws the same views).
    """
    import tensorflow as tf
    from tqdm import tqdm

    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 0:
        raise ValueError(f"parameter 'views': expected an integer >= 0, got {views!r}")
    clean = views == 0 or augmenter is None
    n_views = 1 if clean else int(views)
    spec = tf.TensorSpec((None, int(image_size), int(image_size), 3), tf.float32)
    if clean:
        run = tf.function(lambda x: bottom(x, training=False), input_signature=[spec])
    else:
        run = tf.function(lambda x: bottom(augmenter(x, training=True), training=False), input_signature=[spec])
    ds = make_dataset(table, image_size, batch_size, training=False, labels=False, cache=n_views > 1)
    n_batches = -(-len(table) // batch_size)
    out = None
    with tqdm(total=n_views * n_batches, desc=f"frozen bottom, {n_views} view(s)" if not clean else
              "frozen bottom, clean images", unit="batch", file=sys.stderr, disable=not progress,
              mininterval=1.0) as bar:
        for v in range(n_views):
            i = 0
            for batch in ds:
                act = run(batch).numpy()
                if out is None:
                    out = np.empty((n_views, len(table), *act.shape[1:]), np.float32)
                out[v, i:i + len(act)] = act
                i += len(act)
                bar.update(1)
    return out


def _view_sequence_class():
    import keras

    class ViewSequence(keras.utils.PyDataset):
        """One epoch = every image once, each in a view chosen at random (seeded by epoch), shuffled."""

        def __init__(self, acts, labels, batch_size, sample_weight, seed):
            super().__init__()
            self.acts, self.labels, self.bs = acts, np.asarray(labels, np.int32), int(batch_size)
            self.sw, self.seed, self.epoch = sample_weight, int(seed), 0
            self._draw()

        def _draw(self):
            rng = np.random.default_rng([self.seed, self.epoch])
            n = self.acts.shape[1]
            self.order = rng.permutation(n)
            self.view = rng.integers(0, self.acts.shape[0], size=n)

        def __len__(self):
            return -(-self.acts.shape[1] // self.bs)

        def __getitem__(self, i):
            idx = self.order[i * self.bs:(i + 1) * self.bs]
            x = self.acts[self.view[idx], idx]
            if self.sw is None:
                return x, self.labels[idx]
            return x, self.labels[idx], self.sw[idx]

        def on_epoch_end(self):
            self.epoch += 1
            self._draw()

    return ViewSequence


def cache_activations(recipe, train_table, val_table, image_size: int, batch_size: int, views: int = DEFAULT_VIEWS,
                      progress: bool = True) -> dict:
    """The frozen bottom's activations for :func:`fit_top`: ``train`` ``(views, n_train, ...)``, ``val``
    ``(n_val, ...)``, ``cut_layer``, ``views`` and ``cache_seconds``.

    Why separate: recipes with the same backbone weights, cut and seed draw the same views, so an
    ablation computes them once and hands them to every variant (``fit_top(..., activations=...)``).
    """
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ValueError(f"parameter 'views': expected an integer >= 1 (augmented views per image), got {views!r}")
    augmenter, bottom, _, cut = split_model(recipe.model)
    t0 = time.perf_counter()
    train_acts = compute_views(augmenter, bottom, train_table, image_size, batch_size, views, progress)
    val_acts = compute_views(augmenter, bottom, val_table, image_size, batch_size, 0, progress)[0]
    return {"train": train_acts, "val": val_acts, "cut_layer": cut, "views": int(views),
            "cache_seconds": round(time.perf_counter() - t0, 2)}


def _loss(n_classes: int, label_smoothing: float):
    """Sparse cross-entropy, or with ``label_smoothing`` > 0 cross-entropy on smoothed one-hot targets
    (Keras's sparse loss has no smoothing); the targets stay integer class indices either way."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    import keras

    def smoothed_crossentropy(y_true, y_pred):
        idx = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        return keras.losses.categorical_crossentropy(keras.ops.one_hot(idx, n_classes), y_pred,
                                                     label_smoothing=float(label_smoothing))

    return smoothed_crossentropy


def _compile_stage(model, lr, n_classes: int, label_smoothing: float = 0.0, schedule: str = "constant",
                   total_steps: int = 1) -> None:
    """Adam at ``lr`` (constant, or cosine decay to 0 over ``total_steps``), under the recipe's strategy."""
    import keras

    from lib.image.image_model import strategy

    if schedule not in ("constant", "cosine"):
        raise ValueError(f"parameter 'lr_schedule': expected 'constant' or 'cosine', got {schedule!r}")
    with strategy().scope():
        rate = lr if schedule == "constant" else keras.optimizers.schedules.CosineDecay(
            float(lr), decay_steps=max(1, int(total_steps)))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=rate), loss=_loss(n_classes, label_smoothing),
                      metrics=["accuracy"], jit_compile=False)


def pooled_features(model, acts: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``avg_pool`` features of cached cut activations ``(..., *cut_shape)`` through the model's own (still
    frozen-for-this-stage) top blocks, in inference mode; leading axes are kept.

    Why :func:`lib.predict.predict` (one traced ``tf.function``): called eagerly, the deep cut (block 3a,
    32x32 activations at 128 px) held about 17 MB per image in flight, and batches of 256 took 03's kernel
    from 0.9 to 5.1 GB in this stage alone; as one traced graph the same batches peak at 1.3 GB and run
    about 2x faster (``benchmarks/bench_finetune_memory.py``)."""
    import keras

    from lib.predict import predict

    cut = split_model(model)[3]
    pool = keras.Model(model.get_layer(cut).input, model.get_layer("avg_pool").output, name="top_blocks_pooled")
    out = predict(pool, acts.reshape((-1,) + acts.shape[-3:]), batch_size=batch_size)  # one traced graph
    return out.reshape(acts.shape[:-3] + out.shape[1:])


def _macro_f1_callback_class():
    import keras

    class ValMacroF1(keras.callbacks.Callback):
        """Adds ``val_macro_f1`` (scikit-learn, every class counted) to each epoch's logs, before early stopping
        reads them: it must stand before the EarlyStopping callback in the list."""

        def __init__(self, x, y, n_classes: int, batch_size: int):
            super().__init__()
            self.x, self.y, self.n_classes, self.batch_size = x, y, n_classes, batch_size

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["val_macro_f1"] = val_macro_f1(self.model, self.x, self.y, self.n_classes, self.batch_size)

    return ValMacroF1


def val_macro_f1(model, x, y, n_classes: int, batch_size: int = 256) -> float:
    """:func:`lib.image.image_model.macro_f1` of ``model``'s argmax on ``(x, y)``."""
    from lib.image.image_model import macro_f1
    from lib.predict import predict

    return macro_f1(y, predict(model, x, batch_size=batch_size).argmax(axis=1), n_classes)


def linear_probe_stage(recipe, train_acts, y, val_acts, y_val, batch_size: int, sw=None, seed: int = 42,
                       log: bool = False) -> dict:
    """LP of LP-FT (Kumar et al., ICLR 2022): train the head alone on the frozen backbone's pooled features.

    Why: a randomly initialised head sends large, random gradients into the pretrained top blocks in
    the first epochs and distorts the features before the head is any good; fitting the head first
    (cheap: pooled 1280-d vectors, no convolution) means fine-tuning starts from a sensible head.
    The head's epochs are ``recipe.settings['linear_probe_epochs']`` (upper bound: early stopping on
    validation accuracy, best weights restored) at Adam ``linear_probe_lr``.
    """
    import keras

    from lib.image.image_model import fit_history

    opts = recipe.settings
    model = recipe.model
    head = keras.Model(model.get_layer("avg_pool").output, model.output, name="head_only")
    t0 = time.perf_counter()
    f_train = pooled_features(model, train_acts)
    f_val = pooled_features(model, val_acts)
    n_classes = int(model.output.shape[-1])
    seq = _view_sequence_class()(f_train, y, batch_size, sw, seed + 1)
    _compile_stage(head, opts["linear_probe_lr"], n_classes, opts.get("label_smoothing", 0.0))
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=int(opts["linear_probe_patience"]),
                                         restore_best_weights=True)
    hist = fit_history(head, seq, int(opts["linear_probe_epochs"]), [stop], log=log, n_train=len(y), started=t0,
                       validation_data=(f_val, y_val), validation_batch_size=batch_size)
    return hist


def fit_top(recipe, train_table, val_table, image_size: int, batch_size: int, epochs: int,
            views: int = DEFAULT_VIEWS, seed: int = 42, log: bool = True, progress: bool = True,
            activations: dict | None = None) -> dict:
    """Train ``recipe.model`` (a :func:`lib.image.image_model.regularized_recipe`) through its cached bottom.

    With ``recipe.settings['linear_probe_epochs']`` > 0 this is linear-probe-then-fine-tune: the head is
    first trained alone on pooled frozen features (:func:`linear_probe_stage`), then the top blocks and
    the head are fine-tuned at ``recipe.lr`` (lower than the head's), optionally on a cosine schedule
    (``lr_schedule``) and with ``label_smoothing``.  ``activations``: :func:`cache_activations`' result
    for the same model cut and tables, reused instead of recomputed (its first ``views`` views are used).

    Returns the same history dict as :func:`lib.image.image_model.train` plus ``views``, ``cut_layer``,
    ``cache_seconds`` (computing the views) and ``cache_mb``, and ``linear_probe`` (the head stage's
    history) when it ran; ``fit_seconds`` covers everything done here (not activations passed in).

    When the head-only stage ran and no fine-tuning epoch reached its validation score (the recipe's
    ``monitor``: accuracy, or macro-F1 computed each epoch), the head-only weights are put back
    (``kept_linear_probe`` True).  Why: early stopping restores the best
    *fine-tuning* epoch, which can be worse than where fine-tuning started; the start is a candidate too,
    judged on the same validation split.
    """
    from lib.image.image_model import check_epochs, fit_history

    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ValueError(f"parameter 'views': expected an integer >= 1 (augmented views per image), got {views!r}")
    check_epochs(epochs)  # before minutes of caching, not after
    _, _, top, cut = split_model(recipe.model)
    t0 = time.perf_counter()
    if activations is None:
        activations = cache_activations(recipe, train_table, val_table, image_size, batch_size, views, progress)
    else:
        problem = (f"cut at {activations.get('cut_layer')!r}, model cut at {cut!r}" if activations.get("cut_layer") != cut
                   else f"{activations['train'].shape[0]} views, {views} asked" if activations["train"].shape[0] < views
                   else f"{activations['train'].shape[1]}/{len(activations['val'])} rows, tables have "
                        f"{len(train_table)}/{len(val_table)}"
                   if (activations["train"].shape[1], len(activations["val"])) != (len(train_table), len(val_table))
                   else None)
        if problem:
            raise ValueError(f"parameter 'activations': computed for another model or table ({problem})")
    train_acts, val_acts = activations["train"][:views], activations["val"]
    cache_s = float(activations["cache_seconds"])
    y = train_table["label_idx"].to_numpy().astype(np.int32)
    y_val = val_table["label_idx"].to_numpy().astype(np.int32)
    cw = recipe.class_weight
    sw = None if cw is None else np.asarray([cw[int(c)] for c in y], np.float32)
    opts = recipe.settings
    n_classes = int(recipe.model.output.shape[-1])
    monitor = opts.get("monitor", "val_accuracy")
    lp = lp_weights = None
    if int(opts.get("linear_probe_epochs") or 0) > 0:
        lp = linear_probe_stage(recipe, train_acts, y, val_acts, y_val, batch_size, sw, seed, log=False)
        lp_weights = top.get_weights()  # the head-only result: fine-tuning must beat it on validation to replace it
        lp["start_score"] = (max(lp["val_accuracy"]) if monitor == "val_accuracy"
                             else val_macro_f1(top, val_acts, y_val, n_classes, batch_size))
        if log:
            print(f"linear probe (head only, frozen features): best validation accuracy "
                  f"{max(lp['val_accuracy']):.3f} at epoch {lp['best_epoch']} of {lp['epochs_run']}"
                  + ("" if monitor == "val_accuracy" else f"; validation macro-F1 {lp['start_score']:.3f}"))
    seq = _view_sequence_class()(train_acts, y, batch_size, sw, seed)
    _compile_stage(top, recipe.lr, n_classes, opts.get("label_smoothing", 0.0), opts.get("lr_schedule", "constant"),
                   total_steps=int(epochs) * len(seq))
    callbacks = list(recipe.callbacks)
    if monitor == "val_macro_f1":  # computed first, so early stopping finds it in the epoch's logs
        callbacks.insert(0, _macro_f1_callback_class()(val_acts, y_val, n_classes, batch_size))
    hist = fit_history(top, seq, epochs, callbacks, log=log, n_train=len(y), started=t0, monitor=monitor,
                       validation_data=(val_acts, y_val), validation_batch_size=batch_size)
    hist.update(cache_seconds=round(cache_s, 2), views=int(views), cut_layer=cut,
                cache_mb=round((train_acts.nbytes + val_acts.nbytes) / 2**20, 3))
    if lp is not None:
        hist["linear_probe"] = lp
        hist["kept_linear_probe"] = keep = bool(max(hist[monitor]) < lp["start_score"])
        if keep:  # early stopping's epoch 0 is the head-only stage: never hand back something worse than it
            top.set_weights(lp_weights)
            if log:
                print(f"fine-tuning never reached the head-only stage's {monitor} "
                      f"({max(hist[monitor]):.3f} < {lp['start_score']:.3f}): its weights are kept")
    return hist
