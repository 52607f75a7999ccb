"""lib.tabular.mlp: in-fold preprocessing, the JSON preprocessor, the MLP, shared CV folds, the final fit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.data import uci
from lib import training
from lib.tabular import mlp

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "data" / "uci" / "risk_factors_cervical_cancer.csv"
needs_real = pytest.mark.skipif(not REAL_CSV.is_file(),
                                reason=f"real UCI CSV not present at {REAL_CSV} (run `make data`)")


def toy_frame(n=120, seed=0) -> pd.DataFrame:
    """A UCI-shaped frame: a few features (with block-wise missingness), leaky columns, Biopsy."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype("int64")
    y[:4] = 1
    f = pd.DataFrame({
        "Age": rng.normal(30, 8, n) + 4 * y,
        "Num of pregnancies": rng.integers(0, 5, n).astype(float),
        "Smokes": (rng.random(n) < 0.2).astype(float),
        "Hormonal Contraceptives": (rng.random(n) < 0.6).astype(float),
        "STDs": (rng.random(n) < 0.1).astype(float),
        "Dx": (rng.random(n) < 0.05).astype(float),
    })
    f.loc[rng.random(n) < 0.15, "Hormonal Contraceptives"] = np.nan
    f.loc[rng.random(n) < 0.10, "Num of pregnancies"] = np.nan
    f.loc[:9, "Age"] = np.nan  # Age has no indicator
    for c in uci.LEAKY_COLUMNS:
        f[c] = np.where(rng.random(n) < 0.85, y, 1 - y).astype("int64")
    f["Biopsy"] = y
    return f


FEATURES = ["Age", "Num of pregnancies", "Smokes", "Hormonal Contraceptives", "STDs", "Dx"]


# --------------------------------------------------------------------------- preprocessing


def test_preprocessor_is_fitted_on_training_rows_only():
    f = toy_frame()
    train, test = f.iloc[:80], f.iloc[80:]
    pipe = mlp.make_preprocessor(FEATURES).fit(train[FEATURES])
    names = list(pipe.get_feature_names_out())
    assert names == FEATURES + [f"missingindicator_{c}" for c in
                                ("Num of pregnancies", "Smokes", "Hormonal Contraceptives", "STDs")]
    imputer = pipe.named_steps["impute"].named_transformers_["impute"]
    np.testing.assert_array_equal(imputer.statistics_, train[FEATURES].median().to_numpy())
    assert not np.allclose(imputer.statistics_, f[FEATURES].median().to_numpy())
    # scaler mean = mean of the imputed TRAINING rows, not of all rows
    imputed_train = train[FEATURES].fillna(train[FEATURES].median())
    scaler = pipe.named_steps["scale"]
    np.testing.assert_allclose(scaler.mean_[:len(FEATURES)], imputed_train.mean().to_numpy(), rtol=1e-12)
    imputed_all = f[FEATURES].fillna(f[FEATURES].median())
    assert not np.allclose(scaler.mean_[:len(FEATURES)], imputed_all.mean().to_numpy())
    np.testing.assert_allclose(scaler.mean_[-2], train["Hormonal Contraceptives"].isna().mean())
    # training rows come out standardised, test rows with the training statistics
    z = pipe.transform(train[FEATURES])
    np.testing.assert_allclose(z[:, :len(FEATURES)].mean(axis=0), 0, atol=1e-12)
    zt = pipe.transform(test[FEATURES])
    assert not np.isnan(zt).any()


def test_indicator_width_is_fixed_even_without_missing_values_in_the_fold():
    f = toy_frame()
    complete = f.dropna()
    pipe = mlp.make_preprocessor(FEATURES).fit(complete[FEATURES])
    assert pipe.transform(f[FEATURES]).shape[1] == len(FEATURES) + 4


def test_all_missing_column_in_training_fold():
    f = toy_frame()
    train = f.iloc[:60].copy()
    train["Smokes"] = np.nan
    pipe = mlp.make_preprocessor(FEATURES).fit(train[FEATURES])
    loaded = mlp.TabularPreprocessor.from_pipeline(pipe)
    np.testing.assert_array_equal(loaded.transform(f), pipe.transform(f[FEATURES]))


def test_json_round_trip_is_exact(tmp_path):
    f = toy_frame(seed=3)
    pipe = mlp.make_preprocessor(FEATURES).fit(f.iloc[:90][FEATURES])
    path = mlp.save_preprocessor(pipe, tmp_path / "pre.json", metadata={"target": "Biopsy"})
    text = path.read_text(encoding="utf-8")
    d = json.loads(text)  # plain JSON, human-readable, no pickle
    assert d["format"] == mlp.PREPROCESSOR_FORMAT and d["columns"] == FEATURES
    assert set(d["impute_medians"]) == set(FEATURES)
    assert d["indicator_columns"] == ["Num of pregnancies", "Smokes", "Hormonal Contraceptives", "STDs"]
    assert len(d["scaler_mean"]) == len(d["scaler_scale"]) == len(FEATURES) + 4
    assert d["metadata"]["target"] == "Biopsy"
    loaded = mlp.load_preprocessor(path)
    test = f.iloc[90:]
    np.testing.assert_array_equal(loaded.transform(test), pipe.transform(test[FEATURES]))
    # extra columns and a different column order in the input do not matter
    shuffled = test[list(reversed(test.columns))]
    np.testing.assert_array_equal(loaded.transform(shuffled), pipe.transform(test[FEATURES]))
    assert loaded.feature_names_out == list(pipe.get_feature_names_out())
    # saving the loaded form again gives the same file
    again = mlp.save_preprocessor(loaded, tmp_path / "again.json")
    assert again.read_text(encoding="utf-8") == text


def test_load_preprocessor_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        mlp.load_preprocessor(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}', encoding="utf-8")
    with pytest.raises(ValueError, match="format"):
        mlp.load_preprocessor(bad)
    pipe = mlp.make_preprocessor(FEATURES).fit(toy_frame()[FEATURES])
    loaded = mlp.TabularPreprocessor.from_pipeline(pipe)
    with pytest.raises(ValueError, match="lacks columns"):
        loaded.transform(toy_frame().drop(columns=["Dx"]))


def test_class_weights():
    w = training.class_weights([0, 0, 0, 1])
    assert w == {0: 4 / 6, 1: 2.0}
    with pytest.raises(ValueError):
        training.class_weights([0, 0])


# --------------------------------------------------------------------------- folds


def test_cross_validate_uses_identical_folds_for_all_models():
    f = toy_frame(n=150)
    res = mlp.cross_validate(f, ["logreg", "rf"], n_splits=3, n_repeats=2, seed=5, progress=False,
                                 model_params={"rf": {"n_estimators": 20}})
    fp = res.folds.pivot(index=["repeat", "fold"], columns="model", values="test_fingerprint")
    assert (fp["logreg"] == fp["rf"]).all() and len(fp) == 6
    # separate calls (honest vs leaky) with the same seed see the same folds too
    leaky = mlp.cross_validate(f, "logreg", include_leaky=True, n_splits=3, n_repeats=2, seed=5, progress=False)
    assert list(leaky.folds["test_fingerprint"]) == list(res.folds.query("model == 'logreg'")["test_fingerprint"])
    # one repeat = the first repeat of more
    one = mlp.cross_validate(f, "logreg", n_splits=3, n_repeats=1, seed=5, progress=False)
    assert list(one.folds["test_fingerprint"]) == list(fp["logreg"].loc[0])
    # every row is scored exactly once per repeat, folds are stratified
    y, s = res.scores("rf", repeat=1)
    np.testing.assert_array_equal(y, f["Biopsy"].to_numpy())
    assert res.folds["n_pos_test"].max() - res.folds["n_pos_test"].min() <= 1
    assert leaky.features == uci.feature_columns(f, include_leaky=True)
    assert not set(uci.LEAKY_COLUMNS) & set(res.features)
    t = mlp.summary_table({"honest": res, "leaky": leaky})
    assert {"auc_mean", "auc_ci_low", "ap_mean", "folds"} <= set(t.columns)
    assert t.loc[("leaky", "logreg"), "auc_mean"] > t.loc[("honest", "logreg"), "auc_mean"]


def test_cross_validate_rejects_unknown_model():
    with pytest.raises(ValueError, match="model"):
        mlp.cross_validate(toy_frame(), "svm", progress=False)


def test_cv_splits_deterministic():
    y = toy_frame()["Biopsy"].to_numpy()
    a = mlp.cv_splits(y, 5, 2, seed=1)
    b = mlp.cv_splits(y, 5, 2, seed=1)
    assert len(a) == 10
    for (ra, fa, tra, tea), (rb, fb, trb, teb) in zip(a, b):
        assert (ra, fa) == (rb, fb)
        np.testing.assert_array_equal(tea, teb)
        assert not set(tra) & set(tea)


# --------------------------------------------------------------------------- Keras (slow, but seconds)


@pytest.mark.slow
def test_build_mlp_named_layers():
    import keras

    m = mlp.build_mlp(12)
    assert m.get_layer("tabular").output.shape[-1] == 12
    emb = m.get_layer("tabular_embedding")
    assert emb.units == 64 and emb.activation.__name__ == "relu"
    risk = m.get_layer("risk")
    assert risk.units == 1 and risk.activation.__name__ == "sigmoid"
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in m.layers) == 2
    assert sum(isinstance(layer, keras.layers.Dropout) for layer in m.layers) == 3
    assert float(m.optimizer.learning_rate) == pytest.approx(1e-4)
    assert mlp.embedding_model(m).output.shape[-1] == 64
    with pytest.raises(ValueError, match="n_features"):
        mlp.build_mlp(0)


@pytest.mark.slow
@needs_real
def test_mlp_trains_on_real_data_and_is_deterministic():
    from lib.training import BinaryTrainer

    d = uci.load_uci(REAL_CSV)
    cols = uci.feature_columns(d)
    x = mlp.make_preprocessor(cols).fit_transform(d.frame[cols])
    y = d.frame["Biopsy"].to_numpy()
    trainer = BinaryTrainer(mlp.build_mlp(x.shape[1]))
    model, info = mlp.train_mlp(x, y, epochs=4, seed=3, patience=2, trainer=trainer)
    assert model is trainer.model and info["monitor"] == "val_auc"
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= 4
    p1 = trainer.predict(x)
    assert p1.shape == (len(y),) and ((p1 > 0) & (p1 < 1)).all()
    _, info2 = mlp.train_mlp(x, y, epochs=4, seed=3, patience=2, trainer=trainer)
    np.testing.assert_array_equal(trainer.predict(x), p1)  # reset() makes a rerun identical
    assert info2 == info
    np.testing.assert_allclose(model.predict(x.astype("float32"), verbose=0).ravel(), p1, rtol=1e-5, atol=1e-6)
    fresh, _ = mlp.train_mlp(x, y, epochs=4, seed=3, patience=2)  # a new trainer: the same numbers
    np.testing.assert_allclose(fresh.predict(x.astype("float32"), verbose=0).ravel(), p1, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_real
def test_cross_validate_mlp_on_real_data_shares_folds():
    d = uci.load_uci(REAL_CSV)
    res = mlp.cross_validate(d, ["mlp", "logreg"], n_splits=3, epochs=3, progress=False)
    fp = res.folds.pivot(index="fold", columns="model", values="test_fingerprint")
    assert (fp["mlp"] == fp["logreg"]).all()
    assert res.folds["auc"].between(0, 1).all()
    assert res.folds.query("model == 'mlp'")["epochs_run"].le(3).all()


def toy_split(n: int) -> np.ndarray:
    return np.array((["train"] * 7 + ["val"] * 2 + ["test"]) * (n // 10) + ["train"] * (n % 10))


@pytest.mark.slow
def test_fit_branch_learns_on_train_records_saves_and_reloads(tmp_path):
    f = toy_frame(n=200)
    split = toy_split(len(f))
    b = mlp.fit_branch(f, split, epochs=30, seed=2, patience=5)
    i = b.info
    assert (i["n_train"], i["n_val"], i["n_test"]) == tuple(int((split == s).sum()) for s in ("train", "val", "test"))
    assert 1 <= i["best_epoch"] <= i["epochs_run"] <= 30 and i["monitor"] == "val_auc"
    assert 0 <= i["test_auc"] <= 1 and i["include_leaky"] is False
    assert not set(uci.LEAKY_COLUMNS) & set(b.preprocessor.columns)
    meta = b.preprocessor.metadata  # fitted on the training records only, with the ranges inference enforces
    assert meta["n_rows"] == i["n_train"] and set(meta["feature_ranges"]) == set(b.preprocessor.columns)
    mp, pp = tmp_path / "m.keras", tmp_path / "p.json"
    mlp.save_branch(b, mp, pp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "p.json"]  # no temporary files left
    again = mlp.load_branch(mp, pp)
    assert again.info["best_epoch"] == i["best_epoch"] and again.info["columns"] == list(b.preprocessor.columns)
    x = again.preprocessor.transform(f).astype("float32")
    np.testing.assert_allclose(again.model.predict(x, verbose=0), b.model.predict(x, verbose=0), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="notebook 04"):
        mlp.load_branch(tmp_path / "absent.keras", pp)
    with pytest.raises(ValueError, match="train"):
        mlp.fit_branch(f, np.array(["test"] * len(f)), epochs=2)


def test_missingness_table_by_hand():
    f = pd.DataFrame({"Smokes": [np.nan, np.nan, 1.0, 0.0, 0.0], "STDs": [0.0] * 5, "Biopsy": [1, 0, 1, 0, 0]})
    t = mlp.missingness_table(f)
    assert list(t.index) == ["Smokes", "STDs"]
    assert t.loc["Smokes", "n_missing"] == 2 and t.loc["Smokes", "share_missing"] == pytest.approx(0.4)
    assert t.loc["Smokes", "rate_if_missing"] == pytest.approx(0.5)
    assert t.loc["Smokes", "rate_if_answered"] == pytest.approx(1 / 3)
    assert np.isnan(t.loc["STDs", "rate_if_missing"])


def test_paired_delta_matches_folds():
    f = toy_frame(n=150)
    base = mlp.cross_validate(f, "logreg", n_splits=3, n_repeats=2, seed=5, progress=False)
    other = mlp.cross_validate(f, "logreg", include_leaky=True, n_splits=3, n_repeats=1, seed=5, progress=False)
    d = mlp.paired_delta(base, other)
    first = base.folds.query("repeat == 0")
    assert d.loc["logreg", "folds"] == 3 and bool(d.loc["logreg", "same_folds"])
    assert d.loc["logreg", "base"] == pytest.approx(first["auc"].mean())
    assert d.loc["logreg", "delta_mean"] == pytest.approx(other.folds["auc"].mean() - first["auc"].mean())
    shifted = mlp.cross_validate(f, "logreg", n_splits=3, n_repeats=1, seed=6, progress=False)
    assert not bool(mlp.paired_delta(base, shifted).loc["logreg", "same_folds"])


@pytest.mark.parametrize("kw", [{"n_repeats": 0}, {"epochs": None}, {"n_splits": 1}, {"batch_size": 2.5}])
def test_cross_validate_validates_parameters(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        mlp.cross_validate(toy_frame(), "logreg", progress=False, **kw)
