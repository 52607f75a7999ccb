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
"""
from __future__ import annotations

import sys
import time

import numpy as np

from lib.image.input_pipeline import make_dataset

DEFAULT_VIEWS = 3


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


def fit_top(recipe, train_table, val_table, image_size: int, batch_size: int, epochs: int,
            views: int = DEFAULT_VIEWS, seed: int = 42, log: bool = True, progress: bool = True) -> dict:
    """Train ``recipe.model`` (a :func:`lib.image.image_model.regularized_recipe`) through its cached bottom.

    Returns the same history dict as :func:`lib.image.image_model.train` plus ``views``, ``cut_layer``,
    ``cache_seconds`` (computing the views) and ``cache_mb``; ``fit_seconds`` covers both.
    """
    from lib.image.image_model import _compile, check_epochs, fit_history

    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ValueError(f"parameter 'views': expected an integer >= 1 (augmented views per image), got {views!r}")
    check_epochs(epochs)  # before minutes of caching, not after
    augmenter, bottom, top, cut = split_model(recipe.model)
    t0 = time.perf_counter()
    train_acts = compute_views(augmenter, bottom, train_table, image_size, batch_size, views, progress)
    val_acts = compute_views(augmenter, bottom, val_table, image_size, batch_size, 0, progress)[0]
    cache_s = time.perf_counter() - t0
    y = train_table["label_idx"].to_numpy().astype(np.int32)
    cw = recipe.class_weight
    sw = None if cw is None else np.asarray([cw[int(c)] for c in y], np.float32)
    seq = _view_sequence_class()(train_acts, y, batch_size, sw, seed)
    _compile(top, recipe.lr)  # under the model's distribution strategy, like the recipe's own compile
    val = (val_acts, val_table["label_idx"].to_numpy().astype(np.int32))
    hist = fit_history(top, seq, epochs, recipe.callbacks, log=log, n_train=len(y), started=t0,
                       validation_data=val, validation_batch_size=batch_size)
    hist.update(cache_seconds=round(cache_s, 2), views=int(views), cut_layer=cut,
                cache_mb=round((train_acts.nbytes + val_acts.nbytes) / 2**20, 3))
    return hist
