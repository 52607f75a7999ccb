"""The tabular branch: preprocessing, the MLP, honest cross-validation, and the saved artefacts.

Rules (DESIGN.md section 4):

* **Preprocessing inside the folds.**  :func:`make_preprocessor` is an sklearn ``Pipeline``
  (median imputation + missing-value indicators, then ``StandardScaler``).  It is fitted on
  the training rows of each fold only; the test rows are transformed with the training
  statistics.
* **Missing-value indicators where missingness carries signal.**  The UCI questionnaire
  has blocks a woman could decline to answer (sexual partners, pregnancies, smoking,
  hormonal contraceptives, IUD, STDs).  Each block's columns share one missingness pattern,
  so one indicator per block (:data:`MISSING_INDICATOR_COLUMNS`): declining is itself
  information (none of the 103 women who declined the contraceptive questions had a
  positive biopsy).  We use ``MissingIndicator(features="all")`` next to
  ``SimpleImputer(strategy="median")`` rather than ``SimpleImputer(add_indicator=True)``:
  the latter silently drops an indicator whose column happens to have no missing value in
  a training fold, which would change the number of model inputs from fold to fold.
* **Class imbalance: class weights**, ``n / (2 * n_class)`` computed on the rows the model
  is trained on (no oversampling, so nothing to keep inside folds).
* **Early stopping** on the AUC of an inner validation split (20%, stratified) drawn from
  the training fold only, best weights restored.  The paper stopped on validation
  *accuracy*; with 6% positives, accuracy hardly moves, so AUC it is.
* **Same folds for every model**: :func:`cross_validate` draws one
  ``RepeatedStratifiedKFold`` and runs every requested model on each fold.
* **Leaky columns** (Hinselmann, Schiller, Citology) are excluded unless
  ``include_leaky=True``, which exists for the labelled demonstration only.
* **Saved preprocessing is JSON, not pickle** (:func:`save_preprocessor`): column list,
  medians, indicator columns, scaler mean/scale.  :func:`load_preprocessor` returns a
  :class:`TabularPreprocessor` whose ``transform`` reproduces the fitted pipeline exactly.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config, metrics
from lib.atomic import atomic_path, read_json, write_json
from lib.data.uci import TARGET, UciData, feature_columns

MISSING_INDICATOR_COLUMNS = (
    "Number of sexual partners", "Num of pregnancies", "Smokes", "Hormonal Contraceptives", "IUD", "STDs",
)
MODELS = ("mlp", "logreg", "rf")
PREPROCESSOR_FORMAT = "cervical-kit/tabular-preprocessor"
INPUT_LAYER, EMBEDDING_LAYER, OUTPUT_LAYER = "tabular", "tabular_embedding", "risk"


# --------------------------------------------------------------------------- preprocessing


def make_preprocessor(columns, indicator_columns=MISSING_INDICATOR_COLUMNS):
    """Unfitted ``Pipeline``: [median imputation | missing indicators] -> ``StandardScaler``.

    Output order: the ``columns`` (imputed), then one ``missingindicator_<col>`` 0/1 column for each of
    ``indicator_columns`` present in ``columns``; everything standardised.  Takes a DataFrame.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import MissingIndicator, SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    columns = list(columns)
    if not columns:
        raise ValueError("parameter 'columns': expected at least one feature column, got none")
    indicators = [c for c in (indicator_columns or ()) if c in columns]
    parts = [("impute", SimpleImputer(strategy="median", keep_empty_features=True), columns)]
    if indicators:
        parts.append(("missing", MissingIndicator(features="all"), indicators))
    union = ColumnTransformer(parts, remainder="drop", verbose_feature_names_out=False)
    return Pipeline([("impute", union), ("scale", StandardScaler())])


class TabularPreprocessor:
    """A fitted preprocessor as plain numbers: what :func:`save_preprocessor` writes.

    ``transform(frame)`` does exactly what the fitted sklearn pipeline did: take ``columns``,
    fill NaN with ``medians``, append ``indicator_columns`` missingness as 0/1, then
    ``(x - mean) / scale``.
    """

    def __init__(self, columns, medians, indicator_columns, mean, scale, metadata=None):
        self.columns = list(columns)
        self.medians = np.asarray(medians, dtype="float64")
        self.indicator_columns = list(indicator_columns)
        self.mean = np.asarray(mean, dtype="float64")
        self.scale = np.asarray(scale, dtype="float64")
        self.metadata = dict(metadata or {})
        n_out = len(self.columns) + len(self.indicator_columns)
        if len(self.medians) != len(self.columns) or len(self.mean) != n_out or len(self.scale) != n_out:
            raise ValueError(f"preprocessor: {len(self.columns)} columns + {len(self.indicator_columns)} indicators "
                             f"need {len(self.columns)} medians and {n_out} means/scales, got "
                             f"{len(self.medians)}, {len(self.mean)}, {len(self.scale)}")
        unknown = [c for c in self.indicator_columns if c not in self.columns]
        if unknown:
            raise ValueError(f"preprocessor: indicator columns {unknown} are not among the input columns")

    @property
    def feature_names_out(self) -> list[str]:
        return self.columns + [f"missingindicator_{c}" for c in self.indicator_columns]

    @property
    def n_features_out(self) -> int:
        return len(self.columns) + len(self.indicator_columns)

    def get_feature_names_out(self):
        return np.asarray(self.feature_names_out, dtype=object)

    def transform(self, frame) -> np.ndarray:
        if not isinstance(frame, pd.DataFrame):
            raise ValueError(f"transform: expected a DataFrame with columns {self.columns}, got {type(frame).__name__}")
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"transform: input lacks columns {missing} the preprocessor was fitted on")
        x = frame[self.columns].to_numpy(dtype="float64", copy=True)
        nan = np.isnan(x)
        flags = nan[:, [self.columns.index(c) for c in self.indicator_columns]].astype("float64")
        x = np.where(nan, self.medians, x)
        z = np.hstack([x, flags])
        z -= self.mean
        z /= self.scale
        return z

    def to_dict(self) -> dict:
        return {
            "format": PREPROCESSOR_FORMAT, "version": 1,
            "columns": self.columns,
            "impute_medians": dict(zip(self.columns, self.medians.tolist())),
            "indicator_columns": self.indicator_columns,
            "feature_names_out": self.feature_names_out,
            "scaler_mean": self.mean.tolist(),
            "scaler_scale": self.scale.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict, source="preprocessor") -> "TabularPreprocessor":
        if d.get("format") != PREPROCESSOR_FORMAT:
            raise ValueError(f"{source}: expected format {PREPROCESSOR_FORMAT!r}, got {d.get('format')!r}")
        try:
            cols = d["columns"]
            return cls(cols, [d["impute_medians"][c] for c in cols], d["indicator_columns"],
                       d["scaler_mean"], d["scaler_scale"], d.get("metadata"))
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e} in the preprocessor JSON") from None

    @classmethod
    def from_pipeline(cls, pipe, metadata=None) -> "TabularPreprocessor":
        """Read the numbers out of a fitted :func:`make_preprocessor` pipeline."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(pipe)
        union = pipe.named_steps["impute"]
        scaler = pipe.named_steps["scale"]
        imputer = union.named_transformers_["impute"]
        columns = list(imputer.feature_names_in_)
        stats = np.asarray(imputer.statistics_, dtype="float64")
        stats = np.where(np.isnan(stats), 0.0, stats)  # keep_empty_features: an all-NaN column is filled with 0
        indicators = []
        if "missing" in union.named_transformers_:
            indicators = list(union.named_transformers_["missing"].feature_names_in_)
        return cls(columns, stats, indicators, scaler.mean_, scaler.scale_, metadata)


def save_preprocessor(pipe, path, metadata=None) -> Path:
    """Write a fitted preprocessor (pipeline or :class:`TabularPreprocessor`) as readable JSON (atomically)."""
    pre = pipe if isinstance(pipe, TabularPreprocessor) else TabularPreprocessor.from_pipeline(pipe)
    d = pre.to_dict()
    if metadata:
        d["metadata"] = {**d["metadata"], **metadata}
    return write_json(path, d)


def load_preprocessor(path) -> TabularPreprocessor:
    """Read :func:`save_preprocessor` JSON (never pickle) back into a :class:`TabularPreprocessor`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preprocessor JSON not found at {path}; run notebooks/04_tabular_mlp.ipynb first")
    try:
        d = read_json(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return TabularPreprocessor.from_dict(d, source=str(path))


# --------------------------------------------------------------------------- models


#: the tabular tower's sizes and rate: the original's two hidden layers, 64-d ``tabular_embedding``,
#: dropout 0.3 and Adam 1e-4 (the fusion heads of lib.fusion.hybrid use the same)
HIDDEN = (128, 64)
EMBEDDING_DIM = 64
DROPOUT = 0.3
LEARNING_RATE = 1e-4


def tower_layer_names(hidden=HIDDEN) -> list[str]:
    """The tower's layers with weights: what notebook 04 trains and 05's fusion heads reuse, frozen."""
    names = []
    for i in range(1, len(hidden) + 1):
        names += [f"tab_dense_{i}", f"tab_batchnorm_{i}"]
    return names + [EMBEDDING_LAYER]


def tower(t, get, hidden=HIDDEN, embedding_dim: int = EMBEDDING_DIM, dropout: float = DROPOUT, seed: int = 42):
    """The one tabular tower, applied to the tensor ``t``: [Dense -> BatchNorm -> ReLU -> Dropout] per
    ``hidden`` width, then ``tabular_embedding`` (Dense ``embedding_dim``, ReLU).

    ``get(name, factory)`` returns the layer to use under ``name`` (made once by ``factory``), so the
    MLP here and every fusion head of :mod:`lib.fusion.hybrid` build the same layers under the same
    names and a trained tower's weights move between them by name.  Dropout seeds derive from ``seed``.
    """
    from keras import layers

    if not 0 <= dropout < 1:
        raise ValueError(f"parameter 'dropout': expected a value in [0, 1), got {dropout!r}")
    for i, width in enumerate(hidden, start=1):
        t = get(f"tab_dense_{i}", lambda n, w=width: layers.Dense(w, use_bias=False, name=n))(t)
        t = get(f"tab_batchnorm_{i}", lambda n: layers.BatchNormalization(name=n))(t)
        t = get(f"tab_relu_{i}", lambda n: layers.Activation("relu", name=n))(t)
        t = get(f"tab_dropout_{i}", lambda n, i=i: layers.Dropout(dropout, seed=seed + 10 + i, name=n))(t)
    return get(EMBEDDING_LAYER, lambda n: layers.Dense(embedding_dim, activation="relu", name=n))(t)


def layer_factory():
    """A fresh ``get(name, factory)`` for :func:`tower`: each name made once."""
    made = {}

    def get(name, factory):
        if name not in made:
            made[name] = factory(name)
        return made[name]

    return get


def build_mlp(n_features: int, hidden=HIDDEN, dropout: float = DROPOUT, embedding_dim: int = EMBEDDING_DIM,
              lr: float = LEARNING_RATE, seed: int = 42):
    """Keras functional MLP: ``tabular`` input -> :func:`tower` -> Dropout -> ``risk`` (Dense 1, sigmoid).
    Compiled with Adam(``lr``), binary cross-entropy, AUC and PR-AUC metrics.
    """
    import keras
    from keras import layers

    if not isinstance(n_features, (int, np.integer)) or n_features < 1:
        raise ValueError(f"parameter 'n_features': expected a positive integer, got {n_features!r}")
    inp = keras.Input(shape=(int(n_features),), name=INPUT_LAYER)
    emb = tower(inp, layer_factory(), hidden, embedding_dim, dropout, seed)
    x = layers.Dropout(dropout, seed=seed + 1, name="embedding_dropout")(emb)
    out = layers.Dense(1, activation="sigmoid", name=OUTPUT_LAYER)(x)
    model = keras.Model(inp, out, name="tabular_mlp")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.AUC(curve="PR", name="ap")])
    model.optimizer.build(model.trainable_variables)
    return model


def embedding_model(model):
    """``tabular`` input -> ``tabular_embedding`` output: the 64-d branch the fusion model reuses."""
    import keras

    return keras.Model(model.get_layer(INPUT_LAYER).output, model.get_layer(EMBEDDING_LAYER).output,
                       name="tabular_branch")


def fresh_mlp(n_features: int, seed: int, **mlp_kwargs):
    """:func:`build_mlp` after ``keras.utils.set_random_seed(seed)``: every initialiser and dropout seeded."""
    import keras

    keras.utils.set_random_seed(seed)
    return build_mlp(n_features, seed=seed, **mlp_kwargs)


def train_mlp(x, y, epochs: int, seed: int = 42, batch_size: int = 32, val_fraction: float = 0.2,
              patience: int = 20, trainer=None, **mlp_kwargs):
    """Build and train :func:`build_mlp` on preprocessed ``x`` with :class:`lib.training.BinaryTrainer`;
    returns ``(model, info)``.

    An inner stratified ``val_fraction`` of (x, y) is held out; training stops when its AUC has not
    improved for ``patience`` epochs and the best weights are restored.  Class weights come from the
    rows trained on.  Pass ``trainer`` (a ``BinaryTrainer`` of a ``build_mlp`` model with as many
    inputs) to reuse its traced graph: it is reset to the fresh model of ``seed`` first.
    ``info``: ``epochs_run``, ``best_epoch`` (1-based), ``val_auc`` and the loop's record.
    """
    from sklearn.model_selection import train_test_split

    from lib.training import BinaryTrainer

    x = np.asarray(x, dtype="float32")
    y = np.asarray(y).astype("float32")
    tr, val = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=seed)
    fresh = fresh_mlp(x.shape[1], seed, **mlp_kwargs)
    if trainer is None:
        trainer = BinaryTrainer(fresh, batch_size)
    elif trainer.model.input_shape[-1] != x.shape[1]:
        raise ValueError(f"trainer: built for {trainer.model.input_shape[-1]} features, x has {x.shape[1]}")
    else:
        trainer.reset(fresh)
    info = trainer.fit(x[tr], y[tr], x[val], y[val], epochs, seed, patience, monitor="val_auc")
    info["val_auc"] = info["best_val_auc"]
    return trainer.model, info


SKLEARN_DEFAULTS = {
    "logreg": dict(C=1.0, class_weight="balanced", max_iter=5000),
    "rf": dict(n_estimators=200, min_samples_leaf=5, class_weight="balanced_subsample", n_jobs=1),
}


def _sklearn_model(name: str, seed: int, **overrides):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    if name == "logreg":
        return LogisticRegression(**{**SKLEARN_DEFAULTS["logreg"], **overrides})
    if name == "rf":
        return RandomForestClassifier(**{**SKLEARN_DEFAULTS["rf"], "random_state": seed, **overrides})
    raise ValueError(f"parameter 'model': expected one of {MODELS}, got {name!r}")


# --------------------------------------------------------------------------- cross-validation


def cv_splits(y, n_splits: int = 5, n_repeats: int = 1, seed: int = 42):
    """``[(repeat, fold, train_idx, test_idx), ...]`` from one seeded ``RepeatedStratifiedKFold``."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    rskf = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    y = np.asarray(y)
    return [(i // n_splits, i % n_splits, tr, te)
            for i, (tr, te) in enumerate(rskf.split(np.zeros(len(y)), y))]


def _fingerprint(idx) -> str:
    return hashlib.sha1(np.sort(np.asarray(idx, dtype="int64")).tobytes()).hexdigest()[:12]


@dataclass
class CVResult:
    """Per-fold scores (``folds``) and out-of-fold predictions (``oof``) of one or more models."""

    folds: pd.DataFrame   # model, repeat, fold, auc, ap, n_train, n_test, n_pos_test, test_fingerprint, ...
    oof: pd.DataFrame     # model, repeat, row, y, score
    features: list[str] = field(default_factory=list)
    include_leaky: bool = False
    settings: dict = field(default_factory=dict)

    def summary(self, label: str | None = None) -> pd.DataFrame:
        """One row per model: AUC and AP mean, std and corrected 95% CI over folds."""
        ratio = 1 / (self.settings.get("n_splits", 5) - 1)
        rows = []
        for model, g in self.folds.groupby("model", sort=False):
            row = {"model": model if label is None else f"{model} ({label})"}
            for m in ("auc", "ap"):
                s = metrics.cv_summary(g[m], test_train_ratio=ratio)
                row.update({f"{m}_mean": s["mean"], f"{m}_std": s["std"], f"{m}_ci_low": s["ci_low"],
                            f"{m}_ci_high": s["ci_high"]})
            row["folds"] = len(g)
            rows.append(row)
        return pd.DataFrame(rows).set_index("model")

    def scores(self, model: str, repeat: int = 0):
        """``(y, score)`` out-of-fold for one repeat: every row scored exactly once."""
        g = self.oof[(self.oof["model"] == model) & (self.oof["repeat"] == repeat)].sort_values("row")
        return g["y"].to_numpy(), g["score"].to_numpy()


def cross_validate(data, model="mlp", include_leaky: bool = False, n_splits: int = 5, n_repeats: int = 1,
                   seed: int = 42, epochs: int = 200, batch_size: int = 32, patience: int = 20,
                   target: str = TARGET, progress: bool = True, mlp_kwargs: dict | None = None,
                   model_params: dict | None = None) -> CVResult:
    """Repeated stratified K-fold of ``model`` (``"mlp"``, ``"logreg"``, ``"rf"`` or a list of them).

    Every model sees the SAME folds (one ``RepeatedStratifiedKFold(random_state=seed)``); in each
    fold a fresh :func:`make_preprocessor` is fitted on the training rows only.  The MLP uses
    :func:`train_mlp` (inner stratified validation split for early stopping, class weights);
    logistic regression and the random forest use balanced class weights (:data:`SKLEARN_DEFAULTS`;
    override per model with ``model_params={"rf": {"n_estimators": 50}}``).  ``mlp_kwargs`` go to
    :func:`build_mlp`.  Returns a :class:`CVResult` (per-fold AUC/AP and out-of-fold scores).
    """
    from tqdm import tqdm

    from lib.training import BinaryTrainer

    for name, value, low in (("n_splits", n_splits, 2), ("n_repeats", n_repeats, 1), ("epochs", epochs, 1),
                             ("batch_size", batch_size, 1), ("patience", patience, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"parameter {name!r}: expected an integer >= {low}, got {value!r}")
    models = [model] if isinstance(model, str) else list(model)
    for m in models:
        if m not in MODELS:
            raise ValueError(f"parameter 'model': expected one of {MODELS}, got {m!r}")
    frame = data.frame if isinstance(data, UciData) else data
    cols = feature_columns(frame, include_leaky=include_leaky, target=target)
    y = frame[target].to_numpy().astype(int)
    splits = cv_splits(y, n_splits, n_repeats, seed)
    rows, oof = [], []
    bar = tqdm(total=len(splits) * len(models), disable=not progress, mininterval=5.0,
               desc=f"CV {'+'.join(models)}{' (leaky)' if include_leaky else ''}")
    trainer = None
    for repeat, fold, tr, te in splits:
        pre = make_preprocessor(cols).fit(frame.iloc[tr][cols])
        x_tr, x_te = pre.transform(frame.iloc[tr][cols]), pre.transform(frame.iloc[te][cols])
        fold_seed = seed + 1000 * repeat + fold
        for m in models:
            t0 = time.perf_counter()
            info = {}
            if m == "mlp":
                if trainer is None or trainer.model.input_shape[-1] != x_tr.shape[1]:  # traced once, reset per fold
                    trainer = BinaryTrainer(build_mlp(x_tr.shape[1], **(mlp_kwargs or {})), batch_size)
                _, info = train_mlp(x_tr, y[tr], epochs=epochs, seed=fold_seed, batch_size=batch_size,
                                    patience=patience, trainer=trainer, **(mlp_kwargs or {}))
                score = trainer.predict(x_te)
                info = {k: info[k] for k in ("epochs_run", "best_epoch", "val_auc")}
            else:
                clf = _sklearn_model(m, fold_seed, **(model_params or {}).get(m, {})).fit(x_tr, y[tr])
                score = clf.predict_proba(x_te)[:, 1]
            rows.append(dict(model=m, repeat=repeat, fold=fold, auc=metrics.roc_auc(y[te], score),
                             ap=metrics.average_precision(y[te], score), n_train=len(tr), n_test=len(te),
                             n_pos_test=int(y[te].sum()), test_fingerprint=_fingerprint(te),
                             seconds=time.perf_counter() - t0, **info))
            oof.append(pd.DataFrame(dict(model=m, repeat=repeat, row=te, y=y[te], score=score)))
            bar.update()
    bar.close()
    settings = dict(n_splits=n_splits, n_repeats=n_repeats, seed=seed, epochs=epochs, batch_size=batch_size,
                    patience=patience, target=target)
    return CVResult(pd.DataFrame(rows), pd.concat(oof, ignore_index=True), cols, include_leaky, settings)


# --------------------------------------------------------------------------- final model


#: every non-binary UCI feature is an age, a count or a number of years: none is negative or above this
PLAUSIBLE_MAX = 120.0


def feature_ranges(frame: pd.DataFrame) -> dict:
    """Per column: ``train_min``/``train_max`` (observed), ``binary`` and the ``allowed`` [low, high]
    that :mod:`lib.serve.inference` enforces: [0, 1] for 0/1 columns, else [min(0, train_min),
    max(120, train_max)] (ages, counts and years of a human life)."""
    out = {}
    for c in frame.columns:
        v = frame[c].dropna().to_numpy(dtype="float64")
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        binary = bool(len(v)) and bool(np.isin(v, [0.0, 1.0]).all())
        allowed = [0.0, 1.0] if binary else [min(0.0, lo), max(PLAUSIBLE_MAX, hi)]
        out[c] = {"train_min": lo, "train_max": hi, "binary": binary, "allowed": allowed}
    return out


def fit_preprocessor(uci_frame, uci_split, include_leaky: bool = False, target: str = TARGET):
    """:func:`make_preprocessor` fitted on the UCI **train** records of ``uci_split`` only; returns
    ``(TabularPreprocessor, features of every row (n_rows, k) float32, columns)``.

    The leaky screening columns (Hinselmann, Schiller, Citology) are excluded unless ``include_leaky``
    (the labelled demonstration).  The metadata holds the training ranges (:func:`feature_ranges`)
    that the inference tools enforce."""
    frame = getattr(uci_frame, "frame", uci_frame)
    cols = feature_columns(frame, include_leaky=include_leaky, target=target)
    train = pd.Series(uci_split, index=frame.index).astype(str).to_numpy() == "train"
    if not train.any():
        raise ValueError("uci_split: no record is marked 'train'")
    pipe = make_preprocessor(cols).fit(frame.loc[train, cols])
    meta = dict(target=target, include_leaky=bool(include_leaky), fitted_on="UCI train records of the run's UCI split",
                n_rows=int(train.sum()), n_pos=int(frame.loc[train, target].sum()),
                feature_ranges=feature_ranges(frame.loc[train, cols]), input_layer=INPUT_LAYER,
                embedding_layer=EMBEDDING_LAYER, output_layer=OUTPUT_LAYER)
    pre = TabularPreprocessor.from_pipeline(pipe, metadata=meta)
    return pre, pre.transform(frame).astype("float32"), cols


@dataclass
class Branch:
    """The tabular branch: the trained MLP, its preprocessor and what its training measured."""

    model: object                 # keras.Model from build_mlp
    preprocessor: TabularPreprocessor
    info: dict                    # epochs_run, best_epoch, best_val_auc, test_auc, n_train/val/test, include_leaky


def fit_branch(uci_frame, uci_split, epochs: int, seed: int = 42, batch_size: int = 32, patience: int = 20,
               include_leaky: bool = False, target: str = TARGET, **mlp_kwargs) -> Branch:
    """The tabular branch on its own data: preprocessing and :func:`build_mlp` fitted on the **training
    records** of the run's UCI split, early stopping on the validation records' AUC, scored once on the
    test records (``info["test_auc"]``; compare with the published anchor for risk factors alone).

    Notebook 04 trains and saves it; notebook 05 puts its tower, frozen, under every fusion head, so
    each branch learns from its own data and the fusion heads learn only how to combine them.
    """
    from lib.training import BinaryTrainer

    frame = getattr(uci_frame, "frame", uci_frame)
    pre, x, cols = fit_preprocessor(frame, uci_split, include_leaky, target)
    y = frame[target].to_numpy().astype(int)
    s = pd.Series(uci_split, index=frame.index).astype(str).to_numpy()
    model = fresh_mlp(x.shape[1], seed, **mlp_kwargs)
    tr, va, te = (s == "train"), (s == "val"), (s == "test")
    trainer = BinaryTrainer(model, batch_size)
    info = trainer.fit(x[tr], y[tr], x[va], y[va], epochs, seed, patience, monitor="val_auc")
    info.pop("history")
    info.update(test_auc=metrics.roc_auc(y[te], trainer.predict(x[te])) if 0 < y[te].sum() < te.sum() else None, n_train=int(tr.sum()), n_val=int(va.sum()), n_test=int(te.sum()),
                include_leaky=bool(include_leaky), seed=int(seed), columns=list(cols))
    pre.metadata.update(branch={k: v for k, v in info.items() if k != "columns"})
    return Branch(model, pre, info)


def save_branch(branch: Branch, model_path, preprocessor_path) -> None:
    """The model (``.keras``) and its preprocessor (JSON, with the training record), each atomically."""
    with atomic_path(Path(model_path)) as tmp:
        branch.model.save(tmp)
    write_json(Path(preprocessor_path), branch.preprocessor.to_dict())


def load_branch(model_path, preprocessor_path) -> Branch:
    """What :func:`save_branch` wrote; a clear error names a missing or foreign file."""
    import keras

    for path in (model_path, preprocessor_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"tabular branch file not found: {path} (notebook 04 writes it)")
    pre = load_preprocessor(preprocessor_path)
    model = keras.models.load_model(model_path)
    try:
        model.get_layer(EMBEDDING_LAYER)
    except ValueError:
        raise ValueError(f"{model_path}: no layer {EMBEDDING_LAYER!r}; expected a model from lib.tabular.mlp.build_mlp") from None
    if model.input_shape[-1] != pre.n_features_out:
        raise ValueError(f"{model_path}: {model.input_shape[-1]} inputs, but {preprocessor_path} makes {pre.n_features_out}")
    return Branch(model, pre, dict(pre.metadata.get("branch", {}), columns=list(pre.columns)))


def branch_for_fusion(run, uci_frame, uci_split, epochs: int, screening: bool = False) -> Branch:
    """Notebook 05's tabular branch: notebook 04's saved one when it was trained on this run's UCI split
    with this seed, else the same :func:`fit_branch`, in memory, with the reason in ``info["source"]``."""
    suffix = "_screening" if screening else ""
    model_path, pre_path = run.path("tabular_model" + suffix), run.path("tabular_preprocessor" + suffix)
    s = pd.Series(uci_split).astype(str)
    frame = getattr(uci_frame, "frame", uci_frame)
    want = dict(seed=int(run.params["seed"]), include_leaky=bool(screening), n_train=int((s == "train").sum()),
                n_val=int((s == "val").sum()), n_test=int((s == "test").sum()))
    if model_path.is_file() and pre_path.is_file():
        saved = load_branch(model_path, pre_path)
        got = {k: saved.info.get(k) for k in want}
        if got == want:
            saved.info["source"] = f"notebook 04's, reloaded from {run.relpath(model_path)}"
            return saved
        why = f"the saved one was trained with {got}, this run needs {want}"
    else:
        why = f"{run.relpath(model_path)} not found (notebook 04 has not run in this build folder)"
    b = fit_branch(frame, s.to_numpy(), epochs=epochs, seed=want["seed"], include_leaky=screening)
    b.info["source"] = f"trained here with notebook 04's recipe: {why}"
    return b


# --------------------------------------------------------------------------- tables and figures


def missingness_table(data, columns=MISSING_INDICATOR_COLUMNS, target: str = TARGET) -> pd.DataFrame:
    """Why the indicators: per column, how many answers are missing and the ``target`` rate
    among women who declined vs answered."""
    frame = data.frame if isinstance(data, UciData) else data
    rows = []
    for c in columns:
        if c not in frame.columns:
            continue
        miss = frame[c].isna()
        rows.append(dict(column=c, n_missing=int(miss.sum()), share_missing=float(miss.mean()),
                         rate_if_missing=float(frame.loc[miss, target].mean()) if miss.any() else float("nan"),
                         rate_if_answered=float(frame.loc[~miss, target].mean())))
    return pd.DataFrame(rows).set_index("column")


def paired_delta(base: CVResult, other: CVResult, metric: str = "auc") -> pd.DataFrame:
    """``other - base`` per model on the folds both ran (matched by repeat, fold and test rows).

    Columns: base, other (means over the shared folds), delta_mean, delta_min, folds, same_folds
    (True when every matched fold has the same test rows in both runs).
    """
    keys = ["model", "repeat", "fold"]
    m = base.folds[keys + [metric, "test_fingerprint"]].merge(
        other.folds[keys + [metric, "test_fingerprint"]], on=keys, suffixes=("_base", "_other"))
    if m.empty:
        raise ValueError("paired_delta: the two results share no (model, repeat, fold)")
    m["delta"] = m[f"{metric}_other"] - m[f"{metric}_base"]
    m["same"] = m["test_fingerprint_base"] == m["test_fingerprint_other"]
    g = m.groupby("model", sort=False)
    return pd.DataFrame({"base": g[f"{metric}_base"].mean(), "other": g[f"{metric}_other"].mean(),
                         "delta_mean": g["delta"].mean(), "delta_min": g["delta"].min(),
                         "folds": g.size(), "same_folds": g["same"].all()})


def summary_table(results: dict) -> pd.DataFrame:
    """``{label: CVResult}`` -> one row per (setting, model) with AUC/AP mean, std, 95% CI and fold count."""
    parts = []
    for label, res in results.items():
        t = res.summary().reset_index()
        t.insert(0, "setting", label)
        parts.append(t)
    return pd.concat(parts, ignore_index=True).set_index(["setting", "model"])


def plot_cv_folds(results: dict, metric: str = "auc", anchor: float | None = None,
                  anchor_label: str = "published anchor"):
    """Box + strip plot of per-fold ``metric`` for ``{label: CVResult}``; returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = pd.concat([r.folds.assign(setting=label) for label, r in results.items()], ignore_index=True)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.boxplot(data=df, x="model", y=metric, hue="setting", ax=ax, fliersize=0, width=0.6, boxprops={"alpha": 0.4})
    sns.stripplot(data=df, x="model", y=metric, hue="setting", dodge=True, ax=ax, size=4, alpha=0.8, legend=False)
    if anchor is not None:
        ax.axhline(anchor, ls="--", c="k", lw=1, label=f"{anchor_label} ({anchor:.2f})")
    if metric == "auc":
        ax.axhline(0.5, ls=":", c="grey", lw=1, label="chance (0.50)")
    ax.set(ylabel=f"per-fold {metric.upper()}", xlabel="", title=f"Cross-validated {metric.upper()} per fold")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
