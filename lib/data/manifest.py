"""The SIPaKMeD file list and completeness reports.

SIPaKMeD cannot be shipped, but its 4049 cropped-cell file names can: they let the kit
check a user's download (nothing missing, nothing extra) and let the synthetic stand-in
reuse real names and cluster sizes.  The list is stored compactly in
``sipakmed_clusters.json`` as ``{class: {"NNN": cells_in_cluster_image}}``; cells of a
cluster image are numbered ``01..k`` consecutively, so ``NNN_MM.bmp`` expands back to the
full list (a test checks that it reproduces the public ``MANIFEST.csv`` exactly).

File ``NNN_MM.bmp`` is cell ``MM`` of cluster image ``NNN``; numbering restarts per class,
so the unit that must never cross a split is ``"<class>/<NNN>"``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

CLUSTERS_JSON = Path(__file__).with_name("sipakmed_clusters.json")

#: the five SIPaKMeD classes, sorted (this order gives ``label_idx``)
CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate")
#: cytology: abnormal cells (the positive class of the binary view)
ABNORMAL = ("Dyskeratotic", "Koilocytotic")
#: cytology: benign (reactive / metaplastic) cells
BENIGN = ("Metaplastic",)
#: cytology: normal cells
NORMAL = ("Parabasal", "Superficial-Intermediate")
#: class -> "abnormal" | "benign" | "normal"
CATEGORY = {**{c: "abnormal" for c in ABNORMAL}, **{c: "benign" for c in BENIGN}, **{c: "normal" for c in NORMAL}}

#: published counts, used as a cross-check of the JSON
EXPECTED_CELLS = {"Dyskeratotic": 813, "Koilocytotic": 825, "Metaplastic": 793, "Parabasal": 787,
                  "Superficial-Intermediate": 831}
EXPECTED_CLUSTERS = {"Dyskeratotic": 223, "Koilocytotic": 238, "Metaplastic": 271, "Parabasal": 108,
                     "Superficial-Intermediate": 126}


def class_folder(cls: str) -> str:
    """Folder name of a class in both layouts: ``im_<Class>``."""
    return f"im_{cls}"


def kaggle_relpath(cls: str, file_name: str) -> str:
    """Kaggle mirror layout: ``im_<Class>/im_<Class>/CROPPED/<file>``."""
    return f"{class_folder(cls)}/{class_folder(cls)}/CROPPED/{file_name}"


def official_relpath(cls: str, file_name: str) -> str:
    """Official per-class archive extraction: ``im_<Class>/CROPPED/<file>``."""
    return f"{class_folder(cls)}/CROPPED/{file_name}"


@lru_cache(maxsize=1)
def sipakmed_clusters() -> dict[str, dict[str, int]]:
    """``{class: {"NNN": number_of_cells}}`` read from the bundled JSON (validated)."""
    with open(CLUSTERS_JSON, encoding="utf-8") as fh:
        data = json.load(fh)
    if tuple(sorted(data)) != CLASSES:
        raise ValueError(f"{CLUSTERS_JSON}: expected classes {CLASSES}, got {sorted(data)}")
    for cls, clusters in data.items():
        if len(clusters) != EXPECTED_CLUSTERS[cls] or sum(clusters.values()) != EXPECTED_CELLS[cls]:
            raise ValueError(
                f"{CLUSTERS_JSON}: class {cls!r} has {len(clusters)} clusters / {sum(clusters.values())} cells, "
                f"expected {EXPECTED_CLUSTERS[cls]} / {EXPECTED_CELLS[cls]}"
            )
    return data


def sipakmed_manifest() -> pd.DataFrame:
    """The 4049 cropped-cell files: columns ``class, file_name, kaggle_layout_relpath, group``.

    Sorted by class then file name, the order of the public ``MANIFEST.csv``.
    """
    rows = []
    for cls in CLASSES:
        for nnn, k in sorted(sipakmed_clusters()[cls].items()):
            for mm in range(1, k + 1):
                name = f"{nnn}_{mm:02d}.bmp"
                rows.append((cls, name, kaggle_relpath(cls, name), f"{cls}/{nnn}"))
    return pd.DataFrame(rows, columns=["class", "file_name", "kaggle_layout_relpath", "group"])


# --------------------------------------------------------------------------- completeness
@dataclass
class CompletenessReport:
    """What a SIPaKMeD folder holds compared with the manifest.

    ``per_class``: DataFrame indexed by class with ``expected, found, missing, extra``
    (a ``total`` row last).  ``missing`` / ``extra``: ``"<class>/<file_name>"`` strings,
    sorted.  ``complete``: nothing missing (extra files are reported, not fatal).
    """

    per_class: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def exact(self) -> bool:
        """Complete and nothing beyond the manifest."""
        return not self.missing and not self.extra

    def __str__(self) -> str:
        tot = self.per_class.loc["total"]
        if self.exact:
            head = f"SIPaKMeD completeness: COMPLETE - all {tot['expected']} expected files found"
        elif self.complete:
            head = (f"SIPaKMeD completeness: COMPLETE - all {tot['expected']} expected files found, "
                    f"plus {len(self.extra)} not in the manifest")
        else:
            head = (f"SIPaKMeD completeness: INCOMPLETE - {len(self.missing)} of {tot['expected']} expected "
                    f"files missing, {len(self.extra)} not in the manifest")
        lines = [head, self.per_class.rename_axis(None).to_string()]
        for what, items in (("missing", self.missing), ("extra", self.extra)):
            if items:
                shown = ", ".join(items[:10])
                more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
                lines.append(f"{what} ({len(items)}): {shown}{more}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython shows the readable form
        p.text(str(self))


def _found_keys(found) -> pd.DataFrame:
    """Normalise what was found to a DataFrame with ``class, file_name``."""
    if hasattr(found, "table") and isinstance(getattr(found, "table"), pd.DataFrame):
        found = found.table  # an ImageDataset
    if isinstance(found, (str, Path)):  # the file list knows names, not how to read folders (no import cycle)
        raise ValueError(f"completeness(found_table): got the folder {found}; pass "
                         "lib.data.image_data.load_sipakmed(folder, on_bad='skip') instead")
    if not isinstance(found, pd.DataFrame):
        raise ValueError(
            f"completeness(found_table): expected a DataFrame or an ImageDataset, got {type(found).__name__}"
        )
    cls_col = "class" if "class" in found.columns else "label" if "label" in found.columns else None
    if cls_col is None:
        raise ValueError(f"completeness(found_table): expected a 'class' or 'label' column, got {list(found.columns)}")
    if "file_name" in found.columns:
        names = found["file_name"].astype(str)
    elif "path" in found.columns:
        names = found["path"].astype(str).map(lambda s: Path(s).name)
    else:
        raise ValueError(f"completeness(found_table): expected a 'file_name' or 'path' column, got {list(found.columns)}")
    return pd.DataFrame({"class": found[cls_col].astype(str).to_numpy(), "file_name": names.to_numpy()})


def completeness(found_table, manifest: pd.DataFrame | None = None) -> CompletenessReport:
    """Compare found files with the manifest (default: the bundled SIPaKMeD list).

    ``found_table``: an image table (``label`` + ``path``), any DataFrame with
    ``class``/``label`` and ``file_name``/``path``, or an ``ImageDataset`` (for a folder, load it
    with ``lib.data.image_data.load_sipakmed(folder, on_bad="skip")`` first).  Files are matched on (class, file name), so a
    file in the wrong class folder counts as missing there and extra where it is.
    """
    manifest = sipakmed_manifest() if manifest is None else manifest
    exp = _found_keys(manifest)
    got = _found_keys(found_table).drop_duplicates()
    exp_keys = set(zip(exp["class"], exp["file_name"]))
    got_keys = set(zip(got["class"], got["file_name"]))
    missing = sorted(exp_keys - got_keys)
    extra = sorted(got_keys - exp_keys)
    classes = list(dict.fromkeys(list(exp["class"]) + sorted(set(got["class"]) - set(exp["class"]))))
    rows = {}
    for cls in classes:
        rows[cls] = {
            "expected": sum(1 for c, _ in exp_keys if c == cls),
            "found": sum(1 for c, _ in got_keys if c == cls),
            "missing": sum(1 for c, _ in missing if c == cls),
            "extra": sum(1 for c, _ in extra if c == cls),
        }
    per_class = pd.DataFrame.from_dict(rows, orient="index", columns=["expected", "found", "missing", "extra"])
    per_class.loc["total"] = per_class.sum()
    per_class = per_class.astype(int)
    per_class.index.name = "class"
    return CompletenessReport(
        per_class=per_class,
        missing=[f"{c}/{f}" for c, f in missing],
        extra=[f"{c}/{f}" for c, f in extra],
    )
