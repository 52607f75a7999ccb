"""What a dataset *is*, beyond its files: name, abnormal classes, how images group, whether the
groups are cluster images, whether it is synthetic, and which published results belong to it.

Notebook text follows this description (no cluster talk without clusters, a reference figure only
beside the dataset it was measured on), so it is written once, here, and saved with the run.
Known datasets are presets; any other folder-per-class dataset is described from its files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: Published results, each tied to one dataset; literature figures, never results of this kit.
REFERENCES = {
    "sipakmed": [
        dict(key="sipakmed_grouped_b0", what="EfficientNet-B0, split grouped by cluster image",
             accuracy=0.975, macro_f1=0.975, source="the one grouped SIPaKMeD result found publicly (DESIGN.md 4)"),
        dict(key="sipakmed_random", what="random (ungrouped) splits, various CNNs", accuracy_range=[0.95, 0.997],
             source="published random-split SIPaKMeD results (DESIGN.md 4)"),
    ],
    "lbc": [
        dict(key="lbc_derivative_leaky", what="EfficientNetV2 on the derivative's own train/test split, which "
             "puts copies of 224 source images on both sides", accuracy=0.973, macro_f1=0.972,
             source="atlan-antillia/EfficientNet-Cervical-Cancer (shared/data/PROVENANCE.md)"),
    ],
}

PRESETS = {
    "sipakmed": dict(
        name="SIPaKMeD cropped cells (Plissiti et al., ICIP 2018)",
        abnormal_classes=["Dyskeratotic", "Koilocytotic"], group_pattern=None,
        group_unit="cluster image", licence="free for experimental use with citation",
        source_url="https://www.cs.uoi.gr/~marina/sipakmed.html"),
    "lbc": dict(
        name="Liquid-based cytology Pap smears (Hussain et al., Data in Brief 2020), resampled derivative",
        abnormal_classes=["HSIL", "LSIL", "SCC"], group_pattern=r"^(?P<group>.+?)_\d+_\d+$",
        group_unit="source image", licence="CC BY 4.0",
        source_url="Mendeley Data, DOI 10.17632/zddtpgzv63"),
}


@dataclass
class DatasetInfo:
    """The description saved in ``run.json`` and read by every notebook and the report."""

    name: str
    preset: str | None
    source: str                      # sipakmed-official / sipakmed-kaggle / synthetic / folder
    classes: list[str]
    abnormal_classes: list[str]
    synthetic: bool
    group_unit: str                  # "cluster image", "source image" or "file"
    groups_are_clusters: bool        # several cells cropped from one photograph
    group_pattern: str | None
    group_rules: dict = field(default_factory=dict)
    n_images: int = 0
    n_groups: int = 0
    layout: str | None = None
    shipped_split_groups_on_both_sides: int | None = None
    licence: str | None = None
    source_url: str | None = None
    references: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    # words the notebooks print, so their text follows the data
    @property
    def group_word(self) -> str:
        """"cluster image", "source image" or "image file": what one group is."""
        return {"file": "image file"}.get(self.group_unit, self.group_unit)

    def grouping_sentence(self) -> str:
        per = self.n_images / max(self.n_groups, 1)
        if self.group_unit == "file":
            return (f"{self.n_images} images, each its own group: the file names carry no cluster or source "
                    "information, so the images are treated as independent (if several come from one slide or "
                    "patient, pass group_pattern).")
        return (f"{self.n_images} images from {self.n_groups} {self.group_word}s "
                f"({per:.1f} images per {self.group_word} on average); no {self.group_word} is split across "
                "train, validation and test.")


def preset(name: str | None) -> dict:
    """A preset's settings, or ``{}``; an unknown name is an error naming the known ones."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"parameter 'dataset': {name!r} is not a known preset; known: {sorted(PRESETS)} "
                         "(or leave it None and pass abnormal_classes / group_pattern for your folder)")
    return dict(PRESETS[name])


def describe(ds, preset_name: str | None = None, group_pattern: str | None = None) -> DatasetInfo:
    """Describe a loaded :class:`lib.data.image_data.ImageDataset`."""
    t = ds.table
    if ds.source.startswith("sipakmed") or ds.source == "synthetic":
        key = "sipakmed"
    else:
        key = preset_name
    pre = PRESETS.get(key, {}) if key else {}
    rules = dict(getattr(ds, "group_rules", {}) or {})
    if rules.get("cluster"):
        unit = "cluster image"
    elif rules.get("pattern"):
        unit = pre.get("group_unit", "source image")
    else:
        unit = "file"
    both = getattr(ds, "shipped_both_sides", None)  # counted on the whole dataset, before any subsample
    synthetic = bool(ds.synthetic)
    if synthetic:
        name = "SYNTHETIC stand-in in SIPaKMeD's layout (procedurally drawn cells)"
    else:
        name = pre.get("name") or f"image folder '{ds.root.name}'"
    return DatasetInfo(
        name=name, preset=key if pre else None, source=ds.source, classes=list(ds.classes),
        abnormal_classes=list(ds.abnormal_classes), synthetic=synthetic, group_unit=unit,
        groups_are_clusters=unit == "cluster image", group_pattern=group_pattern,
        group_rules=rules, n_images=int(len(t)), n_groups=int(t["group"].nunique()), layout=ds.layout,
        shipped_split_groups_on_both_sides=both,
        licence=None if synthetic else pre.get("licence"), source_url=None if synthetic else pre.get("source_url"),
        # a published figure belongs beside real data of its own dataset only
        references=[] if synthetic or not pre else list(REFERENCES.get(key, [])),
    )
