"""Late fusion: head kinds, cached-embedding training, the assembled flat graph, saving and reloading."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib import metrics
from lib.fusion import hybrid, pairing
from lib.tabular import mlp

ROOT = Path(__file__).resolve().parents[1]


def tiny_branch(size=32, n_classes=5, seed=0):
    """A small model with the image-branch contract: ``image`` -> augmentation layers -> ...
    ``top_activation`` -> ``avg_pool`` -> ``image_embedding`` (512) -> ``class_probs``."""
    import keras
    from keras import layers

    from lib.image.input_pipeline import augmentation_layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3), name="image")
    x = inp
    for layer in augmentation_layers(seed):  # as lib.image.image_model: RandomBrightness/Contrast trip the .h5 writer
        x = layer(x)
    x = layers.Rescaling(1 / 255.0, name="rescale")(x)
    x = layers.Conv2D(8, 3, strides=4, padding="same", name="top_conv")(x)
    x = layers.Activation("relu", name="top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(0.3, name="head_dropout_1")(x)
    x = layers.Dense(512, activation="relu", name="image_embedding")(x)
    x = layers.Dropout(0.3, name="head_dropout_2")(x)
    out = layers.Dense(n_classes, activation="softmax", name="class_probs")(x)
    return keras.Model(inp, out, name="tiny_branch")


def toy_inputs(n=200, n_tab=6, seed=0, tab_signal=2.0, img_signal=0.5):
    """CohortInputs whose label is carried mostly by tabular feature 0 (and weakly by the embedding)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    emb = np.abs(rng.normal(size=(n, 512))).astype("float32")
    emb[:, :8] += img_signal * y[:, None]
    tab = rng.normal(size=(n, n_tab)).astype("float32")
    tab[:, 0] += tab_signal * y
    split = np.array(["train"] * (n * 6 // 10) + ["val"] * (n * 2 // 10) + ["test"] * (n - n * 8 // 10))
    cohort = pd.DataFrame({"split": split, "image_index": np.arange(n), "record_id": np.arange(n), "abnormal": y,
                           "group": [f"g{i}" for i in range(n)]})
    return hybrid.cohort_inputs(cohort, emb, tab, np.arange(n))


# --------------------------------------------------------------------------- no training
def test_build_head_kinds_inputs_and_outputs():
    for kind, names in (("fused", ["image_features", "tabular"]), ("attention", ["image_features", "tabular"]),
                        ("image", ["image_features"]), ("tabular", ["tabular"])):
        m = hybrid.build_head(kind, 7)
        assert [t.name for t in m.inputs] == names, kind
        assert m.output.shape[-1] == 1 and m.layers[-1].name == "risk"
        assert m.layers[-1].activation.__name__ == "sigmoid"
        assert hybrid.head_kind(m) == kind
        assert m.loss == "binary_crossentropy"
        assert float(m.optimizer.learning_rate) == pytest.approx(1e-4)
    fused = hybrid.build_head("fused", 7)
    assert fused.get_layer("tabular_embedding").units == 64
    assert fused.get_layer("fusion_concat").output.shape[-1] == 512 + 64
    assert any(layer.name == "fusion_image_dropout" for layer in fused.layers)
    with pytest.raises(ValueError, match="parameter 'kind'"):
        hybrid.build_head("late", 7)
    with pytest.raises(ValueError, match="n_tabular"):
        hybrid.build_head("fused", None)


def test_attention_weights_are_a_softmax_over_two_modalities():
    m = hybrid.build_head("attention", 5)
    rng = np.random.default_rng(0)
    w = hybrid.attention_weights(m, rng.normal(size=(9, 512)), rng.normal(size=(9, 5)))
    assert w.shape == (9, 2)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="not an attention head"):
        hybrid.attention_weights(hybrid.build_head("fused", 5), np.zeros((1, 512)), np.zeros((1, 5)))


def test_cohort_inputs_gathers_the_right_rows_and_stacks_draws():
    emb = np.arange(6 * 512, dtype="float32").reshape(6, 512)
    tab = np.arange(4 * 3, dtype="float32").reshape(4, 3) + 1000
    cohort = pd.DataFrame({"split": ["train", "train", "val", "test"], "image_index": [5, 0, 2, 3],
                           "record_id": [13, 10, 11, 12], "abnormal": [1, 0, 1, 0]})
    other = cohort.assign(record_id=[10, 13, 11, 12])
    d = hybrid.cohort_inputs(cohort, emb, tab, record_index=[10, 11, 12, 13], repairings=[other])
    np.testing.assert_array_equal(d.x_image["train"], emb[[5, 0]])
    np.testing.assert_array_equal(d.x_tabular["train"], tab[[3, 0]])
    np.testing.assert_array_equal(d.y["val"], [1.0])
    assert d.n_draws == 2
    xi, xt = d.inputs("fused", "train", draws=None)
    np.testing.assert_array_equal(xt, tab[[3, 0, 0, 3]])
    np.testing.assert_array_equal(d.labels("train", None), [1, 0, 1, 0])
    with pytest.raises(ValueError, match="draws"):
        d.inputs("fused", "train", draws=3)
    with pytest.raises(ValueError, match="record_id"):
        hybrid.cohort_inputs(cohort, emb, tab, record_index=[10, 11, 12, 99])


def test_feature_ranges_rule():
    frame = pd.DataFrame({"Age": [13.0, 84.0, np.nan], "Smokes": [0.0, 1.0, 1.0], "Packs": [0.0, 150.0, 2.0]})
    r = mlp.feature_ranges(frame)
    assert r["Age"] == {"train_min": 13.0, "train_max": 84.0, "binary": False, "allowed": [0.0, 120.0]}
    assert r["Smokes"]["binary"] and r["Smokes"]["allowed"] == [0.0, 1.0]
    assert r["Packs"]["allowed"] == [0.0, 150.0]  # a training maximum above 120 widens the range


def test_ablation_table_and_figure_from_reports():
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(1)
    y = (rng.random(80) < 0.3).astype(int)
    reps = {"good": metrics.binary_report(y, y + rng.normal(0, 0.5, 80), n_boot=50),
            "random, shuffled pairing": metrics.binary_report(y, rng.random(80), n_boot=50)}
    t = hybrid.ablation_table(reps, runs=[("good", "fused", "label_conditioned")])
    assert list(t.index) == ["good", "random, shuffled pairing"]
    for m in ("auc", "ap", "sens_at_spec", "f1", "accuracy"):
        assert {m, f"{m}_low", f"{m}_high"} <= set(t.columns)
        assert (t[f"{m}_low"] <= t[m] + 1e-9).all() and (t[m] <= t[f"{m}_high"] + 1e-9).all()
    assert t.loc["good", "auc"] > 0.8 > t.loc["random, shuffled pairing", "auc"]
    assert t.loc["good", "kind"] == "fused" and t.loc["good", "n_pos"] == y.sum()
    fig = hybrid.plot_ablation(t)
    assert len(fig.axes) == 2


def test_model_card_fields():
    t = pd.DataFrame({"auc": [0.8]}, index=["fused"])
    card = hybrid.model_card(synthetic=True, image_source="synthetic", uci_summary={"path": "/x/u.csv", "rows": 835},
                             pairing={"protocol": "label_conditioned"}, training_mode="cached_embeddings", ablation=t,
                             attention={"image": 0.6, "tabular": 0.4}, image_branch={"source": "x"},
                             tabular_columns=["Age"], classes=["A", "B"], abnormal_classes=["A"], image_size=64,
                             head_config=hybrid.HeadConfig())
    for key in ("name", "data_sources", "pairing_protocol", "training_mode", "metrics", "intended_use", "limitations",
                "threshold"):
        assert key in card
    assert card["synthetic"] is True and "not" in card["intended_use"].lower()
    assert card["metrics"]["test_split_ablation"]["fused"]["auc"] == 0.8
    json.dumps(card)  # JSON-ready
    with pytest.raises(ValueError, match="training_mode"):
        hybrid.model_card(synthetic=False, image_source="x", uci_summary={}, pairing={}, training_mode="magic",
                          ablation=t, attention={}, image_branch={}, tabular_columns=[], classes=[],
                          abnormal_classes=[], image_size=64, head_config=hybrid.HeadConfig())


# --------------------------------------------------------------------------- training (slow)
@pytest.mark.slow
def test_fit_head_learns_and_stops_early():
    d = toy_inputs()
    model, info = hybrid.fit_head("tabular", d, epochs=400, patience=10, batch_size=32, seed=3)
    score = hybrid.predict(model, d.inputs("tabular", "test"))
    assert metrics.roc_auc(d.y["test"].astype(int), score) > 0.85
    assert 1 <= info["best_epoch"] <= info["epochs_run"] < 400  # stopped early
    assert info["best_val_loss"] == min(info["history"]["val_loss"])
    # same seed, same model
    again, _ = hybrid.fit_head("tabular", d, epochs=info["epochs_run"], patience=10, batch_size=32, seed=3)
    np.testing.assert_allclose(hybrid.predict(again, d.inputs("tabular", "test")), score, atol=1e-6)


@pytest.mark.slow
def test_tabular_branch_is_trained_on_records_and_frozen_in_the_head():
    rng = np.random.default_rng(4)
    n = 300
    y = (rng.random(n) < 0.2).astype(int)
    x = rng.normal(size=(n, 6)).astype("float32")
    x[:, 0] += 2.0 * y
    split = np.array(["train"] * 200 + ["val"] * 50 + ["test"] * 50)
    frame = pd.DataFrame(x, columns=[f"Age{i}" for i in range(6)]).assign(Biopsy=y)
    b = mlp.fit_branch(frame, split, epochs=60, patience=10, seed=1)
    branch, info = b.model, b.info
    assert info["test_auc"] > 0.8 and 1 <= info["best_epoch"] <= info["epochs_run"] <= 60
    d = toy_inputs(n=80, n_tab=6, tab_signal=0.0)
    head, hinfo = hybrid.fit_head("fused", d, epochs=5, patience=5, tabular_branch=branch)
    assert hinfo["frozen_tabular_tower"]
    for name in mlp.tower_layer_names():
        assert not head.get_layer(name).trainable
        for a, b in zip(head.get_layer(name).get_weights(), branch.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)  # unchanged by training the head
    assert head.get_layer("fusion_dense").trainable


@pytest.mark.slow
def test_run_ablation_reports_and_lesson():
    lc = toy_inputs(seed=0)
    # the control: same images and records, tabular rows permuted (no label information)
    rng = np.random.default_rng(5)
    sh = hybrid.CohortInputs(lc.cohort, lc.x_image, {s: rng.permutation(v) for s, v in lc.x_tabular.items()}, lc.y)
    runs = [("image only", "image", "label_conditioned"), ("fused", "fused", "label_conditioned"),
            ("fused, shuffled pairing", "fused", "shuffled"), ("attention-fused", "attention", "label_conditioned")]
    res = hybrid.run_ablation({"label_conditioned": lc, "shuffled": sh}, epochs=60, n_boot=50, runs=runs, patience=8)
    t = hybrid.ablation_table(res.reports, runs)
    assert list(t.index) == [r[0] for r in runs]
    lesson = hybrid.pairing_lesson(res)
    assert lesson["fusion_gain"] > 0.05  # the tabular side carries the label only in the conditioned pairing
    assert set(res.attention) == {"image", "tabular"}
    assert abs(sum(res.attention.values()) - 1) < 1e-6
    h = res.headline()
    assert {"auc_fused", "auc_shuffled", "auc_image_only", "auc_attention", "fusion_gain"} <= set(h)
    with pytest.raises(ValueError, match="needs pairing"):
        hybrid.run_ablation({"label_conditioned": lc}, epochs=1, runs=[("x", "fused", "shuffled")])


@pytest.mark.slow
def test_assembled_model_is_flat_and_matches_the_head(tmp_path, image_writer):
    import keras

    from lib.explain import gradcam

    branch = tiny_branch()
    d = toy_inputs(n=60, n_tab=4)
    head, _ = hybrid.fit_head("fused", d, epochs=3, patience=3)  # trained: BatchNorm statistics moved
    paths = [image_writer(tmp_path / f"im{i}.png", size=(40, 30), value=17 * i) for i in range(5)]
    table = pd.DataFrame({"path": [str(p) for p in paths]})
    emb = hybrid.image_embeddings(branch, table)
    assert emb.shape == (5, 512)
    tab = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    model = hybrid.assemble(branch, head)
    assert [t.name for t in model.inputs] == ["image", "tabular"]
    assert model.layers[-1].name == "risk" and model.name == "hybrid_cervical_model"
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat
    assert model.get_layer("top_activation") is branch.get_layer("top_activation")
    assert model.get_layer("risk") is not head.get_layer("risk")  # the trained weights, copied
    for name in ("risk", "tabular_embedding", "tab_batchnorm_1"):
        for a, b in zip(model.get_layer(name).get_weights(), head.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    from lib.image.input_pipeline import load_images

    images = load_images(table, 32)
    full = hybrid.predict(model, [images, tab])
    cached = hybrid.predict(head, [emb, tab])
    np.testing.assert_allclose(full, cached, atol=1e-5)
    assert np.ptp(full) > 0  # not a constant model
    maps = gradcam.gradcam_tape(model, None, inputs={"image": images, "tabular": tab})
    assert maps.shape == (5, 32, 32)
    with pytest.raises(ValueError, match="tabular-only"):
        hybrid.assemble(branch, hybrid.build_head("tabular", 4))


@pytest.mark.slow
def test_assemble_on_a_real_image_classifier_keeps_top_activation():
    from lib.image import image_model

    branch = image_model.build_image_classifier(5, "efficientnet_lite0", 32, weights=None, augment=True, seed=1)
    head = hybrid.build_head("attention", 3)
    model = hybrid.assemble(branch, head)
    assert "top_activation" in [layer.name for layer in model.layers]
    assert "class_probs" not in [layer.name for layer in model.layers]  # only what leads to risk
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, size=(3, 32, 32, 3)).astype("float32")
    tab = rng.normal(size=(3, 3)).astype("float32")
    emb = hybrid.predict_raw(image_model.embedding_model(branch), images)
    np.testing.assert_allclose(hybrid.predict(model, [images, tab]), hybrid.predict(head, [emb, tab]), atol=1e-5)


@pytest.mark.slow
def test_end_to_end_mode_trains_the_flat_graph():
    branch = tiny_branch()
    model = hybrid.build_fusion_model(branch, 4)
    assert [t.name for t in model.inputs] == ["image", "tabular"] and model.layers[-1].name == "risk"
    rng = np.random.default_rng(0)
    x = [rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")]
    before = branch.get_layer("top_conv").get_weights()[0].copy()
    model.fit(x, (rng.random(16) < 0.5).astype("float32"), epochs=1, batch_size=8, verbose=0)
    assert not np.allclose(branch.get_layer("top_conv").get_weights()[0], before)  # the image side trained too
    with pytest.raises(ValueError, match="two-input"):
        hybrid.build_fusion_model(branch, 4, kind="image")


_RELOAD_SCRIPT = """
import sys, numpy as np
from lib.fusion import hybrid
z = np.load(sys.argv[1])
out = {}
for name in ("keras", "h5"):
    m = hybrid.load_hybrid(sys.argv[2] + "/hybrid_cervical_model." + name)
    out[name] = hybrid.predict(m, [z["images"], z["tab"]])
    out[name + "_optimizer"] = np.array(type(m.optimizer).__name__)
    out[name + "_lr"] = np.array(float(m.optimizer.learning_rate))
np.savez(sys.argv[3], **out)
"""


@pytest.mark.slow
def test_save_hybrid_and_reload_in_a_fresh_process(tmp_path):
    import keras

    from lib.tabular import mlp

    branch = tiny_branch()
    d = toy_inputs(n=60, n_tab=3)
    head, _ = hybrid.fit_head("fused", d, epochs=2, patience=2)
    model = hybrid.assemble(branch, head)
    pre = mlp.TabularPreprocessor(["Age", "Smokes", "IUD"], [30.0, 0.0, 0.0], [], [30.0, 0.1, 0.1],
                                      [8.0, 0.3, 0.3], metadata={"feature_ranges": {}})
    paths = hybrid.save_hybrid(model, tmp_path, preprocessor=pre, card={"name": "hybrid_cervical_model"})
    assert {p.name for p in tmp_path.iterdir()} == {"hybrid_cervical_model.keras", "hybrid_cervical_model.h5",
                                                     "hybrid_tabular_preprocessor.json", "hybrid_cervical_model_card.json"}
    card = json.loads(paths["card"].read_text())
    assert card["files"]["h5"] == "hybrid_cervical_model.h5"
    assert mlp.load_preprocessor(paths["preprocessor"]).columns == ["Age", "Smokes", "IUD"]
    # the in-memory model keeps its Adam optimizer (the .h5 was written from a reload, not from it)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    again = tmp_path / "again.keras"
    model.save(again)
    assert isinstance(keras.saving.load_model(again).optimizer, keras.optimizers.Adam)

    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    tab = rng.normal(size=(4, 3)).astype("float32")
    np.savez(tmp_path / "in.npz", images=images, tab=tab)
    expected = hybrid.predict(model, [images, tab])
    proc = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path),
                           str(tmp_path / "out.npz")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["keras"], expected, atol=1e-5)
    np.testing.assert_allclose(got["h5"], expected, atol=1e-5)
    assert str(got["h5_optimizer"]) == "Adam" and float(got["h5_lr"]) == pytest.approx(1e-4)
    assert str(got["keras_optimizer"]) == "Adam"


def test_load_hybrid_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="05_late_fusion"):
        hybrid.load_hybrid(tmp_path / "hybrid_cervical_model.keras")
    (tmp_path / "m.onnx").write_text("x")
    with pytest.raises(ValueError, match="'.keras' or '.h5'"):
        hybrid.load_hybrid(tmp_path / "m.onnx")


def test_pairing_inputs_keys_and_draws():
    rows = [dict(path=f"/x/{c}/{g}_{k}.bmp", label=c, group=f"{c}/{g}", abnormal=c in "AB")
            for c in "ABCD" for g in range(10) for k in range(2)]
    images = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    uci = pd.DataFrame({"Age": rng.integers(15, 60, 300).astype(float), "Biopsy": (np.arange(300) % 8 == 0).astype(int)})
    usplit = pairing.split_uci(uci, seed=1)
    emb = rng.normal(size=(len(images), 512))
    feats = uci[["Age"]].to_numpy()
    data = hybrid.pairing_inputs(images, uci, usplit, emb, {"": feats, "+age2": feats * 2}, seed=1, n_repairings=3)
    assert sorted(data) == ["label_conditioned", "label_conditioned+age2", "shuffled", "shuffled+age2"]
    lc = data["label_conditioned"]
    assert lc.n_draws == 4
    assert (lc.cohort["record_target"] == lc.cohort["abnormal"]).all()
    # every draw of the label-conditioned protocol keeps the label link; ages come from the paired records
    pos = uci.index.get_indexer(lc.cohort["record_id"])
    m = (lc.cohort["split"] == "test").to_numpy()
    np.testing.assert_allclose(lc.x_tabular["test"][:, 0], feats[pos[m], 0])
    np.testing.assert_allclose(data["label_conditioned+age2"].x_tabular["test"][:, 0], 2 * feats[pos[m], 0])
    _, xt = lc.inputs("fused", "test", None)
    assert len(xt) == 4 * m.sum()
    assert hybrid.repairing_seeds(1, 3) == [1001, 1002, 1003]


def test_pairing_lesson_measures_manufactured_tabular_information():
    from types import SimpleNamespace

    auc = {"fused": 0.99, "fused, shuffled pairing": 1.0, "image only": 0.98,
           "tabular only": 0.78, "tabular only, shuffled pairing": 0.49}
    lesson = hybrid.pairing_lesson(SimpleNamespace(averaged={k: {"auc": v} for k, v in auc.items()}))
    assert lesson["tabular_information_manufactured"] == pytest.approx(0.29)
    assert lesson["fusion_gain"] == pytest.approx(-0.01)  # a near-perfect image branch leaves nothing to gain


@pytest.mark.slow
def test_image_head_on_features_trains_the_branch_itself_and_keeps_its_best_epoch():
    """05's fallback when 03 has not run: the branch's own head layers learn from pooled features."""
    import keras

    branch = tiny_branch(n_classes=3, seed=1)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    feats = rng.normal(size=(120, 8)).astype("float32")
    feats[np.arange(120), y] += 3.0  # class k lifts feature k: learnable by the head
    va = rng.permutation(120)[:30]
    tr = np.setdiff1d(np.arange(120), va)
    before = branch.get_layer("class_probs").get_weights()[0].copy()
    info = hybrid.fit_image_head_on_features(branch, feats[tr], y[tr], feats[va], y[va], epochs=30, seed=2, patience=4)
    assert set(info) == {"epochs_run", "best_epoch"}  # stable keys only: they key 05's embedding cache
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= 30
    assert not np.array_equal(branch.get_layer("class_probs").get_weights()[0], before)
    head_in = keras.Input((8,))
    x = head_in
    for name in ("head_dropout_1", "image_embedding", "head_dropout_2", "class_probs"):
        x = branch.get_layer(name)(x)
    acc = (np.argmax(keras.Model(head_in, x)(feats[va], training=False).numpy(), axis=1) == y[va]).mean()
    assert acc > 0.8, f"the branch's head did not learn the features (validation accuracy {acc:.2f})"
    again = tiny_branch(n_classes=3, seed=1)
    assert hybrid.fit_image_head_on_features(again, feats[tr], y[tr], feats[va], y[va], epochs=30, seed=2,
                                             patience=4) == info  # seeded: a rerun stops at the same epochs
    no_val = hybrid.fit_image_head_on_features(tiny_branch(n_classes=3, seed=1), feats[tr], y[tr], epochs=3, seed=2)
    assert no_val == {"epochs_run": 3, "best_epoch": 3}
