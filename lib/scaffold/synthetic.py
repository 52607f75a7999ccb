"""SIPaKMeD-layout synthetic stand-in: procedurally drawn Pap-smear cells.

The real SIPaKMeD crops (4049 cells from 966 cluster images) cannot reach the
machines this kit is built on, so everything also runs on a stand-in that has
the *exact* Kaggle folder layout and real file names,
``<out_root>/im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp`` (a subset of
:func:`lib.data.manifest.sipakmed_manifest`), and a marker ``SYNTHETIC.txt`` so that
every table, model, figure and page built from it says it is synthetic.

API
---
* ``make_synthetic_sipakmed(out_root, seed=42, clusters_per_class=None) -> Path``:
  write the data set (all 4049 names, or the first ``k`` cluster images of each
  class); idempotent, atomic (temporary sibling folder, then rename).
* ``render_image(seed, cls, nnn, mm) -> (H, W, 3) uint8``: the pixels of one file.
* ``draw_cell(rng, cls, cluster_style=None, params=None)``, ``sample_cell_params``,
  ``sample_cluster_style``, ``cluster_style``: the building blocks, for previews.
* ``preview_grid(seed, n_per_class)``: classes x cells mosaic for a figure.
* ``synthetic_file_table(k)``, ``read_marker(root)``, ``find_marker(path)``.

Nothing here pretends to be real cytology. It is a drawing whose *rules* come
from cytology, so that a classifier has something meaningful to learn, a
grouped split matters, and Grad-CAM has structures (nucleus, halo) to point at.

How a crop is drawn
-------------------
Transmitted-light model (Beer-Lambert): each structure adds optical density
(OD) times the absorbance vector of its Papanicolaou dye, and the pixel is
``background * exp(-OD)``. Overlapping cells therefore darken each other the
way they do under a microscope. Dyes (absorbance per RGB channel):

* hematoxylin - nuclei, blue-purple to blue-black;
* light green SF - *cyanophilic* cytoplasm (blue-green): intermediate,
  parabasal and metaplastic cells;
* eosin - *eosinophilic* cytoplasm (pink): mature superficial cells;
* orange G - *orangeophilic* keratinised cytoplasm (orange): dyskeratosis.

Shapes are star-shaped outlines ``r(theta)`` (Fourier-perturbed ovals, or
polygons with rounded corners), scaled, stretched and rotated, rendered
vectorised with a 1-px soft edge.

Morphology rules per class (and the cytology they mimic)
--------------------------------------------------------
=========================  ===================================================
class                      rules
=========================  ===================================================
Superficial-Intermediate   Large, flat, polygonal cells (mature squamous cells,
(normal)                   ~40-60 um): the largest crops; thin translucent
                           cytoplasm with occasional folds; pink (superficial)
                           or blue-green (intermediate); very small nucleus:
                           pyknotic and dark in superficial cells, vesicular
                           (pale, finely granular) in intermediate ones. Lowest
                           nucleus/cytoplasm (N/C) ratio.
Parabasal (normal)         Small round-oval cells (immature basal-layer cells,
                           ~15-30 um) with dense cyanophilic cytoplasm and a
                           round, smooth, relatively large nucleus (high N/C).
Metaplastic (benign)       Intermediate size, rounder than squamous cells,
                           dense cyanophilic cytoplasm, sometimes cytoplasmic
                           processes ("spider cells") and small vacuoles;
                           moderate N/C, nucleus slightly irregular.
Koilocytotic (abnormal)    HPV cytopathic effect on intermediate/superficial
                           cells: large cells with an enlarged, hyperchromatic,
                           wrinkled ("raisinoid") nucleus, binucleation in a
                           fraction of cells, and the *perinuclear halo*: a
                           sharply outlined clear zone around the nucleus with
                           a dense rim of condensed cytoplasm.
Dyskeratotic (abnormal)    Premature keratinisation: small, often elongated or
                           irregular cells with dense orangeophilic/eosinophilic
                           cytoplasm and a small, very dark, pyknotic nucleus;
                           they sit in 3-D clumps, so crops show neighbours.
=========================  ===================================================

Not trivially separable, on purpose: every numeric parameter is drawn from
class ranges that overlap, and a fraction (:data:`AMBIGUOUS_FRACTION`) of cells
are blended part-way towards another class's parameters (transitional and
poorly preserved cells exist in real smears too). Neighbouring-cell fragments
at crop edges, debris, focus and noise add nuisance variation.

Measured (seed 42, all 4049 images, 5-fold ``StratifiedGroupKFold`` by cluster
image): logistic regression on per-image colour/size summaries (mean and std
of R, G, B, width, height, dark-pixel fractions) 0.71 accuracy, most errors
between Metaplastic/Parabasal and Koilocytotic/others; frozen ImageNet
EfficientNet-Lite0 features (128 px) + logistic regression 0.87. Drawing
takes about 10-20 ms per image on one CPU core (4049 images: about 70 s).

Cluster images: the cells ``NNN_01, NNN_02, ...`` of one cluster image share a
:class:`ClusterStyle` (stain hue and strength, cytoplasm stain bias, background
tint and illumination, focus blur, noise, debris, a size factor, neighbour
density), so cells of one cluster are correlated and a split that is not
grouped by cluster leaks, as in the real data set.

Determinism: the image ``(class, NNN, MM)`` depends only on
``(seed, class, NNN, MM)`` (NumPy ``SeedSequence``), so the same seed gives
byte-identical files and a subset (``clusters_per_class=k``) equals the
corresponding files of the full set.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1
# The drawing code itself, hashed: a cached set drawn by an older version of this file is redrawn, even
# when nobody remembered to bump GENERATOR_VERSION (that happened once: results then differed between
# a checkout with an old cache and a fresh clone).
GENERATOR_SHA = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
MARKER_NAME = "SYNTHETIC.txt"
CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate")
ABNORMAL_CLASSES = ("Dyskeratotic", "Koilocytotic")
# Fraction of cells whose parameters are blended towards another class.
AMBIGUOUS_FRACTION = 0.3

_TAG_CLUSTER = 0x5C1
_TAG_CELL = 0xCE11
_NA = 256                                   # angular samples of an outline r(theta)
_THETA = np.linspace(0.0, 2 * np.pi, _NA, endpoint=False)

# Papanicolaou dyes as absorbance (optical density per unit stain) in R, G, B.
HEMATOXYLIN = np.array([0.95, 1.05, 0.50])
LIGHT_GREEN = np.array([0.80, 0.33, 0.30])
EOSIN = np.array([0.10, 0.65, 0.42])
ORANGE_G = np.array([0.06, 0.42, 1.10])


# --------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class ClusterStyle:
    """Nuisance shared by all cells of one cluster image (same class, same NNN)."""

    stain_strength: float = 1.0        # multiplies every optical density
    hema_tint: tuple = (1.0, 1.0, 1.0)  # per-channel factors on the hematoxylin vector
    cyto_tint: tuple = (1.0, 1.0, 1.0)  # per-channel factors on cytoplasm dyes
    eosin_bias: float = 0.0            # stain batch: shifts cytoplasm towards pink/green
    background: tuple = (0.90, 0.89, 0.88)  # transmitted light, 0..1 per channel
    illum_amp: float = 0.03            # low-frequency illumination variation
    blur: float = 0.6                  # focus, Gaussian sigma in px
    noise: float = 3.0                 # sensor noise, grey levels (0..255)
    debris_rate: float = 1.0           # mean number of debris specks per crop
    size_scale: float = 1.0            # cells of one smear region are alike in size
    neighbour_rate: float = 0.8        # mean number of neighbouring-cell fragments
    haze: float = 0.1                  # out-of-focus material in the background


def sample_cluster_style(rng: np.random.Generator, cls: str | None = None) -> ClusterStyle:
    """Draw the shared nuisance of one cluster image."""
    neighbour = rng.uniform(0.3, 1.6) * (1.6 if cls == "Dyskeratotic" else 1.0)
    return ClusterStyle(
        stain_strength=float(rng.uniform(0.78, 1.25)),
        hema_tint=tuple(float(v) for v in np.exp(rng.normal(0, 0.10, 3))),
        cyto_tint=tuple(float(v) for v in np.exp(rng.normal(0, 0.12, 3))),
        eosin_bias=float(rng.normal(0, 0.12)),
        background=tuple(float(v) for v in np.clip(rng.uniform(0.80, 0.95) + rng.normal(0, 0.025, 3), 0.6, 0.99)),
        illum_amp=float(rng.uniform(0.0, 0.05)),
        blur=float(rng.uniform(0.3, 1.6)),
        noise=float(rng.uniform(1.5, 6.0)),
        debris_rate=float(rng.uniform(0.0, 3.0)),
        size_scale=float(np.exp(rng.normal(0, 0.10))),
        neighbour_rate=float(neighbour),
        haze=float(rng.uniform(0.0, 0.25)),
    )


def cluster_style(seed: int, cls: str, nnn: int) -> ClusterStyle:
    """The style of cluster image ``NNN`` of class ``cls`` (deterministic)."""
    return sample_cluster_style(_rng(_TAG_CLUSTER, seed, _class_index(cls), nnn), cls)


# --------------------------------------------------------------------------- cell parameters


@dataclass(frozen=True)
class CellParams:
    """Morphology of one cell; lengths in px, densities in optical-density units."""

    radius: float             # cell outline, major semi-axis
    aspect: float             # major / minor axis (>= 1)
    polygon: bool             # flat squamous cells are polygonal
    n_vertices: int
    irregularity: float       # outline roughness
    processes: int            # cytoplasmic processes (metaplastic "spider" cells)
    cyto_od: float            # cytoplasm density (thin flat cells pale, immature cells dense)
    eosinophilia: float       # 0 cyanophilic (blue-green) .. 1 eosinophilic
    orangeophilia: float      # share of orange G within the eosinophilic part
    cyto_texture: float
    nc_ratio: float           # nucleus radius / cell equivalent radius
    nuc_aspect: float
    nuc_irregularity: float   # smooth (normal) .. wrinkled (koilocyte, dyskeratotic)
    nuc_od: float             # nuclear darkness: hyperchromasia / pyknosis
    chromatin: float          # chromatin texture amplitude
    binucleate: bool
    halo: float               # perinuclear halo strength 0..1 (koilocytes)
    halo_scale: float         # halo radius / nucleus radius
    vacuoles: int
    folds: int


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _class_params(rng: np.random.Generator, cls: str) -> CellParams:
    """Cell parameters typical for ``cls`` (ranges overlap between classes)."""
    if cls == "Superficial-Intermediate":
        superficial = rng.random() < 0.5
        return CellParams(
            radius=_u(rng, 50, 118), aspect=_u(rng, 1.0, 1.6), polygon=rng.random() < 0.85,
            n_vertices=int(rng.integers(5, 9)), irregularity=_u(rng, 0.04, 0.10), processes=0,
            cyto_od=_u(rng, 0.12, 0.36),
            eosinophilia=_u(rng, 0.55, 1.0) if superficial else _u(rng, 0.0, 0.35),
            orangeophilia=_u(rng, 0.0, 0.35), cyto_texture=_u(rng, 0.05, 0.18),
            nc_ratio=_u(rng, 0.05, 0.08) if superficial else _u(rng, 0.07, 0.12),
            nuc_aspect=_u(rng, 1.0, 1.3), nuc_irregularity=_u(rng, 0.01, 0.05),
            nuc_od=_u(rng, 1.5, 2.3) if superficial else _u(rng, 0.8, 1.3),
            chromatin=_u(rng, 0.05, 0.15) if superficial else _u(rng, 0.12, 0.25),
            binucleate=False, halo=0.0, halo_scale=1.0, vacuoles=0,
            folds=int(rng.integers(0, 3)),
        )
    if cls == "Parabasal":
        return CellParams(
            radius=_u(rng, 26, 54), aspect=_u(rng, 1.0, 1.3), polygon=False, n_vertices=6,
            irregularity=_u(rng, 0.02, 0.06), processes=0, cyto_od=_u(rng, 0.40, 0.80),
            eosinophilia=_u(rng, 0.0, 0.25) if rng.random() < 0.85 else _u(rng, 0.35, 0.8),
            orangeophilia=_u(rng, 0.0, 0.2), cyto_texture=_u(rng, 0.08, 0.2),
            nc_ratio=_u(rng, 0.28, 0.46), nuc_aspect=_u(rng, 1.0, 1.25),
            nuc_irregularity=_u(rng, 0.01, 0.05), nuc_od=_u(rng, 0.8, 1.35),
            chromatin=_u(rng, 0.12, 0.28), binucleate=False, halo=0.0, halo_scale=1.0,
            vacuoles=0, folds=0,
        )
    if cls == "Metaplastic":
        return CellParams(
            radius=_u(rng, 30, 68), aspect=_u(rng, 1.0, 1.5), polygon=False, n_vertices=6,
            irregularity=_u(rng, 0.04, 0.10),
            processes=int(rng.integers(1, 4)) if rng.random() < 0.55 else 0,
            cyto_od=_u(rng, 0.45, 0.90),
            eosinophilia=_u(rng, 0.0, 0.3) if rng.random() < 0.8 else _u(rng, 0.3, 0.7),
            orangeophilia=_u(rng, 0.0, 0.3), cyto_texture=_u(rng, 0.10, 0.25),
            nc_ratio=_u(rng, 0.20, 0.34), nuc_aspect=_u(rng, 1.0, 1.35),
            nuc_irregularity=_u(rng, 0.03, 0.08), nuc_od=_u(rng, 0.9, 1.45),
            chromatin=_u(rng, 0.15, 0.30), binucleate=False, halo=0.0, halo_scale=1.0,
            vacuoles=int(rng.integers(1, 4)) if rng.random() < 0.35 else 0, folds=0,
        )
    if cls == "Koilocytotic":
        return CellParams(
            radius=_u(rng, 38, 100), aspect=_u(rng, 1.0, 1.6), polygon=rng.random() < 0.6,
            n_vertices=int(rng.integers(5, 9)), irregularity=_u(rng, 0.05, 0.12), processes=0,
            cyto_od=_u(rng, 0.28, 0.62), eosinophilia=_u(rng, 0.0, 1.0),
            orangeophilia=_u(rng, 0.0, 0.6), cyto_texture=_u(rng, 0.08, 0.22),
            nc_ratio=_u(rng, 0.13, 0.25), nuc_aspect=_u(rng, 1.0, 1.5),
            nuc_irregularity=_u(rng, 0.07, 0.18), nuc_od=_u(rng, 1.3, 2.1),
            chromatin=_u(rng, 0.2, 0.4), binucleate=rng.random() < 0.3,
            halo=_u(rng, 0.55, 1.0) if rng.random() < 0.85 else _u(rng, 0.0, 0.3),
            halo_scale=_u(rng, 1.7, 2.8), vacuoles=0, folds=int(rng.integers(0, 2)),
        )
    if cls == "Dyskeratotic":
        orange = rng.random() < 0.8
        return CellParams(
            radius=_u(rng, 22, 56), aspect=_u(rng, 1.1, 2.0), polygon=rng.random() < 0.2,
            n_vertices=int(rng.integers(4, 7)), irregularity=_u(rng, 0.06, 0.14), processes=0,
            cyto_od=_u(rng, 0.65, 1.1),
            eosinophilia=_u(rng, 0.6, 1.0) if orange else _u(rng, 0.1, 0.6),
            orangeophilia=_u(rng, 0.4, 1.0) if orange else _u(rng, 0.0, 0.5),
            cyto_texture=_u(rng, 0.06, 0.18), nc_ratio=_u(rng, 0.12, 0.24),
            nuc_aspect=_u(rng, 1.0, 1.5), nuc_irregularity=_u(rng, 0.05, 0.15),
            nuc_od=_u(rng, 1.8, 2.6), chromatin=_u(rng, 0.04, 0.12), binucleate=rng.random() < 0.05,
            halo=0.0, halo_scale=1.0, vacuoles=0, folds=0,
        )
    raise ValueError(f"parameter 'cls': expected one of {list(CLASSES)}, got {cls!r}")


_BLEND_SKIP = {"polygon", "n_vertices", "binucleate"}
# Nuclear and halo criteria (what cytologists grade, Bethesda-style) are blended less than
# size, shape and stain, which vary widely between smears and overlap between classes.
_NUCLEAR = {"nc_ratio", "nuc_aspect", "nuc_irregularity", "nuc_od", "chromatin", "binucleate", "halo",
            "halo_scale", "vacuoles", "processes"}


def sample_cell_params(rng: np.random.Generator, cls: str, ambiguous_fraction: float = AMBIGUOUS_FRACTION) -> CellParams:
    """Parameters of one cell of class ``cls``.

    With probability ``ambiguous_fraction`` the parameters are blended towards a
    cell of another class (transitional cells make the classes overlap): size,
    outline and stain with weight 0.3-0.7, nuclear features and the halo with
    0.4 times that weight, so the nucleus stays the more reliable cue.
    """
    own = _class_params(rng, cls)
    if rng.random() >= ambiguous_fraction:
        return own
    other_cls = CLASSES[int(rng.choice([i for i, c in enumerate(CLASSES) if c != cls]))]
    other = _class_params(rng, other_cls)
    w_all = float(rng.uniform(0.3, 0.7))
    out = {}
    for f in fields(CellParams):
        a, b = getattr(own, f.name), getattr(other, f.name)
        w = w_all * (0.4 if f.name in _NUCLEAR else 1.0)
        if f.name in _BLEND_SKIP:
            out[f.name] = a if rng.random() >= w else b
        elif isinstance(a, (int, np.integer)) and not isinstance(a, bool):
            out[f.name] = int(round((1 - w) * a + w * b))
        else:
            out[f.name] = (1 - w) * a + w * b
    return CellParams(**out)


# --------------------------------------------------------------------------- geometry


def _profile_smooth(rng, irregularity: float, processes: int = 0, kmax: int = 8) -> np.ndarray:
    """Fourier-perturbed circle r(theta), mean radius 1, optional narrow processes."""
    ks = np.arange(2, kmax + 1)
    amp = rng.normal(0.0, irregularity / ks ** 0.8)
    ph = rng.uniform(0.0, 2 * np.pi, ks.size)
    r = 1.0 + (amp[:, None] * np.cos(ks[:, None] * _THETA[None, :] + ph[:, None])).sum(0)
    r = np.maximum(r, 0.4)
    r /= r.mean()
    for _ in range(processes):
        c, h, w = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8), rng.uniform(0.07, 0.16)
        d = np.angle(np.exp(1j * (_THETA - c)))
        r = r + h * np.exp(-0.5 * (d / w) ** 2)
    return r


def _circular_smooth(r: np.ndarray, sigma_samples: float) -> np.ndarray:
    if sigma_samples <= 0:
        return r
    f = np.fft.rfftfreq(_NA) * _NA
    kern = np.exp(-0.5 * (2 * np.pi * f * sigma_samples / _NA) ** 2)
    return np.fft.irfft(np.fft.rfft(r) * kern, n=_NA)


def _profile_polygon(rng, n: int, irregularity: float) -> np.ndarray:
    """Star-shaped polygon with n vertices (exact ray/edge intersection), rounded corners."""
    ang = np.sort(((np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)) % (2 * np.pi))
    rad = np.clip(1.0 + rng.normal(0.0, irregularity + 0.06, n), 0.7, 1.35)
    P = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    idx = (np.searchsorted(ang, _THETA, side="right") - 1) % n
    A, B = P[idx], P[(idx + 1) % n]
    E = B - A
    d = np.stack([np.cos(_THETA), np.sin(_THETA)], 1)
    cross_ae = A[:, 0] * E[:, 1] - A[:, 1] * E[:, 0]
    cross_de = d[:, 0] * E[:, 1] - d[:, 1] * E[:, 0]
    r = cross_ae / np.where(np.abs(cross_de) < 1e-9, 1e-9, cross_de)
    r = np.clip(r, 0.3, 2.0)
    r = _circular_smooth(r, rng.uniform(1.5, 4.0))
    return r / r.mean()


@dataclass
class _Shape:
    cx: float
    cy: float
    radius: float     # major semi-axis, px
    aspect: float
    angle: float
    prof: np.ndarray

    def outline(self) -> np.ndarray:
        """Boundary points (N, 2) as x, y in canvas coordinates."""
        u = self.prof * np.cos(_THETA) * self.radius
        v = self.prof * np.sin(_THETA) * self.radius / self.aspect
        c, s = np.cos(self.angle), np.sin(self.angle)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], 1)

    def field(self, H: int, W: int, pad: float = 2.0, window=None):
        """(window slices, alpha in 0..1, t = normalised radius) over the shape's bbox.

        ``window`` (a pair of slices) evaluates the shape on that window instead.
        """
        if window is None:
            ext = self.radius * float(self.prof.max()) + pad + 1
            x0, x1 = max(int(self.cx - ext), 0), min(int(self.cx + ext) + 2, W)
            y0, y1 = max(int(self.cy - ext), 0), min(int(self.cy + ext) + 2, H)
            if x0 >= x1 or y0 >= y1:
                return None
        else:
            (y0, y1), (x0, x1) = (window[0].start, window[0].stop), (window[1].start, window[1].stop)
        xs = (np.arange(x0, x1, dtype=np.float32) - np.float32(self.cx))[None, :]
        ys = (np.arange(y0, y1, dtype=np.float32) - np.float32(self.cy))[:, None]
        c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        p = (xs * c + ys * s) / np.float32(self.radius)
        q = (-xs * s + ys * c) * np.float32(self.aspect / self.radius)
        rho = np.hypot(p, q)
        fi = (np.arctan2(q, p) * np.float32(_NA / (2 * np.pi))) % _NA
        i0 = fi.astype(np.int32)
        fr = fi - i0
        prof = self.prof.astype(np.float32)
        rb = prof[i0 % _NA] * (1 - fr) + prof[(i0 + 1) % _NA] * fr
        t = rho / rb
        dist = (rb - rho) * np.float32(self.radius / np.sqrt(self.aspect))
        alpha = np.clip(dist + 0.5, 0.0, 1.0)
        return (slice(y0, y1), slice(x0, x1)), alpha, t


def _smoothstep(x, lo, hi):
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _smooth_noise(rng, H: int, W: int, corr: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise with correlation length ``corr`` px (bicubic upsampling)."""
    from PIL import Image

    corr = max(float(corr), 1.0)
    gh, gw = int(H / corr) + 4, int(W / corr) + 4
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    big = Image.fromarray(g, "F").resize((int(gw * corr), int(gh * corr)), Image.BICUBIC)
    arr = np.asarray(big, dtype=np.float32)
    oy, ox = int(corr), int(corr)
    return arr[oy:oy + H, ox:ox + W] * np.float32(1.25)


# --------------------------------------------------------------------------- rendering


def _cyto_vector(p: CellParams, style: ClusterStyle) -> np.ndarray:
    e = float(np.clip(p.eosinophilia + style.eosin_bias, 0.0, 1.0))
    o = float(np.clip(p.orangeophilia, 0.0, 1.0))
    vec = (1 - e) * LIGHT_GREEN + e * ((1 - o) * EOSIN + o * ORANGE_G)
    return (vec * np.asarray(style.cyto_tint)).astype(np.float32)


def _cell_shapes(rng, p: CellParams, cx: float, cy: float, size_scale: float = 1.0):
    """Outline of the cell and its nuclei/halo placement (geometry only)."""
    R = p.radius * size_scale
    prof = (_profile_polygon(rng, p.n_vertices, p.irregularity) if p.polygon
            else _profile_smooth(rng, p.irregularity, p.processes))
    cell = _Shape(cx, cy, R, max(p.aspect, 1.0), float(rng.uniform(0, 2 * np.pi)), prof)
    r_eq = R / np.sqrt(cell.aspect)
    r_minor = R / cell.aspect
    nuc_r = float(np.clip(p.nc_ratio * r_eq, 2.0, 0.6 * r_minor))
    # the nucleus sits near the centre (eccentric up to a quarter of the minor radius)
    off = rng.uniform(0, 0.25) * max(r_minor - nuc_r, 0.0)
    oa = rng.uniform(0, 2 * np.pi)
    ncx, ncy = cx + off * np.cos(oa), cy + off * np.sin(oa)
    nuclei = []
    if p.binucleate:
        rr = nuc_r * 0.8
        ba = rng.uniform(0, 2 * np.pi)
        for sgn in (-1, 1):
            nuclei.append(_Shape(ncx + sgn * 0.95 * rr * np.cos(ba), ncy + sgn * 0.95 * rr * np.sin(ba), rr,
                                 p.nuc_aspect, float(rng.uniform(0, 2 * np.pi)),
                                 _profile_smooth(rng, p.nuc_irregularity, 0, kmax=10)))
        group_r = 2.0 * rr
    else:
        nuclei.append(_Shape(ncx, ncy, nuc_r, p.nuc_aspect, float(rng.uniform(0, 2 * np.pi)),
                             _profile_smooth(rng, p.nuc_irregularity, 0, kmax=10)))
        group_r = nuc_r
    halo = None
    if p.halo > 0.05:
        hr = float(min(p.halo_scale * group_r, 0.8 * r_minor))
        if hr > group_r * 1.2:
            halo = _Shape(ncx, ncy, hr, float(rng.uniform(1.0, 1.35)), float(rng.uniform(0, 2 * np.pi)),
                          _profile_smooth(rng, 0.10, 0, kmax=6))
    return cell, nuclei, halo


def _render_cell(od, rng, p: CellParams, style: ClusterStyle, shapes, noise):
    """Add the cell's optical density (H, W, 3) in place."""
    H, W, _ = od.shape
    cell, nuclei, halo = shapes
    coarse, fine, chrom = noise
    k = np.float32(style.stain_strength)
    cf = cell.field(H, W)
    if cf is not None:
        win, alpha, t = cf
        dens = np.float32(p.cyto_od) * alpha * (1 + np.float32(p.cyto_texture) * coarse[win]
                                                + np.float32(0.06) * fine[win])
        # denser rim for thick immature cells; thin flat cells stay even
        dens *= 1 + np.float32(0.25 * min(p.cyto_od, 1.0)) * _smoothstep(t, 0.75, 1.0)
        # the cell border shows as a thin slightly darker line (membrane, refraction)
        edge_w = np.float32(1.2 * np.sqrt(cell.aspect) / cell.radius)
        dens += np.float32(0.12) * alpha * np.exp(-((t - 1.0) / edge_w) ** 2)
        for _ in range(p.folds):   # folds of flat squamous cells: a thin denser band
            a = rng.uniform(0, np.pi)
            px0 = cell.cx + rng.uniform(-0.4, 0.4) * cell.radius - win[1].start
            py0 = cell.cy + rng.uniform(-0.4, 0.4) * cell.radius - win[0].start
            half = rng.uniform(0.3, 0.6) * cell.radius
            yy, xx = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]].astype(np.float32)
            along = (xx - px0) * np.float32(np.cos(a)) + (yy - py0) * np.float32(np.sin(a))
            across = -(xx - px0) * np.float32(np.sin(a)) + (yy - py0) * np.float32(np.cos(a))
            w = np.float32(rng.uniform(1.0, 2.5))
            band = np.exp(-(across / w) ** 2) * np.clip(1 - np.abs(along) / np.float32(half), 0, 1)
            dens += band * alpha * np.float32(p.cyto_od * rng.uniform(0.6, 1.2))
        if halo is not None:
            _hw, halpha, ht = halo.field(H, W, window=win)
            s = np.float32(p.halo)
            # clear perinuclear zone with a sharp rim of condensed cytoplasm
            dens *= 1 - s * np.float32(0.92) * halpha
            rim = np.exp(-((ht - 1.0) / np.float32(0.09)) ** 2)
            dens += s * np.float32(0.6 * p.cyto_od + 0.15) * rim * alpha
        for _ in range(p.vacuoles):  # small clear vacuoles in metaplastic cytoplasm
            vr = rng.uniform(0.08, 0.18) * cell.radius / cell.aspect
            va, vd = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.7) * cell.radius / cell.aspect
            v = _Shape(cell.cx + vd * np.cos(va), cell.cy + vd * np.sin(va), vr, 1.1, 0.0,
                       _profile_smooth(rng, 0.03, 0))
            _vw, valpha, _vt = v.field(H, W, window=win)
            dens *= 1 - np.float32(0.7) * valpha
        od[win] += (k * dens)[..., None] * _cyto_vector(p, style)
    hema = (HEMATOXYLIN * np.asarray(style.hema_tint)).astype(np.float32)
    for nuc in nuclei:
        nf = nuc.field(H, W)
        if nf is None:
            continue
        win, alpha, t = nf
        dens = np.float32(p.nuc_od) * alpha * (1 + np.float32(p.chromatin) * chrom[win])
        dens *= np.float32(0.85) + np.float32(0.3) * _smoothstep(t, 0.7, 1.0)   # nuclear membrane
        od[win] += (k * dens)[..., None] * hema


def _draw(rng, cls: str, style: ClusterStyle, params: CellParams | None = None) -> np.ndarray:
    p = params if params is not None else sample_cell_params(rng, cls)
    cell, nuclei, halo = _cell_shapes(rng, p, 0.0, 0.0, style.size_scale)
    pts = cell.outline()
    xmin, ymin = pts.min(0)
    xmax, ymax = pts.max(0)
    span = max(xmax - xmin, ymax - ymin)
    m = rng.uniform(2, 5 + 0.08 * span, 4)
    W = int(np.clip(np.ceil(xmax - xmin + m[0] + m[1]), 48, 320))
    H = int(np.clip(np.ceil(ymax - ymin + m[2] + m[3]), 48, 320))
    dx, dy = m[0] - xmin, m[2] - ymin
    # centre the cell if clipping to the size range cut the canvas
    dx += (W - (xmax - xmin + m[0] + m[1])) / 2
    dy += (H - (ymax - ymin + m[2] + m[3])) / 2
    for s in [cell, *nuclei] + ([halo] if halo is not None else []):
        s.cx += dx
        s.cy += dy

    noise = (_smooth_noise(rng, H, W, rng.uniform(4, 9)), _smooth_noise(rng, H, W, 1.5),
             _smooth_noise(rng, H, W, rng.uniform(1.2, 2.5)))
    od = np.zeros((H, W, 3), np.float32)

    # neighbouring cells cut by the crop edge (same class mostly: cells of a cluster)
    for _ in range(int(rng.poisson(style.neighbour_rate))):
        ncls = cls if rng.random() < 0.7 else CLASSES[int(rng.integers(len(CLASSES)))]
        q = _class_params(rng, ncls)
        side = int(rng.integers(4))
        rq = q.radius * style.size_scale
        out = rng.uniform(0.1, 0.8) * rq
        along = rng.uniform(0, W if side < 2 else H)
        cx, cy = ((along, -out) if side == 0 else (along, H + out) if side == 1
                  else (-out, along) if side == 2 else (W + out, along))
        _render_cell(od, rng, q, style, _cell_shapes(rng, q, cx, cy, style.size_scale), noise)

    _render_cell(od, rng, p, style, (cell, nuclei, halo), noise)

    # debris: small specks of stain in the background
    for _ in range(int(rng.poisson(style.debris_rate))):
        d = _Shape(rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.8, 3.0), rng.uniform(1, 2),
                   rng.uniform(0, np.pi), _profile_smooth(rng, 0.15, 0))
        f = d.field(H, W)
        if f is not None:
            win, alpha, _t = f
            vec = HEMATOXYLIN if rng.random() < 0.5 else EOSIN
            od[win] += (alpha * np.float32(rng.uniform(0.2, 0.9)))[..., None] * vec.astype(np.float32)

    # out-of-focus material (mucus, blurred cells of other focal planes): faint smooth blobs
    blob = np.maximum(_smooth_noise(rng, H, W, rng.uniform(15, 40)) - np.float32(rng.uniform(0.6, 1.4)), 0)
    od += (blob * np.float32(style.haze))[..., None] * _cyto_vector(_class_params(rng, cls), style)

    from scipy.ndimage import gaussian_filter

    bg = np.asarray(style.background, np.float32) * 255.0
    illum = 1 + np.float32(style.illum_amp) * _smooth_noise(rng, H, W, 60)
    img = bg * illum[..., None] * np.exp(-od)
    sigma = style.blur + abs(rng.normal(0, 0.25))
    img = gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(style.noise)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def draw_cell(rng: np.random.Generator, cls: str, cluster_style: ClusterStyle | None = None,
              params: CellParams | None = None) -> np.ndarray:
    """Draw one cropped cell of class ``cls``: an ``(H, W, 3)`` uint8 RGB array.

    ``cluster_style`` defaults to a neutral style; ``params`` (see
    :func:`sample_cell_params`) overrides the random morphology.
    """
    if cls not in CLASSES:
        raise ValueError(f"parameter 'cls': expected one of {list(CLASSES)}, got {cls!r}")
    return _draw(rng, cls, cluster_style if cluster_style is not None else ClusterStyle(), params)


def render_image(seed: int, cls: str, nnn: int, mm: int) -> np.ndarray:
    """The exact pixels of synthetic file ``im_<cls>/.../NNN_MM.bmp`` for ``seed``."""
    seed = _check_seed(seed)
    ci = _class_index(cls)
    style = cluster_style(seed, cls, nnn)
    return _draw(_rng(_TAG_CELL, seed, ci, int(nnn), int(mm)), cls, style)


def preview_grid(seed: int = 42, n_per_class: int = 8, tile: int = 200, pad: int = 4) -> np.ndarray:
    """A ``5 x n_per_class`` grid (rows = classes, order of :data:`CLASSES`) of synthetic cells.

    Cells keep their relative size (scaled by a single factor so the largest fits a
    tile); cell ``j`` of a row comes from cluster ``j // 2 + 1``.
    """
    from PIL import Image

    imgs = [[render_image(seed, c, j // 2 + 1, j % 2 + 1) for j in range(n_per_class)] for c in CLASSES]
    biggest = max(max(a.shape[:2]) for row in imgs for a in row)
    f = min(1.0, tile / biggest)
    grid = np.full((len(CLASSES) * (tile + pad) + pad, n_per_class * (tile + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(imgs):
        for j, a in enumerate(row):
            h, w = max(1, round(a.shape[0] * f)), max(1, round(a.shape[1] * f))
            a = np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))
            y, x = pad + i * (tile + pad) + (tile - h) // 2, pad + j * (tile + pad) + (tile - w) // 2
            grid[y:y + h, x:x + w] = a
    return grid


# --------------------------------------------------------------------------- dataset


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _class_index(cls: str) -> int:
    try:
        return CLASSES.index(cls)
    except ValueError:
        raise ValueError(f"parameter 'cls': expected one of {list(CLASSES)}, got {cls!r}") from None


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"parameter 'seed': expected a non-negative int, got {seed!r}")
    return int(seed)


def _check_k(k):
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"parameter 'clusters_per_class': expected None (all) or an int >= 1, got {k!r}")
    return int(k)


def synthetic_file_table(clusters_per_class: int | None = None):
    """The manifest rows the stand-in draws: all 4049, or the first ``k`` cluster images per class.

    A DataFrame with the manifest's columns plus ``nnn`` and ``mm`` (ints).
    """
    from lib.data.manifest import sipakmed_manifest

    k = _check_k(clusters_per_class)
    m = sipakmed_manifest().copy()
    stem = m["file_name"].astype(str).str.extract(r"^(\d{3})_(\d{2})\.bmp$")
    if stem.isna().any().any():
        bad = m.loc[stem.isna().any(axis=1), "file_name"].iloc[0]
        raise ValueError(f"manifest: file_name {bad!r} is not of the form NNN_MM.bmp")
    m["nnn"], m["mm"] = stem[0].astype(int), stem[1].astype(int)
    unknown = set(m["class"]) - set(CLASSES)
    if unknown:
        raise ValueError(f"manifest: unknown class(es) {sorted(unknown)}; expected {list(CLASSES)}")
    if k is not None:
        keep = m.groupby("class")["nnn"].transform(lambda s: s.isin(sorted(s.unique())[:k]))
        m = m[keep.astype(bool)]
    return m.sort_values(["class", "nnn", "mm"]).reset_index(drop=True)


def read_marker(root) -> dict | None:
    """Parse ``<root>/SYNTHETIC.txt`` into a dict (``params`` decoded from JSON); None if absent."""
    path = Path(root) / MARKER_NAME
    if not path.is_file():
        return None
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition(": ")
        if sep and key and " " not in key:
            out[key] = value
    try:
        out["params"] = json.loads(out.get("params", "null"))
    except json.JSONDecodeError:
        out["params"] = None
    return out


def find_marker(path) -> Path | None:
    """The ``SYNTHETIC.txt`` of the synthetic data set containing ``path`` (itself or a parent), else None."""
    p = Path(path).expanduser().resolve()
    for d in [p, *p.parents]:
        if (d / MARKER_NAME).is_file():
            return d / MARKER_NAME
    return None


def _marker_text(params: dict, table) -> str:
    counts = table.groupby("class").agg(cells=("file_name", "size"), clusters=("nnn", "nunique"))
    lines = [
        "SYNTHETIC DATA - NOT REAL CELLS.",
        "Procedurally drawn stand-in for SIPaKMeD (Kaggle layout, real file names), made by lib.scaffold.synthetic",
        "because the real images were not available. Results on it say nothing about real cytology.",
        "",
        "synthetic: true",
        "generator: lib.scaffold.synthetic.make_synthetic_sipakmed",
        f"generator_version: {params['generator_version']}",
        f"seed: {params['seed']}",
        f"clusters_per_class: {'all' if params['clusters_per_class'] is None else params['clusters_per_class']}",
        f"n_images: {len(table)}",
        f"n_clusters: {int(counts['clusters'].sum())}",
        "layout: im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp",
        f"params: {json.dumps(params, sort_keys=True)}",
        "",
        "per class (cells / cluster images):",
    ]
    lines += [f"  {c}: {int(r.cells)} / {int(r.clusters)}" for c, r in counts.iterrows()]
    return "\n".join(lines) + "\n"


def _count_bmps(root: Path) -> int:
    return sum(1 for c in CLASSES for _ in (root / f"im_{c}" / f"im_{c}" / "CROPPED").glob("*.bmp"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _cleanup_stale(out_root: Path) -> None:
    """Remove temporary siblings left by interrupted runs (their process is gone)."""
    prefix = f".{out_root.name}.synth-"
    for d in out_root.parent.iterdir():
        if not d.name.startswith(prefix):
            continue
        try:
            pid = int(d.name.rsplit(".synth-", 1)[1].split("-")[1])
        except (IndexError, ValueError):
            continue
        if d.is_dir() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def make_synthetic_sipakmed(out_root, seed: int = 42, clusters_per_class: int | None = None) -> Path:
    """Write the synthetic SIPaKMeD stand-in under ``out_root`` and return ``out_root``.

    Layout: ``out_root/im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp`` (24-bit RGB BMP)
    for the manifest names; ``clusters_per_class=None`` draws all 4049, an int
    ``k`` the first ``k`` cluster images (by number) of each class. The marker
    ``SYNTHETIC.txt`` (seed, parameters, generator version) is written last.

    Idempotent: when ``out_root`` already holds a complete set made with the same
    parameters and the same drawing code (:data:`GENERATOR_SHA`) nothing is redrawn. Otherwise the set is drawn into a temporary
    sibling folder and renamed into place, so an interrupted run never leaves a
    partial folder that looks complete. An existing ``out_root`` is replaced only
    if it is empty or is itself a synthetic set (has ``SYNTHETIC.txt``); anything
    else raises ``ValueError`` (raw data folders are never written to).
    """
    from PIL import Image

    from lib import atomic

    out_root = Path(out_root).expanduser().absolute()
    seed = _check_seed(seed)
    k = _check_k(clusters_per_class)
    params = {"clusters_per_class": k, "generator_sha": GENERATOR_SHA, "generator_version": GENERATOR_VERSION,
              "seed": seed}
    table = synthetic_file_table(k)

    def complete(root: Path) -> bool:
        mk = read_marker(root)
        return mk is not None and mk.get("params") == params and _count_bmps(root) == len(table)

    if out_root.exists():
        if not out_root.is_dir():
            raise ValueError(f"parameter 'out_root': {out_root} exists and is not a folder")
        if complete(out_root):
            return out_root
        if (out_root / MARKER_NAME).is_file() is False and any(out_root.iterdir()):
            raise ValueError(f"parameter 'out_root': {out_root} is a non-empty folder without {MARKER_NAME}; "
                             "refusing to overwrite something that is not a synthetic set")
    out_root.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(out_root)

    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out_root.parent / f".{out_root.name}.synth-tmp-{token}"
    old = out_root.parent / f".{out_root.name}.synth-old-{token}"
    try:
        tmp.mkdir()
        for cls in CLASSES:
            (tmp / f"im_{cls}" / f"im_{cls}" / "CROPPED").mkdir(parents=True, exist_ok=True)
        for cls, rel, nnn, mm in zip(table["class"], table["kaggle_layout_relpath"], table["nnn"], table["mm"]):
            Image.fromarray(render_image(seed, cls, nnn, mm), "RGB").save(tmp / rel, format="BMP")
        atomic.write_text(tmp / MARKER_NAME, _marker_text(params, table))
        if out_root.exists():
            if complete(out_root):          # a concurrent run finished first
                return out_root
            os.rename(out_root, old)
        try:
            os.rename(tmp, out_root)
        except OSError:
            if complete(out_root):          # a concurrent run won the race
                return out_root
            raise
    finally:
        for d in (tmp, old):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return out_root
