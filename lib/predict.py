"""The one batched forward pass of the kit: ``model(x, training=...)`` in batches, as NumPy.

A direct call rather than ``model.predict``: no per-model ``tf.function`` tracing (seconds each on
these machines), no retracing warnings when many small models are evaluated, and none of
``tf.data``'s log lines (TF 2.21 logs a timestamped ``node_def_util ... use_unbounded_threadpool``
line from ``predict``, noise that breaks nbval).  Every module that scores images or pairs calls it.
"""
from __future__ import annotations

import numpy as np


def predict(model, x, batch_size: int | None = None, training: bool = False) -> np.ndarray:
    """Outputs of ``model`` for ``x``: an array, a list of arrays (inputs in the model's order), a dict
    of arrays by input name, or a ``tf.data.Dataset`` of ``(inputs, ...)`` or ``inputs`` batches.

    ``batch_size`` defaults to 32 when an input is a batch of images (eager EfficientNet at 224 px
    holds every activation of the batch: about 20 GB for 256 images, 3.4 GB for 32) and 1024
    otherwise.  ``training=True`` uses batch statistics in BatchNormalization (and updates its moving
    averages: callers that do this restore the weights afterwards).
    """
    if hasattr(x, "element_spec"):  # a tf.data.Dataset: its own batches
        outs = []
        for batch in x:
            xb = batch[0] if isinstance(batch, tuple) else batch
            outs.append(np.asarray(model(xb, training=training)))
        return np.concatenate(outs, axis=0)
    if isinstance(x, dict):
        names = list(x)
        xs = [x[k] for k in names]
    else:
        names = None
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
    if batch_size is None:
        batch_size = 32 if any(np.ndim(a) == 4 for a in xs) else 1024
    n = len(xs[0])
    outs = []
    for i in range(0, n, int(batch_size)):
        part = [np.asarray(a[i:i + batch_size], "float32") for a in xs]
        if names is not None:
            feed = dict(zip(names, part)) if len(part) > 1 else part[0]
        else:
            feed = part if len(part) > 1 else part[0]
        outs.append(np.asarray(model(feed, training=training)))
    return np.concatenate(outs, axis=0)
