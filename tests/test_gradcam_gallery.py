"""lib.explain.gradcam.class_gallery: every empty slot says why it is empty (no unlabeled grey panels)."""
import matplotlib

matplotlib.use("Agg")
import numpy as np

from lib.explain import gradcam


def test_every_empty_slot_is_labelled():
    import matplotlib.pyplot as plt

    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 1])  # class 0: one correct, one wrong; class 1: no wrong; class 2: no image
    images = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 3))
    fig, _ = gradcam.class_gallery(images, np.random.default_rng(1).uniform(size=(5, 8, 8)), y, pred,
                                   ["a", "b", "c"], per_class=2)
    panels = fig.axes[:12]
    empty = [ax for ax in panels if not ax.get_images()]
    assert len(empty) == 12 - 4  # shown: a correct, a wrong, two b correct
    texts = ["".join(t.get_text() for t in ax.texts) for ax in empty]
    assert all(texts), "an empty panel without text"
    assert texts.count("only 1 correct\nprediction") == 1 and "only 1 wrong\nprediction" in texts
    assert texts.count("no wrong\nprediction\n(3 test images)") == 2 and texts.count("no test image\nof this class") == 4
    assert all(ax.get_facecolor()[:3] == (1.0, 1.0, 1.0) for ax in empty)  # outlined, not grey blocks
    fig.savefig(__import__("io").BytesIO(), format="png")
    plt.close(fig)
