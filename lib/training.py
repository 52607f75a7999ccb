"""The one early-stopping training loop for binary models on in-memory arrays.

Used by the tabular MLP (notebook 04: every cross-validation fold and the saved branch) and by every
fusion head (notebook 05).  The image branch is trained with ``keras.Model.fit`` on a tf.data
stream instead (:mod:`lib.image.image_model`), as keras-io teaches it; these models are too small
for that: ``fit`` spends ~0.2-0.4 s per epoch on iterators and callbacks plus seconds of tracing per
new model, when one epoch of a head needs ~10 ms and cross-validation trains dozens of models for
up to 200 epochs.

What one :meth:`BinaryTrainer.fit` does is what ``model.fit(..., class_weight=balanced,
callbacks=[EarlyStopping(monitor, patience, restore_best_weights=True)])`` does: binary cross-entropy
with balanced class weights ``n / (2 * n_class)`` of the training rows (sum over the batch / batch
size, also in the validation loss), the model's compiled optimizer, a seeded shuffle per epoch,
dropout and BatchNorm in training mode (layers set ``trainable=False`` stay in inference mode), the
best epoch's weights restored.  The whole epoch runs inside one traced ``tf.function``, traced once
per trainer; :meth:`BinaryTrainer.reset` reinitialises the same model for another fold without
tracing again.
"""
from __future__ import annotations

import numpy as np

from lib import metrics

MONITORS = ("val_loss", "val_auc")


def class_weights(y) -> dict:
    """Balanced class weights ``n / (2 * n_class)`` for 0/1 labels."""
    y = np.asarray(y).astype(int)
    n, n1 = len(y), int(y.sum())
    if n1 == 0 or n1 == n:
        raise ValueError(f"y: expected both classes to compute class weights, got {n1} positives of {n}")
    return {0: n / (2 * (n - n1)), 1: n / (2 * n1)}


def check_fit_args(epochs, patience, monitor) -> None:
    """Clear errors naming the parameter, before any training."""
    for name, value in (("epochs", epochs), ("patience", patience)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"parameter {name!r}: expected a positive integer, got {value!r}")
    if monitor not in MONITORS:
        raise ValueError(f"parameter 'monitor': expected one of {MONITORS}, got {monitor!r}")


def _as_inputs(x) -> list:
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    return [np.asarray(a, "float32").reshape(len(a), -1) for a in xs]


class BinaryTrainer:
    """Trains one compiled binary Keras model (sigmoid output) in place, early-stopping on validation.

    ``model`` takes one input or a list of inputs; ``fit`` gets arrays in the same order.
    """

    def __init__(self, model, batch_size: int = 32):
        import keras
        import tensorflow as tf

        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"parameter 'batch_size': expected a positive integer, got {batch_size!r}")
        if model.optimizer is None:
            raise ValueError(f"model {model.name!r}: expected a compiled model (an optimizer to train with)")
        self.model, self.batch_size = model, int(batch_size)
        opt = model.optimizer
        opt.build(model.trainable_variables)
        self._opt_init = [v.numpy() for v in opt.variables]
        single = len(model.inputs) == 1
        spec = [tf.TensorSpec((None, int(t.shape[-1])), tf.float32) for t in model.inputs]
        bs = self.batch_size

        def forward(xs, training):
            return tf.reshape(model(xs[0] if single else xs, training=training), [-1])

        @tf.function(input_signature=[spec, tf.TensorSpec((None,), tf.float32), tf.TensorSpec((None,), tf.float32),
                                      tf.TensorSpec((None,), tf.int32)])
        def train_epoch(xs, y, w, perm):
            n_batches = (tf.shape(perm)[0] + bs - 1) // bs
            total = tf.constant(0.0)
            for i in tf.range(n_batches):
                idx = perm[i * bs:(i + 1) * bs]
                yb, wb = tf.gather(y, idx), tf.gather(w, idx)
                with tf.GradientTape() as tape:
                    p = forward([tf.gather(a, idx) for a in xs], True)
                    per_row = keras.losses.binary_crossentropy(yb[:, None], p[:, None])
                    loss = tf.reduce_sum(per_row * wb) / tf.cast(tf.size(yb), tf.float32)
                grads = tape.gradient(loss, model.trainable_variables)
                opt.apply(grads, model.trainable_variables)
                total += loss
            return total / tf.cast(n_batches, tf.float32)

        @tf.function(input_signature=[spec])
        def infer(xs):
            return forward(xs, False)

        self._train_epoch, self._infer = train_epoch, infer

    def predict(self, x) -> np.ndarray:
        """Scores (float64, 1-d) in inference mode."""
        return self._infer(_as_inputs(x)).numpy().astype("float64")

    def reset(self, fresh_model) -> None:
        """Load ``fresh_model``'s variables (weights, BatchNorm statistics, dropout seed states) into the
        trained model and zero the optimizer, so the next :meth:`fit` starts as on a new model built
        by the same code, without tracing again."""
        mine = [tuple(v.shape) for v in self.model.variables]
        new = [tuple(v.shape) for v in fresh_model.variables]
        if new != mine:
            raise ValueError(f"fresh model {fresh_model.name!r}: its variables ({len(new)}) do not match the "
                             f"trainer's model's ({len(mine)}) in number or shape; build it with the same code")
        for var, new in zip(self.model.variables, fresh_model.variables):
            var.assign(new.value)
        for var, init in zip(self.model.optimizer.variables, self._opt_init):
            var.assign(init)

    def fit(self, x_tr, y_tr, x_va=None, y_va=None, epochs: int = 100, seed: int = 42, patience: int = 20,
            monitor: str = "val_loss") -> dict:
        """Train for at most ``epochs``; with validation data stop after ``patience`` epochs without a
        strictly better ``monitor`` and restore the best epoch's weights (without it, train all epochs).

        Returns ``epochs_run``, ``best_epoch`` (1-based), ``monitor``, ``best_val_loss``,
        ``best_val_auc`` (None without validation data or with one class in it) and ``history``
        (``loss``, ``val_loss``, ``val_auc`` per epoch).
        """
        check_fit_args(epochs, patience, monitor)
        xs = _as_inputs(x_tr)
        y = np.asarray(y_tr, "float32").reshape(-1)
        if any(len(a) != len(y) for a in xs):
            raise ValueError(f"x_tr: expected {len(y)} rows per input (one per label), got {[len(a) for a in xs]}")
        cw = class_weights(y)
        w = np.where(y > 0.5, cw[1], cw[0]).astype("float32")
        has_val = x_va is not None
        if has_val:
            xv = _as_inputs(x_va)
            yv = np.asarray(y_va).astype("int64").reshape(-1)
            wv = np.where(yv > 0, cw[1], cw[0])
            both = 0 < yv.sum() < len(yv)
        rng = np.random.default_rng(seed)
        hist = {"loss": [], "val_loss": [], "val_auc": []}
        best, best_epoch, best_weights, wait = -np.inf, 0, None, 0
        for epoch in range(int(epochs)):
            loss = self._train_epoch(xs, y, w, rng.permutation(len(y)).astype("int32"))
            hist["loss"].append(float(loss))
            if not has_val:
                continue
            p = np.clip(self.predict(xv), 1e-7, 1 - 1e-7)
            val_loss = float(-np.mean(wv * (yv * np.log(p) + (1 - yv) * np.log(1 - p))))
            val_auc = metrics.roc_auc(yv, p) if both else None
            hist["val_loss"].append(val_loss)
            hist["val_auc"].append(val_auc)
            value = -val_loss if monitor == "val_loss" else (-np.inf if val_auc is None else val_auc)
            if value > best:  # strictly better, as keras.callbacks.EarlyStopping (min_delta=0)
                best, best_epoch, best_weights, wait = value, epoch, self.model.get_weights(), 0
            else:
                wait += 1
                if wait >= patience:
                    break
        if best_weights is not None:
            self.model.set_weights(best_weights)
        else:
            best_epoch = len(hist["loss"]) - 1
        return {"epochs_run": len(hist["loss"]), "best_epoch": best_epoch + 1, "monitor": monitor,
                "best_val_loss": hist["val_loss"][best_epoch] if has_val else None,
                "best_val_auc": hist["val_auc"][best_epoch] if has_val else None, "history": hist}


def fit_binary(model, x_tr, y_tr, x_va=None, y_va=None, epochs: int = 100, seed: int = 42, batch_size: int = 32,
               patience: int = 20, monitor: str = "val_loss") -> dict:
    """Train ``model`` once with a new :class:`BinaryTrainer` (see there); returns its ``info``."""
    return BinaryTrainer(model, batch_size).fit(x_tr, y_tr, x_va, y_va, epochs, seed, patience, monitor)
