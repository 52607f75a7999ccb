"""Late fusion: the image branch's 512-d embedding + a 64-d tabular embedding -> one risk score.

The model is the original's: image embedding (``image_embedding``, Dense 512 of the image branch)
and tabular embedding (``tabular_embedding``, Dense 64 of an MLP on the preprocessed risk factors)
are concatenated and fed to a fully connected classifier with a sigmoid output named ``risk``;
binary cross-entropy, Adam lr 1e-4, dropout 0.3 in both branches, balanced class weights, early
stopping on the validation loss with the best weights restored (the original stopped on validation
accuracy, which hardly moves when one class dominates).  Each branch first learns from its own data:
the image branch in notebook 03, the tabular branch in notebook 04 (:func:`lib.tabular.mlp.fit_branch`, on
the UCI training records); the fusion heads keep the tabular tower frozen and learn how to combine the two embeddings
from the pairs of :mod:`lib.fusion.pairing`.  The saved model is **one flat Keras functional graph** with two inputs,
``image`` (raw 0..255 RGB) and ``tabular`` (features from the saved preprocessor); the image
branch's layers, ``top_activation`` included, sit directly in it, so Grad-CAM can reach them.

Two training modes (:data:`TRAINING_MODES`):

``"end_to_end"``
    :func:`build_fusion_model` puts the head on the image branch's ``image_embedding`` tensor and
    the whole graph is fitted on images + tabular features (augmentation active, the image branch's
    trainable layers updated).  Costs a backbone pass per image per epoch: 20-75 img/s on a CPU.
``"cached_embeddings"``
    The image branch is frozen: its 512-d embedding is computed once per image
    (:func:`image_embeddings`), a head with an ``image_features`` input is trained on those
    (:func:`build_head`, :func:`fit_head`; thousands of samples/s), and :func:`assemble` then builds
    the flat two-input graph from the image branch's layers and the same head graph carrying **the
    trained head's weights** (copied layer by layer).  The assembled model gives the same predictions
    as the head on the cached embeddings (tested).  The image branch is not changed in this mode.

Head kinds (:data:`KINDS`) give the ablation: ``"image"`` (image embedding only), ``"tabular"``
(tabular MLP only), ``"fused"`` (concatenation, the original) and ``"attention"`` (the original's
future work: both embeddings projected to a common size, a small gate gives per-sample softmax
weights over the two modalities, the weighted sum goes to the classifier; :func:`attention_weights`
reads the weights out).  :func:`run_ablation` trains them on the pairings of :mod:`lib.fusion.pairing`,
:func:`ablation_table` and :func:`plot_ablation` show the result.

Saving (:func:`save_hybrid`): ``hybrid_cervical_model.keras`` first, then
``hybrid_cervical_model.h5`` (the original's format) from a clean reload of the ``.keras`` file
(saving to ``.h5`` drops the optimizer of the model it saves; DESIGN.md section 6), both
atomically, plus the tabular preprocessor JSON and a JSON model card.  :func:`load_hybrid` reloads
either file (``.h5`` with ``compile=False``, then recompiled).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib import metrics
from lib.atomic import atomic_path, write_json
from lib.tabular import mlp
from lib.training import check_fit_args, fit_binary

IMAGE_INPUT, TABULAR_INPUT, FEATURE_INPUT, OUTPUT = "image", "tabular", "image_features", "risk"
IMAGE_EMBEDDING, FEATURE_LAYER = "image_embedding", "top_activation"
TABULAR_EMBEDDING = mlp.EMBEDDING_LAYER  # the one tabular tower's output (lib.tabular.mlp.tower)
ATTENTION_LAYER = "modality_attention"
KINDS = ("fused", "image", "tabular", "attention")
TRAINING_MODES = ("cached_embeddings", "end_to_end")
LEARNING_RATE = 1e-4
MODEL_NAME = "hybrid_cervical_model"
KERAS_FILE = f"{MODEL_NAME}.keras"
H5_FILE = f"{MODEL_NAME}.h5"
CARD_FILE = f"{MODEL_NAME}_card.json"
PREPROCESSOR_FILE = "hybrid_tabular_preprocessor.json"
IMAGE_BRANCH_FILE = "image_branch.keras"
DEFAULT_THRESHOLD = 0.5
#: head training epochs (an upper bound: early stopping) per profile when the notebook passes none
#: further draws of the pairing protocol each model is stopped on and scored on (besides the seeded one)
N_REPAIRINGS = 20


# --------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class HeadConfig:
    """Sizes and rates of the fusion head (defaults: the original's 64-d tabular embedding, dropout 0.3)."""

    tabular_hidden: tuple = mlp.HIDDEN
    tabular_dim: int = mlp.EMBEDDING_DIM
    dropout: float = mlp.DROPOUT
    fused_hidden: int = 128
    attention_dim: int = 64
    seed: int = 42

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"parameter 'kind': expected one of {KINDS}, got {kind!r}")
    return kind


def _head_graph(kind: str, get, img, tab, cfg: HeadConfig):
    """The head's layers applied to ``img`` (a 512-d tensor) and/or ``tab`` (preprocessed features).

    ``get(name, factory)`` returns the layer to use under ``name`` (made once by ``factory``): one
    definition for the head, the end-to-end model and the assembled model, so their layers match by name.
    """
    from keras import layers

    s = cfg.seed
    xi = xt = None
    if kind in ("fused", "image", "attention"):
        xi = get("fusion_image_dropout", lambda n: layers.Dropout(cfg.dropout, seed=s, name=n))(img)
    if kind in ("fused", "tabular", "attention"):
        t = mlp.tower(tab, get, cfg.tabular_hidden, cfg.tabular_dim, cfg.dropout, s)  # the one tabular tower
        xt = get("fusion_tabular_dropout", lambda n: layers.Dropout(cfg.dropout, seed=s + 1, name=n))(t)
    if kind == "fused":
        z = get("fusion_concat", lambda n: layers.Concatenate(name=n))([xi, xt])
    elif kind == "image":
        z = xi
    elif kind == "tabular":
        z = xt
    else:  # attention: per-sample softmax weights over the two projected modalities
        d = cfg.attention_dim
        pi = get("attn_image_proj", lambda n: layers.Dense(d, activation="relu", name=n))(xi)
        pt = get("attn_tabular_proj", lambda n: layers.Dense(d, activation="relu", name=n))(xt)
        g = get("attn_gate_input", lambda n: layers.Concatenate(name=n))([pi, pt])
        g = get("attn_gate_hidden", lambda n: layers.Dense(16, activation="tanh", name=n))(g)
        w = get(ATTENTION_LAYER, lambda n: layers.Dense(2, activation="softmax", name=n))(g)
        ri = get("attn_image_row", lambda n: layers.Reshape((1, d), name=n))(pi)
        rt = get("attn_tabular_row", lambda n: layers.Reshape((1, d), name=n))(pt)
        stack = get("attn_stack", lambda n: layers.Concatenate(axis=1, name=n))([ri, rt])
        z = get("attn_weighted_sum", lambda n: layers.Dot(axes=(1, 1), name=n))([w, stack])
    h = get("fusion_dense", lambda n: layers.Dense(cfg.fused_hidden, activation="relu", name=n))(z)
    h = get("fusion_dropout", lambda n: layers.Dropout(cfg.dropout, seed=s + 2, name=n))(h)
    return get(OUTPUT, lambda n: layers.Dense(1, activation="sigmoid", name=n))(h)


def compile_model(model, lr: float = LEARNING_RATE):
    """Adam(``lr``), binary cross-entropy, AUC and PR-AUC (``ap``) metrics; the optimizer is built at once,
    so a model saved before any training reloads its optimizer without a variable-count warning."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.AUC(curve="PR", name="ap")])
    model.optimizer.build(model.trainable_variables)
    return model


def head_kind(model) -> str:
    """The kind a head or an assembled model was built with (read from its layers)."""
    names = {layer.name for layer in model.layers}
    if ATTENTION_LAYER in names:
        return "attention"
    if "fusion_concat" in names:
        return "fused"
    return "tabular" if TABULAR_EMBEDDING in names else "image"


def build_head(kind: str, n_tabular: int | None = None, image_dim: int = 512, config: HeadConfig | None = None,
               lr: float = LEARNING_RATE):
    """The fusion head on cached inputs, compiled: inputs ``image_features`` (``image_dim``) and/or
    ``tabular`` (``n_tabular``), in that order; output ``risk``."""
    import keras

    _check_kind(kind)
    cfg = config or HeadConfig()
    inputs, img, tab = [], None, None
    if kind != "tabular":
        img = keras.Input((int(image_dim),), name=FEATURE_INPUT)
        inputs.append(img)
    if kind != "image":
        if not isinstance(n_tabular, (int, np.integer)) or n_tabular < 1:
            raise ValueError(f"parameter 'n_tabular': expected a positive integer for kind {kind!r}, got {n_tabular!r}")
        tab = keras.Input((int(n_tabular),), name=TABULAR_INPUT)
        inputs.append(tab)
    out = _head_graph(kind, mlp.layer_factory(), img, tab, cfg)
    return compile_model(keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name=f"fusion_head_{kind}"), lr)


def _embedding_tensor(image_branch):
    try:
        return image_branch.get_layer(IMAGE_EMBEDDING).output
    except ValueError:
        raise ValueError(f"image branch {image_branch.name!r} has no layer {IMAGE_EMBEDDING!r}; expected a model from "
                         "lib.image.image_model.build_image_classifier") from None


def build_fusion_model(image_branch, n_tabular: int, kind: str = "fused", config: HeadConfig | None = None,
                       lr: float = LEARNING_RATE, name: str = MODEL_NAME):
    """Training mode ``"end_to_end"``: the flat two-input model with a fresh head, compiled.

    Inputs ``[image, tabular]`` (``image`` is the image branch's own input layer), output ``risk``.
    The image branch's layers are shared with ``image_branch`` (fitting this model changes both).
    """
    import keras

    if _check_kind(kind) not in ("fused", "attention"):
        raise ValueError(f"parameter 'kind': a two-input model needs 'fused' or 'attention', got {kind!r}")
    tab = keras.Input((int(n_tabular),), name=TABULAR_INPUT)
    out = _head_graph(kind, mlp.layer_factory(), _embedding_tensor(image_branch), tab, config or HeadConfig())
    return compile_model(keras.Model([image_branch.get_layer(IMAGE_INPUT).output, tab], out, name=name), lr)


def assemble(image_branch, head, config: HeadConfig | None = None, lr: float = LEARNING_RATE,
             name: str = MODEL_NAME):
    """Training mode ``"cached_embeddings"``: the flat two-input model from a trained ``head``.

    The image side is ``image_branch`` from its ``image`` input to ``image_embedding`` (every layer,
    ``top_activation`` included, in this graph); the head side is the same :func:`_head_graph` with
    the trained head's weights copied in, layer by layer (BatchNorm statistics included).  Copied,
    not shared: a Keras layer used in two graphs reports its *first* graph's tensors in
    ``layer.input``/``layer.output``, which misleads tools such as Grad-CAM.  Inputs ``[image, tabular]``
    for fused and attention heads (``[image]`` for an image-only head), output ``risk``; compiled.
    ``config`` must be the :class:`HeadConfig` the head was built with (sizes are checked on copy).
    """
    import keras

    kind = head_kind(head)
    if kind == "tabular":
        raise ValueError("assemble: a tabular-only head has no image side to assemble")
    img_in = image_branch.get_layer(IMAGE_INPUT).output
    tab = None
    inputs = [img_in]
    if kind != "image":
        tab = keras.Input(tuple(head.get_layer(TABULAR_INPUT).output.shape[1:]), name=TABULAR_INPUT)
        inputs.append(tab)
    get = mlp.layer_factory()
    out = _head_graph(kind, get, _embedding_tensor(image_branch), tab, config or HeadConfig())
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name=name)
    for layer in head.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            target = model.get_layer(layer.name)
        except ValueError:
            raise ValueError(f"assemble: head layer {layer.name!r} has no counterpart; was the head built with the "
                             "same kind and HeadConfig?") from None
        try:
            target.set_weights(layer.get_weights())
        except ValueError as e:
            raise ValueError(f"assemble: layer {layer.name!r} does not match the head ({e}); pass the head's "
                             "HeadConfig") from None
    return compile_model(model, lr)


# --------------------------------------------------------------------------- inputs
def image_embeddings(image_branch, table, image_size: int | None = None, chunk: int = 256) -> np.ndarray:
    """``(n, 512)`` float32: the image branch's ``image_embedding`` for every row of ``table`` (in order),
    in inference mode (augmentation and dropout off).

    Images are decoded with :func:`lib.image.input_pipeline.load_images` (the same decoding and resizing as
    the training pipeline) ``chunk`` at a time; no ``tf.data`` (its graph warnings would land in the
    notebook's stderr).  ``image_size`` defaults to the branch's input size.
    """
    from lib.image import image_model
    from lib.image.input_pipeline import load_images

    size = int(image_size or image_branch.get_layer(IMAGE_INPUT).output.shape[1])
    emb = image_model.embedding_model(image_branch)
    out = [predict_raw(emb, load_images(table.iloc[i:i + chunk], size)) for i in range(0, len(table), chunk)]
    return np.concatenate(out, axis=0).astype("float32") if out else np.zeros((0, emb.output.shape[-1]), "float32")


def predict_raw(model, x, batch_size: int | None = None) -> np.ndarray:
    """``model(x, training=False)`` in batches, as NumPy: :func:`lib.predict.predict`."""
    from lib.predict import predict as batched

    return batched(model, x, batch_size=batch_size)


def fit_image_head_on_features(image_branch, features, labels, val_features=None, val_labels=None,
                               epochs: int = 100, batch_size: int = 32, seed: int = 42, lr: float = LEARNING_RATE,
                               patience: int = 15) -> dict:
    """Train the image branch's head (``head_dropout_1 -> image_embedding -> head_dropout_2 -> class_probs``)
    on cached ``avg_pool`` features (:func:`lib.image.features.extract_features`), in place.

    The fallback when notebook 03's trained branch is absent: a frozen backbone + a trained head.  The
    layers trained are the image branch's own objects, so ``image_branch`` holds the result.
    Trained through :func:`lib.image.image_model.fit_history`, the image branch's one fit.  Returns
    ``{"epochs_run", "best_epoch"}`` only: they key the embedding cache and go into 05's metrics, which
    must be byte-identical on a rerun (the history's ``fit_seconds`` is not).
    """
    import keras

    from lib.image.image_model import class_weights, fit_history

    keras.utils.set_random_seed(seed)
    feats = np.asarray(features, "float32")
    inp = keras.Input((feats.shape[1],), name="avg_pool_features")
    x = inp
    for name in ("head_dropout_1", IMAGE_EMBEDDING, "head_dropout_2", "class_probs"):
        x = image_branch.get_layer(name)(x)
    head = keras.Model(inp, x, name="image_head_on_features")
    head.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    n_classes = int(x.shape[-1])
    y = np.asarray(labels, "int32")
    kw = dict(y=y, batch_size=batch_size, shuffle=True, class_weight=class_weights(y, n_classes))
    if val_features is None:
        hist = fit_history(head, feats, int(epochs), log=False, **kw)
    else:
        stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience,
                                             restore_best_weights=True)
        val = (np.asarray(val_features, "float32"), np.asarray(val_labels, "int32"))
        hist = fit_history(head, feats, int(epochs), [stop], log=False, validation_data=val, **kw)
    return {"epochs_run": hist["epochs_run"], "best_epoch": hist["best_epoch"]}


def default_train_draws(n_train_images: int, n_train_records: int, cap: int = 5) -> int:
    """How many pairing draws to train on: enough that the training pairs show the tabular tower about
    every training record once (``ceil(records / images)``), at least 1, at most ``cap``.  The smoke
    profile has ~85 training images for ~580 training records (5 draws); the full profile has more
    images than records (1 draw)."""
    if n_train_images < 1:
        raise ValueError(f"parameter 'n_train_images': expected a positive count, got {n_train_images!r}")
    return int(max(1, min(int(cap), -(-int(n_train_records) // int(n_train_images)))))


def _branch_features(branch, table, size: int, chunk: int = 256) -> np.ndarray:
    import keras

    from lib.image.input_pipeline import load_images

    pooled = keras.Model(branch.get_layer(IMAGE_INPUT).output, branch.get_layer("avg_pool").output)
    return np.concatenate([predict_raw(pooled, load_images(table.iloc[i:i + chunk], size))
                           for i in range(0, len(table), chunk)]).astype("float32")


def image_branch_for_fusion(run, head_epochs: int = 200):
    """The image branch the fusion model builds on, and a dict saying where it came from.

    Notebook 03's saved branch is used when it exists **and** its metrics record in the same run
    shows the same backbone, weights, image size and classes (the split is the run's, so its
    test images are this notebook's test images and it never trained on them).  Otherwise a branch
    is built with :func:`lib.image.image_model.build_image_classifier` from the run's parameters,
    its backbone kept frozen (ImageNet features) and its head trained on the pooled features of the
    training split, early stopping on validation (:func:`fit_image_head_on_features`); the reason
    is reported.
    """
    from lib.image import image_model

    params, table, classes = run.params, run.table, run.classes
    path = run.path("image_branch")
    meta = run.metrics("03_image_branch")
    keys = ("backbone", "weights", "image_size")
    reason = None
    if not path.is_file():
        reason = f"{path.name} not found (notebook 03 has not run in this run)"
    elif meta is None:
        reason = "notebook 03's metrics record is missing, so the branch's settings cannot be checked"
    else:
        mine = {k: params.get(k) for k in keys}
        theirs = {k: meta.get("params", {}).get(k) for k in keys}
        if mine != theirs:
            diff = {k: (theirs[k], mine[k]) for k in keys if mine[k] != theirs[k]}
            reason = f"notebook 03 used other parameters (notebook 03 vs here): {diff}"
        elif list(meta.get("classes", [])) != list(classes):
            reason = f"notebook 03 has classes {meta.get('classes')}, here {list(classes)}"
    if reason is None:
        branch = image_model.load_model(path)
        # 03 chose flip test-time augmentation for this branch on validation (or not): whoever scores the
        # image branch alone (cervical-kit-infer, the app) scores it the same way (lib.serve.inference)
        flips = bool((meta.get("headline") or {}).get("tta_finetuned", False))
        return branch, {"source": "notebook 03 (image_branch.keras)", "file": path.name,
                        "recipe": meta.get("recipe", {}), "reason": "same parameters and split as this notebook",
                        "test_time_flips": flips}
    branch = image_model.build_image_classifier(len(classes), params["backbone"], params["image_size"],
                                                params["weights"], seed=params["seed"])
    feats = _branch_features(branch, table, params["image_size"])
    tr, va = (table["split"] == "train").to_numpy(), (table["split"] == "val").to_numpy()
    y = table["label_idx"].to_numpy()
    info = fit_image_head_on_features(branch, feats[tr], y[tr], feats[va], y[va], epochs=head_epochs,
                                      seed=params["seed"])
    return branch, {"source": "built here: frozen backbone + head trained on its pooled features",
                    "file": None, "reason": reason, "head_training": info, "test_time_flips": False}


def cached_image_embeddings(run, branch, info: dict) -> tuple[np.ndarray, bool]:
    """:func:`image_embeddings` of every image of the run, computed once: cached in the run, keyed by a
    sha256 of the image-branch file (or of the parameters a branch built here came from) and of the
    image list.  Returns ``(embeddings, reused)``."""
    import hashlib

    h = hashlib.sha256()
    if info.get("file"):
        h.update(run.path("image_branch").read_bytes())
    else:
        h.update(json.dumps({k: run.params[k] for k in ("backbone", "weights", "image_size", "seed")},
                            sort_keys=True).encode())
        h.update(json.dumps(info.get("head_training", {}), sort_keys=True).encode())
    import PIL
    import keras

    h.update(f"keras {keras.__version__} pillow {PIL.__version__}".encode())  # decoding + forward pass
    h.update("\n".join(run.relpaths(run.table)).encode())
    key = h.hexdigest()
    target = run.path("image_embeddings")
    if target.exists():
        with np.load(target) as z:
            if str(z["key"]) == key:
                return z["embeddings"], True
    emb = image_embeddings(branch, run.table)
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, embeddings=emb, key=np.array(key))
    return emb, False


@dataclass
class CohortInputs:
    """One pairing's model inputs, split by split: ``x_image`` (n, 512), ``x_tabular`` (n, k), ``y`` (n,).

    ``repairings``: further draws of the same pairing protocol (same image split, same record pools,
    other seeds), each as ``(x_image, x_tabular, y)`` dicts by split.  A pairing is a random draw;
    ``draws=k`` in :meth:`inputs` / :meth:`labels` stacks the seeded draw and the first ``k - 1``
    re-pairings, so a model can be trained, stopped and scored on many draws instead of one.
    """

    cohort: pd.DataFrame
    x_image: dict
    x_tabular: dict
    y: dict
    repairings: list = field(default_factory=list)

    @property
    def n_draws(self) -> int:
        return 1 + len(self.repairings)

    def _draws(self, split, draws):
        k = self.n_draws if draws is None else int(draws)
        if not 1 <= k <= self.n_draws:
            raise ValueError(f"parameter 'draws': expected 1..{self.n_draws} (None = all), got {draws!r}")
        return [(self.x_image, self.x_tabular, self.y)] + list(self.repairings[:k - 1])

    def inputs(self, kind: str, split: str, draws: int | None = 1) -> list:
        parts = self._draws(split, draws)
        return _inputs(kind, np.concatenate([p[0][split] for p in parts]), np.concatenate([p[1][split] for p in parts]))

    def labels(self, split: str, draws: int | None = 1) -> np.ndarray:
        return np.concatenate([p[2][split] for p in self._draws(split, draws)])


def _inputs(kind, x_image, x_tabular) -> list:
    return {"fused": [x_image, x_tabular], "attention": [x_image, x_tabular], "image": [x_image],
            "tabular": [x_tabular]}[_check_kind(kind)]


def _gather(cohort, embeddings, tabular_features, record_index):
    from lib.data.splits import SPLITS

    pos = pd.Index(record_index).get_indexer(cohort["record_id"])
    if (pos < 0).any():
        raise ValueError(f"cohort: {int((pos < 0).sum())} record_id(s) not in the UCI frame's index")
    emb = np.asarray(embeddings, "float32")
    if len(cohort) and cohort["image_index"].max() >= len(emb):
        raise ValueError(f"cohort: image_index up to {cohort['image_index'].max()} but only {len(emb)} embeddings")
    tab = np.asarray(tabular_features, "float32")
    if len(tab) != len(record_index):
        raise ValueError(f"tabular_features: {len(tab)} rows but the UCI frame has {len(record_index)}")
    xi, xt, y = {}, {}, {}
    for s in SPLITS:
        m = (cohort["split"] == s).to_numpy()
        xi[s] = emb[cohort["image_index"].to_numpy()[m]]
        xt[s] = tab[pos[m]]
        y[s] = cohort["abnormal"].to_numpy()[m].astype("float32")
    return xi, xt, y


def cohort_inputs(cohort: pd.DataFrame, embeddings: np.ndarray, tabular_features: np.ndarray, record_index,
                  repairings=()) -> CohortInputs:
    """Gather the arrays of a pairing: row ``i`` of the cohort gets ``embeddings[image_index]`` and the
    tabular features of its ``record_id`` (``record_index``: the UCI frame's index, aligned with the rows
    of ``tabular_features``).  ``repairings``: more cohorts of the same protocol (other seeds)."""
    xi, xt, y = _gather(cohort, embeddings, tabular_features, record_index)
    rep = [_gather(c, embeddings, tabular_features, record_index) for c in repairings]
    return CohortInputs(cohort, xi, xt, y, rep)


def repairing_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the ``n`` re-pairings: ``seed * 1000 + 1 ... seed * 1000 + n`` (never ``seed``)."""
    return [int(seed) * 1000 + 1 + r for r in range(int(n))]


def pairing_inputs(image_table, uci_frame, uci_split, embeddings, tabular: dict, seed: int = 42,
                   n_repairings: int = 20) -> dict:
    """Every pairing the ablation needs, as ``{key: CohortInputs}``.

    ``tabular``: ``{suffix: features of every UCI row}``, e.g. ``{"": honest, "+screening": with the
    leaky columns}``; keys are ``"label_conditioned" + suffix`` and ``"shuffled" + suffix``.  The
    cohorts come from :func:`lib.fusion.pairing.pair_label_conditioned` / :func:`lib.fusion.pairing.pair_shuffled` with
    ``seed``; ``n_repairings`` further draws with :func:`repairing_seeds`.
    """
    from lib.fusion import pairing

    frame = getattr(uci_frame, "frame", uci_frame)
    out = {}
    for name, fn in (("label_conditioned", pairing.pair_label_conditioned), ("shuffled", pairing.pair_shuffled)):
        cohort = fn(image_table, frame, seed=seed, uci_split=uci_split)
        extra = [fn(image_table, frame, seed=s, uci_split=uci_split) for s in repairing_seeds(seed, n_repairings)]
        for suffix, feats in tabular.items():
            out[name + suffix] = cohort_inputs(cohort, embeddings, feats, frame.index, extra)
    return out


# --------------------------------------------------------------------------- training
def fit_head(kind: str, data: CohortInputs, epochs: int, seed: int = 42, batch_size: int = 32, patience: int = 20,
             config: HeadConfig | None = None, lr: float = LEARNING_RATE, train_draws: int = 1,
             val_draws: int | None = None, monitor: str = "val_loss", tabular_branch=None):
    """Build and train one head on ``data``'s train split (:func:`lib.training.fit_binary`); returns ``(model, info)``.

    ``train_draws``: how many pairing draws to train on (see :class:`CohortInputs`); ``val_draws``:
    how many the early stopping watches (``None``: all).  ``tabular_branch``: a model from
    :func:`lib.tabular.mlp.fit_branch` (notebook 04's, saved); its tower weights are copied into this head and **frozen** (BatchNorm
    in inference mode), so only the fusion layers learn from the pairs.  Without it the tower is
    trained from scratch on the pairs.
    """
    import keras

    check_fit_args(epochs, patience, monitor)
    keras.utils.set_random_seed(seed)
    cfg = config or HeadConfig(seed=seed)
    model = build_head(_check_kind(kind), data.x_tabular["train"].shape[1], data.x_image["train"].shape[1], cfg, lr)
    frozen = []
    if tabular_branch is not None and kind != "image":
        for name in mlp.tower_layer_names(cfg.tabular_hidden):
            layer = model.get_layer(name)
            layer.set_weights(tabular_branch.get_layer(name).get_weights())
            layer.trainable = False
            frozen.append(name)
        compile_model(model, lr)  # trainability is captured when compiling
    info = fit_binary(model, data.inputs(kind, "train", train_draws), data.labels("train", train_draws),
                      data.inputs(kind, "val", val_draws), data.labels("val", val_draws), epochs, seed, batch_size,
                      patience, monitor)
    info.update(train_draws=int(train_draws), val_draws=data.n_draws if val_draws is None else int(val_draws),
                frozen_tabular_tower=bool(frozen))
    return model, info


def predict(model, x) -> np.ndarray:
    """Risk scores as a 1-d float64 array (:func:`predict_raw`)."""
    return predict_raw(model, x).astype("float64").reshape(-1)


def attention_weights(head, x_image, x_tabular) -> np.ndarray:
    """``(n, 2)`` per-sample modality weights [image, tabular] of an attention head."""
    import keras

    if head_kind(head) != "attention":
        raise ValueError(f"attention_weights: model {head.name!r} is not an attention head")
    probe = keras.Model(head.inputs, head.get_layer(ATTENTION_LAYER).output)
    return predict_raw(probe, [x_image, x_tabular]).astype("float64")


# --------------------------------------------------------------------------- the ablation
SCREENING = "+screening"
#: (run name, head kind, pairing key) in table order; the last two are the labelled demonstration of the
#: original's likely setup: the leaky screening columns (Hinselmann, Schiller, Citology) on the tabular side
ABLATION_RUNS = (
    ("image only", "image", "label_conditioned"),
    ("tabular only", "tabular", "label_conditioned"),
    ("tabular only, shuffled pairing", "tabular", "shuffled"),
    ("fused", "fused", "label_conditioned"),
    ("fused, shuffled pairing", "fused", "shuffled"),
    ("attention-fused", "attention", "label_conditioned"),
    ("DEMO fused + screening columns", "fused", "label_conditioned" + SCREENING),
    ("DEMO fused + screening columns, shuffled pairing", "fused", "shuffled" + SCREENING),
)
#: short keys for the metrics JSON headline
HEADLINE_KEYS = {
    "image only": "image_only", "tabular only": "tabular_only", "tabular only, shuffled pairing": "tabular_only_shuffled",
    "fused": "fused", "fused, shuffled pairing": "shuffled", "attention-fused": "attention",
    "DEMO fused + screening columns": "screening_fused",
    "DEMO fused + screening columns, shuffled pairing": "screening_shuffled",
}


@dataclass
class AblationResult:
    """Everything one ablation produced; ``reports`` are :func:`lib.metrics.binary_report` dicts of the
    seeded test pairing, ``averaged`` the AUC/AP over that pairing and every test re-pairing."""

    runs: list                    # (name, kind, pairing key)
    models: dict                  # name -> trained head
    scores: dict                  # name -> test scores (seeded pairing)
    y_test: dict                  # name -> test labels
    reports: dict                 # name -> binary_report
    info: dict                    # name -> fit_head info
    averaged: dict = field(default_factory=dict)   # name -> {"auc", "ap", "pairings"}
    attention: dict = field(default_factory=dict)  # mean weights {image, tabular} on the test split

    def auc(self, name: str, averaged: bool = True) -> float:
        return self.averaged[name]["auc"] if averaged else self.reports[name]["auc"]["value"]

    def averaged_table(self) -> pd.DataFrame:
        """AUC and AP averaged over the test pairings, next to the seeded pairing's AUC."""
        rows = [{"model": n, "auc_seeded_pairing": round(self.reports[n]["auc"]["value"], 3),
                 "auc_over_pairings": round(a["auc"], 3), "ap_over_pairings": round(a["ap"], 3),
                 "test_pairings": a["pairings"]} for n, a in self.averaged.items()]
        return pd.DataFrame(rows).set_index("model")

    def headline(self) -> dict:
        """Flat numbers for the metrics JSON: ``auc_<key>``, ``ap_<key>`` ... per run, the averaged AUCs
        (``auc_avg_<key>``) and the fusion gains (see :func:`pairing_lesson`)."""
        out = {}
        for name, rep in self.reports.items():
            k = HEADLINE_KEYS.get(name, name.replace(" ", "_").replace(",", ""))
            for m in ("auc", "ap", "sens_at_spec", "f1", "accuracy"):
                out[f"{m}_{k}"] = round(rep[m]["value"], 4)
            if name in self.averaged:
                out[f"auc_avg_{k}"] = round(self.averaged[name]["auc"], 4)
        if self.attention:
            out["attention_weight_image"] = round(self.attention["image"], 4)
            out["attention_weight_tabular"] = round(self.attention["tabular"], 4)
        if {"fused", "fused, shuffled pairing"} <= set(self.averaged):
            out.update({k: round(v, 4) for k, v in pairing_lesson(self).items() if isinstance(v, float)})
        return out


def run_ablation(data: dict, epochs: int, seed: int = 42, n_boot: int = 1000, batch_size: int = 32,
                 patience: int = 20, runs=ABLATION_RUNS, config: HeadConfig | None = None,
                 progress: bool = False, train_draws: int = 1, val_draws: int | None = None,
                 monitor: str = "val_loss", tabular_branches: dict | None = None) -> AblationResult:
    """Train and test every run of ``runs`` on ``data`` (``{pairing key: CohortInputs}``, e.g. from
    :func:`pairing_inputs`).

    Every run uses the same seed, epochs, early stopping and test images; only the head kind and the
    pairing change.  The seeded test pairing gets :func:`lib.metrics.binary_report` (bootstrap CIs,
    ``n_boot``); ``averaged`` pools the seeded pairing and every test re-pairing into one AUC and AP.
    ``tabular_branches``: ``{suffix: model from lib.tabular.mlp.fit_branch}`` (suffix ``""`` for the honest
    features, :data:`SCREENING` for the demonstration) - the frozen tabular tower of every head whose
    pairing key ends with that suffix.
    """
    res = AblationResult(list(runs), {}, {}, {}, {}, {})
    for name, kind, key in runs:
        if key not in data:
            raise ValueError(f"run {name!r} needs pairing {key!r}; got pairings {sorted(data)}")
        d = data[key]
        suffix = key.removeprefix("label_conditioned").removeprefix("shuffled")
        branch = (tabular_branches or {}).get(suffix)
        if tabular_branches is not None and branch is None and kind != "image":
            raise ValueError(f"run {name!r}: no tabular branch for features {suffix!r}; got {sorted(tabular_branches)}")
        model, info = fit_head(kind, d, epochs=epochs, seed=seed, batch_size=batch_size, patience=patience,
                               config=config, train_draws=train_draws, val_draws=val_draws, monitor=monitor,
                               tabular_branch=branch)
        sc = predict(model, d.inputs(kind, "test", None))
        yy = d.labels("test", None).astype(int)
        n_test = len(d.y["test"])
        score, y = sc[:n_test], yy[:n_test]  # the seeded draw comes first
        res.models[name], res.info[name], res.scores[name], res.y_test[name] = model, info, score, y
        # two-way bootstrap: the test pairs share cluster/source images AND reuse UCI records, so both
        # are resampled (metrics.binary_report, groups=(image groups, record ids)); the seeded draw
        # is the cohort's test rows in order
        t = d.cohort[d.cohort["split"] == "test"]
        res.reports[name] = metrics.binary_report(
            y, score, n_boot=n_boot, seed=seed, groups=(t["group"].to_numpy(), t["record_id"].astype(str).to_numpy()),
            group_names=("image groups", "UCI records"))
        res.averaged[name] = {"auc": metrics.roc_auc(yy, sc), "ap": metrics.average_precision(yy, sc),
                              "pairings": d.n_draws}
        if kind == "attention":
            w = attention_weights(model, d.x_image["test"], d.x_tabular["test"]).mean(axis=0)
            res.attention = {"image": float(w[0]), "tabular": float(w[1])}
        if progress:
            print(f"{name:<50} best epoch {info['best_epoch']:>3}/{info['epochs_run']:<3} "
                  f"test AUC {res.reports[name]['auc']['value']:.3f}", flush=True)
    return res


def pairing_lesson(res: AblationResult) -> dict:
    """The numbers of the lesson, from the pairing-averaged AUCs.

    ``fusion_gain``: AUC(fused) - AUC(fused, shuffled pairing), honest features;
    ``screening_gain``: the same with the screening columns (the original's likely setup);
    ``tabular_only_shuffled``: the shuffled tabular side on its own;
    ``tabular_information_manufactured``: tabular-only AUC under label-conditioned minus shuffled pairing.
    """
    a = res.averaged
    # bounded differences of AUCs only: a ratio over 1 - AUC explodes when the shuffled model is perfect
    out = {"fusion_gain": float(a["fused"]["auc"] - a["fused, shuffled pairing"]["auc"])}
    if "image only" in a:
        out["fusion_gain_over_image"] = float(a["fused"]["auc"] - a["image only"]["auc"])
        out["shuffled_minus_image"] = float(a["fused, shuffled pairing"]["auc"] - a["image only"]["auc"])
    lc, sh = "DEMO fused + screening columns", "DEMO fused + screening columns, shuffled pairing"
    if lc in a and sh in a:
        out["screening_gain"] = float(a[lc]["auc"] - a[sh]["auc"])
    if "tabular only, shuffled pairing" in a:
        out["tabular_only_shuffled"] = float(a["tabular only, shuffled pairing"]["auc"])
    if "tabular only" in a:
        out["tabular_only"] = float(a["tabular only"]["auc"])
    if "tabular only" in a and "tabular only, shuffled pairing" in a:
        # what the risk factors "know" about a cell image, created by the pairing alone
        out["tabular_information_manufactured"] = out["tabular_only"] - out["tabular_only_shuffled"]
    return out


def ablation_table(reports: dict, runs=None, digits: int = 3, averaged: dict | None = None) -> pd.DataFrame:
    """One row per model: AUC, AP, sensitivity at 90% specificity, F1, accuracy, each with its 95%
    bootstrap CI (columns ``<metric>``, ``<metric>_low``, ``<metric>_high``), plus n and positives.

    ``reports``: ``{name: binary_report}`` (e.g. :attr:`AblationResult.reports`); ``runs`` adds the
    kind and pairing columns; ``averaged`` (:attr:`AblationResult.averaged`) adds ``auc_all_draws`` and
    ``ap_all_draws``, the scores over every test pairing.
    """
    info = {name: (kind, pairing) for name, kind, pairing in (runs or [])}
    rows = []
    for name, rep in reports.items():
        row = {"model": name}
        if name in info:
            row["kind"], row["pairing"] = info[name]
        for m in ("auc", "ap", "sens_at_spec", "f1", "accuracy"):
            for col, key in ((m, "value"), (f"{m}_low", "ci_low"), (f"{m}_high", "ci_high")):
                v = rep[m][key]
                row[col] = None if v is None else round(v, digits)  # None: undefined (one class only)
        row["n_test"], row["n_pos"] = rep["n"], rep["n_pos"]
        if averaged and name in averaged:
            row["auc_all_draws"] = round(averaged[name]["auc"], digits)
            row["ap_all_draws"] = round(averaged[name]["ap"], digits)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("model")
    table.attrs["method"] = metrics.methods_note(reports)
    return table


def plot_ablation(table: pd.DataFrame, title: str | None = None):
    """AUC and AP per model with their 95% bootstrap CIs as error bars (horizontal, one panel each);
    when the table has ``auc_all_draws``/``ap_all_draws`` they are drawn as black diamonds."""
    import matplotlib.pyplot as plt

    names = list(table.index)
    y = np.arange(len(names))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(names) + 1.8), sharey=True)
    for ax, m, label in ((axes[0], "auc", "ROC AUC"), (axes[1], "ap", "average precision")):
        v = table[m].to_numpy(float)
        err = np.vstack([v - table[f"{m}_low"].to_numpy(float), table[f"{m}_high"].to_numpy(float) - v])
        colors = ["#c0392b" if "shuffled" in n else "#2c7fb8" for n in names]
        ax.errorbar(v, y, xerr=np.clip(err, 0, None), fmt="none", ecolor="grey", capsize=4, lw=1.2)
        ax.scatter(v, y, c=colors, s=45, zorder=3, label="seeded pairing (95% CI)")
        for yi, vi in zip(y, v):
            ax.annotate(f"{vi:.3f}", (vi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        if f"{m}_all_draws" in table.columns:
            ax.scatter(table[f"{m}_all_draws"].to_numpy(float), y, marker="D", c="black", s=22, zorder=4,
                       label="over all test pairings")
            ax.legend(loc="lower left", fontsize=7)
        ax.set(xlabel=label, xlim=(0, 1.02))
        if m == "auc":
            ax.axvline(0.5, ls="--", c="grey", lw=1)
        else:
            prev = float(table["n_pos"].iloc[0] / table["n_test"].iloc[0])
            ax.axvline(prev, ls="--", c="grey", lw=1)
    axes[0].set_yticks(y, names)
    fig.suptitle(title or "Ablation on the held-out test split (95% bootstrap CI; red: shuffled pairing)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- saving
def load_hybrid(path, compile: bool = True):
    """Load a saved hybrid model: ``.keras`` directly; ``.h5`` with ``compile=False``, then recompiled
    (a reloaded ``.h5`` optimizer fails in ``fit``; DESIGN.md section 6)."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hybrid model {str(path)!r} not found: run notebooks/05_late_fusion.ipynb")
    if path.suffix == ".h5":
        model = keras.saving.load_model(path, compile=False)
        return compile_model(model) if compile else model
    if path.suffix != ".keras":
        raise ValueError(f"model path {str(path)!r}: expected a '.keras' or '.h5' file")
    return keras.saving.load_model(path, compile=compile)


def _untrack_value_ranges(model) -> None:
    """Keras 3.15: ``RandomBrightness``/``RandomContrast`` keep ``value_range`` as a tracked list, which the
    legacy ``.h5`` writer cannot deep-copy ("cannot pickle 'module' object").  A plain tuple is the same
    config; set it without the tracking ``__setattr__``."""
    for layer in model.layers:
        v = getattr(layer, "value_range", None)
        if v is not None and not isinstance(v, tuple):
            object.__setattr__(layer, "value_range", tuple(v))


def save_hybrid(model, models_dir, preprocessor=None, card: dict | None = None) -> dict:
    """Write ``hybrid_cervical_model.keras``, then ``hybrid_cervical_model.h5`` from a clean reload of it,
    then the preprocessor JSON and the model card, each atomically; returns ``{what: path}``.

    The ``.h5`` is saved from the reload, never from ``model``: saving to ``.h5`` drops the optimizer of
    the model it saves, and ``model`` must stay intact.
    """
    from lib.tabular.mlp import save_preprocessor

    d = Path(models_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"keras": d / KERAS_FILE, "h5": d / H5_FILE}
    with atomic_path(paths["keras"]) as tmp:
        model.save(tmp)
    clean = load_hybrid(paths["keras"])
    _untrack_value_ranges(clean)
    import logging

    class _NoLegacyNotice(logging.Filter):
        """Keras logs (through absl) that .h5 is "legacy" on every save; the kit writes .h5 on purpose,
        next to the .keras file, because the original work shipped one. Other messages pass."""

        def filter(self, record):
            return "saving your model as an HDF5 file" not in record.getMessage()

    absl = logging.getLogger("absl")
    quiet = _NoLegacyNotice()
    absl.addFilter(quiet)
    try:
        with atomic_path(paths["h5"]) as tmp:
            clean.save(tmp)
    finally:
        absl.removeFilter(quiet)
    if preprocessor is not None:
        paths["preprocessor"] = save_preprocessor(preprocessor, d / PREPROCESSOR_FILE)
    if card is not None:
        card = dict(card)
        card.setdefault("files", {}).update({k: p.name for k, p in paths.items()})
        paths["card"] = write_json(d / CARD_FILE, card)
    return paths


def model_card(*, synthetic: bool, image_source: str, uci_summary: dict, pairing: dict, training_mode: str,
               ablation: pd.DataFrame, attention: dict, image_branch: dict, tabular_columns: list, classes: list,
               abnormal_classes: list, image_size: int, head_config: HeadConfig, threshold: float = DEFAULT_THRESHOLD,
               profile: str = "smoke") -> dict:
    """The JSON model card (the report's model-card page renders it; keys become labels)."""
    if training_mode not in TRAINING_MODES:
        raise ValueError(f"parameter 'training_mode': expected one of {TRAINING_MODES}, got {training_mode!r}")
    table = json.loads(ablation.to_json(orient="index"))
    return {
        "name": MODEL_NAME,
        "profile": profile,
        "synthetic": bool(synthetic),
        "summary": ("Late-fusion teaching rebuild of a published hybrid cervical-cancer risk model: EfficientNet image "
                    "branch (512-d embedding) + tabular MLP (64-d embedding) on UCI risk factors, concatenated, "
                    "fully connected classifier, sigmoid output 'risk'."),
        "intended_use": ("Teaching only: shows how such a model is built, evaluated and how its numbers can mislead. "
                         "Not a medical device; not for screening, diagnosis or any clinical decision."),
        "data_sources": {
            "images": {"source": image_source, "synthetic": bool(synthetic),
                       "note": ("SYNTHETIC procedurally drawn stand-in in the SIPaKMeD layout: nothing here says "
                                "anything about real Pap smears") if synthetic
                       else f"real images: {image_source}"},
            "tabular": {"name": "UCI Cervical cancer (Risk Factors), dataset 383",
                        "file": Path(str(uci_summary.get("path", ""))).name,
                        "sha256": uci_summary.get("sha256"),
                        "matches_uci_original": uci_summary.get("matches_uci_original"),
                        "rows_after_cleaning": uci_summary.get("rows"), "positives": uci_summary.get("positives")},
        },
        "pairing_protocol": pairing,
        "training_mode": training_mode,
        "image_branch": image_branch,
        "architecture": {"inputs": {"image": f"RGB 0..255, {image_size}x{image_size}x3",
                                    "tabular": f"{len(tabular_columns)} UCI risk factors -> saved preprocessor"},
                         "head": head_config.to_dict(), "output": "risk (sigmoid)",
                         "loss": "binary cross-entropy", "optimizer": f"Adam lr={LEARNING_RATE:g}",
                         "early_stopping": ("fusion heads: validation loss (val_loss) over the pairing draws; tabular "
                                            "branch (notebook 04, frozen here): validation records' AUC; best weights "
                                            "restored in both (lib.training)")},
        "image_size": int(image_size),
        "image_classes": list(classes),
        "abnormal_classes": list(abnormal_classes),
        "tabular_columns": list(tabular_columns),
        "threshold": float(threshold),
        "metrics": {"test_split_ablation": table, "mean_attention_weights": attention},
        "limitations": [
            "Images and risk factors come from different women: the pairs are made up by a seeded protocol.",
            "Under label-conditioned pairing the fusion gain is manufactured by the pairing; the shuffled control "
            "shows it vanishes. It is not evidence that the modalities complement each other.",
            "The risk factors alone are weak predictors of biopsy (published anchor AUC 0.69, Fernandes et al., "
            "PeerJ CS 2018; this run's tabular branch is trained in notebook 04); the leaky screening columns "
            "(Hinselmann, Schiller, Citology) are excluded.",
            f"Few positive biopsies ({(uci_summary.get('positives') or {}).get('Biopsy')} after cleaning): confidence intervals are wide and "
            "positive records are reused many times.",
        ] + (["Trained on SYNTHETIC images: the image numbers describe the stand-in, not SIPaKMeD."] if synthetic else []),
    }
