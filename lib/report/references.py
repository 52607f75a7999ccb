"""The one table of literature figures the notebooks' prose may state.

Narrative text never types a number measured by the kit: those are printed by code. What prose may
type is a *published* figure, and only beside a word that names where it comes from, so a reader
can tell a citation from a result. The figures tied to one dataset live with that dataset
(``lib.data.datasets.REFERENCES``) and are imported here, not copied; the figures of the original
hybrid-model work and the UCI anchor are added here. ``tests/test_prose.py`` reads this table.
"""
from __future__ import annotations

from lib.data.datasets import REFERENCES as DATASET_REFERENCES

#: Figures published about the work this kit rebuilds, not tied to one image dataset.
OTHER_REFERENCES = [
    dict(key="uci_anchor_auc", what="risk factors alone, honest features (no screening columns)", auc=0.69,
         source="Fernandes et al., PeerJ Computer Science 2018", cue=r"Fernandes|anchor|published"),
    dict(key="original_hybrid", what="the original hybrid image + risk-factor model, its reported test metrics",
         accuracy=0.978, precision=0.84, recall=0.91, f1=0.87,
         source="the original hybrid-model work the kit rebuilds (DESIGN.md)",
         cue=r"original|paper|published|reported"),
]

#: Words that name the source of a dataset-tied figure in prose.
DATASET_CUES = {"sipakmed": r"published|grouped SIPaKMeD|random-split|literature",
                "lbc": r"derivative|published|literature"}

_NUMERIC_KEYS = ("accuracy", "precision", "recall", "f1", "macro_f1", "auc")


def figures() -> list[dict]:
    """Every literature figure as ``dict(value, key, source, cue)``; ranges give both ends."""
    out = []
    entries = [(e, DATASET_CUES[ds]) for ds, es in DATASET_REFERENCES.items() for e in es]
    entries += [(e, e["cue"]) for e in OTHER_REFERENCES]
    for e, cue in entries:
        values = [e[k] for k in _NUMERIC_KEYS if k in e]
        values += list(e.get("accuracy_range", []))
        for v in values:
            out.append(dict(value=float(v), key=e["key"], source=e["source"], cue=cue))
    return out


def figure(key: str, field: str) -> float:
    """One literature figure by its key and field, e.g. ``figure("uci_anchor_auc", "auc")``: notebook
    code cites the table instead of typing the number."""
    for e in [*OTHER_REFERENCES, *(e for es in DATASET_REFERENCES.values() for e in es)]:
        if e["key"] == key:
            if field not in e:
                raise KeyError(f"reference {key!r} has no field {field!r}; it has {sorted(e)}")
            return float(e[field])
    raise KeyError(f"no reference {key!r} in lib.report.references")


def original_claims() -> dict:
    """The original hybrid work's reported accuracy, precision and recall (its F1 follows from them)."""
    return {k: figure("original_hybrid", k) for k in ("accuracy", "precision", "recall")}
