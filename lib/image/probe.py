"""The linear probe: frozen ImageNet features + logistic regression (scikit-learn).

It is the reference any fine-tuning must beat: if training the top blocks does not score above
a linear model on the frozen backbone's pooled features, on the same grouped split and with the
same metrics, the fine-tuning earned nothing.  The regularisation strength is chosen on the
validation split (macro-F1), never on test.
"""
from __future__ import annotations

import numpy as np

#: inverse regularisation strengths tried on the validation split
C_GRID = (0.01, 0.1, 1.0, 10.0)


def linear_probe(table, backbone: str, image_size: int, weights, seed: int = 42, c_grid=C_GRID,
                 batch_size: int = 32) -> dict:
    """Fit on ``train``, choose C on ``val``; returns test- and validation-split class probabilities
    (``probs``, ``val_probs``), the choice (``C``, ``val_macro_f1``) and the fitted ``classifier``
    (scikit-learn, not JSON: :func:`predictor` turns it into an image predictor)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lib.image.features import extract_features

    feats = extract_features(table, backbone=backbone, image_size=image_size, weights=weights,
                             batch_size=batch_size, progress=False, seed=seed)
    part = {s: (table["split"] == s).to_numpy() for s in ("train", "val", "test")}
    y = table["label_idx"].to_numpy()

    def fit(c):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced",
                                                                 random_state=seed))
        return clf.fit(feats[part["train"]], y[part["train"]])

    val_f1 = {}
    for c in c_grid:
        pred = fit(c).predict(feats[part["val"]])
        val_f1[c] = float(f1_score(y[part["val"]], pred, average="macro", zero_division=0))
    best = max(c_grid, key=lambda c: (val_f1[c], -c))  # ties: the stronger regularisation
    clf = fit(best)
    n_classes = int(table["label_idx"].max()) + 1

    def probs_of(split):
        out = np.zeros((int(part[split].sum()), n_classes))
        out[:, clf.classes_] = clf.predict_proba(feats[part[split]])
        return out

    return {"probs": probs_of("test"), "val_probs": probs_of("val"), "C": best,
            "val_macro_f1": {str(k): v for k, v in val_f1.items()}, "feature_dim": int(feats.shape[1]),
            "n_classes": n_classes, "classifier": clf}


def predictor(lp: dict, backbone: str, image_size: int, weights, seed: int = 42, batch_size: int = 32):
    """``images -> class probabilities`` of the probe ``lp`` (from :func:`linear_probe`): the frozen
    backbone's pooled features, then the classifier it already fitted (for flipped or cropped images)."""
    from lib.image import features, shortcuts

    return shortcuts.probe_predictor(features.feature_model(backbone, image_size, weights, seed), lp["classifier"],
                                     lp["n_classes"], batch_size)
