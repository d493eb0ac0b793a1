"""A deterministic, seeded world of small RGB images with a class taxonomy.

The default (mini) study learns from this world instead of downloaded photographs.
Every class is a *species* in a three-level taxonomy (family -> genus -> species), so
fine-grained structure and domain similarity are properties of the pixels, not labels on
noise.  Rendering is vectorised numpy over batches of images (coordinate grids, per-image
affine poses, distance-field shapes, sinusoidal patterns): the eleven data sets other than
``probe`` at their default sizes (about 46,000 images of 32 x 32) take about 4 s on one core.

Taxonomy
--------
* **28 families** ``f00`` .. ``f27`` (:func:`family_table`), each with a *kind*, a *realm*,
  a *shape* and a *part layout*.  Families 0-13 are ``natural``: birds (f00-f03, egg),
  dogs (f04-f06, blob), flowers (f07-f08 star, f09 polygon), fish, insect, reptile,
  fungus.  Families 14-27 are ``artifact``: cars (f14-f16, bar with a pair of wheels),
  aircraft (f17-f19, cross with a tail part), food (f20-f22: ring, ellipse, polygon),
  tool, building, furniture, sign, instrument.  A family fixes the coarse appearance:
  shape type and shape parameters, base colour (each kind owns a hue region, its
  families sit within +-0.07 of it), surface-pattern type (stripes, bands, spots, checker
  or spokes), pattern and part colours, and the layout of a secondary part (head, pair
  of wheels/ears, centre, tip).  The realm also sets the scene: natural objects lie on
  green-brown backgrounds among round distractors, artifacts on greyer backgrounds of
  any hue among square ones.  Cars, tools, buildings, furniture and signs come in three
  colour morphs (normal, dark, pale), drawn per image.
* **4 genera per family** (``f07.g2``) vary mid-level attributes around the family:
  body hue (+-0.15 on the 0..1 hue circle), pattern frequency (x 2**+-0.6), part size
  (x 2**+-0.38), aspect ratio (x 2**+-0.26) -- on a per-family Latin hypercube, so
  the genera of a family take four distinct, evenly spaced levels of every attribute --
  and, at random, pattern orientation, pattern colour, part colour and part position.
* **16 species per genus** (``f07.g2.s13``) differ only in small details: body hue
  (+-0.06 x ``detail``), pattern frequency (x 2**(+-0.42 x detail)), part size
  (x 2**(+-0.42 x detail)), aspect (x 2**(+-0.24 x detail)) and part hue
  (+-0.1 x detail), from a shifted Halton sequence, so siblings are spread apart, never
  accidental twins.  Shape type, pattern type and layout are shared within a family.

Class appearance is a pure function of ``(WorldConfig.seed, WorldConfig.detail, class
id)`` (:func:`class_spec`), never of the other classes in a data set: a species looks the
same in every data set that holds it.  Images come from random streams keyed by
``(seed, class, "<data set>/<split>")`` through a stable BLAKE2 hash (never Python's
salted ``hash``): two data sets that share a species hold different photographs of it,
and a request for fewer images per class returns the first ones of a larger request.

Each image draws, independently: position (+-``position`` of the half-width), object
radius (0.34-0.54 of the half-width), rotation (+-``rotation`` degrees), pattern phase,
hue jitter (+-``color_jitter``), value jitter (x 0.85-1.15), a light direction (+-12%
shading), the background (realm palette, two colour gratings, three distractors behind
the object and one occluder in front, all scaled by ``clutter``), haze (up to 35% fog),
gain (0.85-1.15), bias (+-0.05), colour cast (+-0.04 per channel) and per-pixel
Gaussian noise (std ``noise``, drawn through a 256-level quantile table).

Species slots (index ``s`` within every genus) are reserved per use, so that no source
class is ever a target class, and the feature network's classes (``probe``) are neither:

=====  ======================================================================
slots  use
=====  ======================================================================
0      ``generic`` (genera 0-2 of every family)
1-3    ``natural`` (all genera of the natural-source families)
4-5    ``probe``, the independent feature network's data (slot 4 of every
       genus, slot 5 of genus 0 of every family)
6-7    spare
8-10   the seven targets, never seen by a source
11     spare
12-13  ``gen100``
14     ``gen10``
15     spare
=====  ======================================================================

Data sets
---------
================= ===== ===================================================== =========
name (plays)      C     species                                               train/test
================= ===== ===================================================== =========
gen10 (CIFAR-10)  10    slot 14 of genus 0 of f00 f03 f04 f06 f07 f09 f14     500 / 100
                        f16 f17 f19: coarse, in look-alike pairs (bird/bird,
                        dog/dog, car/car, ...) like cat/dog in CIFAR-10
gen100            100   20 families (f00-f09, f14-f23) x 5 species (slot 12   100 / 20
(CIFAR-100)             of genera 0-3, slot 13 of genus 0): 20 superclasses
generic           84    every family, genera 0-2, slot 0: many families, few   100 / 20
(ImageNet)              species each, balanced
natural           96    8 natural families (birds f00-f02, dogs f04-f05,       250 / 20
(iNaturalist)           flowers f07-f08, fish f10) x 4 genera x slots 1-3;
                        long-tailed: ``int(n * 0.1 ** (r / (C - 1)))`` for a
                        seeded rank r per class (head 250, tail 25, mean ~98,
                        ~9,400 images); test balanced
cub200            16    birds f00, f01 x 4 genera x slots 8-9                  30 / 30
nabirds           20    birds f00 x 4 x slots 8-9 (the same 8 species as in    30 / 30
                        cub200: NA-Birds and CUB overlap in reality) and
                        f02 x 4 x slots 8-10
stanford_dogs     16    dogs f04, f05 x 4 genera x slots 8-9                   30 / 30
flowers102        16    flowers f07, f08 x 4 genera x slots 8-9                30 / 30
stanford_cars     16    cars f14, f15 x 4 genera x slots 8-9                   30 / 30
fgvc_aircraft     16    aircraft f17, f18 x 4 genera x slots 8-9               30 / 30
food101           12    food f20-f22 x 4 genera x slot 8 (coarser, as          30 / 30
                        Food-101 is)
probe (JFT)       140   every family x (slot 4 of genera 0-3, slot 5 of       100 / 20
                        genus 0): broad, balanced; trains the feature network
                        that measures domain similarity, as the paper's
                        JFT ResNet-101 (neither a source nor a target)
================= ===== ===================================================== =========

Every target family is in ``generic`` (3 species each).  Bird-, dog- and flower-like
targets come from families that ``natural`` covers with 12 species each, on natural
scenes, so they are closer to ``natural``; car-, aircraft- and food-like targets come
from artifact families that only ``generic`` covers, so they are closer to ``generic``.
Targets are fine-grained: sibling species (slots 8 and 9 of one genus) differ only in
details, genera in mid-level attributes, the two families of a target in kind-level
traits.

``probe`` plays JFT in Cui et al. (2018), whose domain similarity came from a ResNet-101
trained on JFT, a data set that is neither a source nor a target.  Its species (slots 4-5)
are disjoint from every source, target, ``gen10`` and ``gen100`` class, but it spans every
family and genus of the world, as a broad generic data set does, so that a network trained
on it embeds all of them: family, genus and (through the sibling pairs of genus 0) species
differences.

Example
-------
>>> from finetail.world import WorldConfig, generate
>>> ds = generate("cub200", WorldConfig(seed=0, image_size=32), 4, 2)
>>> ds.images.shape, ds.images.dtype, len(ds.class_names)
((96, 32, 32, 3), dtype('uint8'), 16)
>>> ds.class_names[:3]
['f00.g0.s08', 'f00.g0.s09', 'f00.g1.s08']
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

__all__ = [
    "WORLD_DATASETS",
    "ClassSpec",
    "GeneratedSet",
    "WorldConfig",
    "class_spec",
    "dataset_classes",
    "dataset_defaults",
    "family_table",
    "generate",
    "render_class",
]


@dataclass(frozen=True)
class WorldConfig:
    """Settings of the generated world; everything else follows from ``seed``."""

    seed: int = 0
    image_size: int = 32  # pixels, square; 16..64 supported
    noise: float = 0.08  # std of per-pixel Gaussian noise, in [0, 1] intensity units
    clutter: float = 0.7  # clutter strength (gratings, distractor discs, one occluder), 0 = none
    detail: float = 1.0  # scale of species-level offsets; smaller = finer-grained (harder)
    rotation: float = 180.0  # max absolute object rotation, degrees
    color_jitter: float = 0.04  # max per-image hue shift of the object, fraction of the hue circle
    position: float = 0.3  # max object-centre offset, fraction of the image half-width

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in 8..256 (16..64 intended), got {self.image_size}")
        for name in ("noise", "clutter", "detail", "rotation", "color_jitter", "position"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")


WORLD_DATASETS: tuple[str, ...] = (
    "gen10",
    "gen100",
    "generic",
    "natural",
    "cub200",
    "stanford_dogs",
    "flowers102",
    "stanford_cars",
    "fgvc_aircraft",
    "food101",
    "nabirds",
    "probe",
)


@dataclass
class GeneratedSet:
    """Images, labels and split of one generated data set.

    Attributes
    ----------
    images : np.ndarray
        uint8, shape (N, H, W, 3); train images first (class-major), then test.
    labels : np.ndarray
        int64, shape (N,), values 0..C-1.
    split : np.ndarray
        object array of ``"train"`` / ``"test"``, shape (N,).
    class_names : list[str]
        Length C; stable world-wide ids ``"fFF.gG.sSS"``; label i <-> class_names[i].
    class_info : pd.DataFrame
        One row per class: label, class_name, family (``"fFF"``), genus (``"fFF.gG"``),
        species (``"fFF.gG.sSS"``), train_count, test_count, realm, kind.
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    class_names: list[str]
    class_info: pd.DataFrame


# --------------------------------------------------------------------------- taxonomy

N_GENERA = 4  # genera per family
N_SPECIES = 16  # species slots per genus

# (kind, realm, shape, part layout) per family; the index is the family id.
_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("bird", "natural", "egg", "head"),
    ("bird", "natural", "egg", "head"),
    ("bird", "natural", "egg", "head"),
    ("bird", "natural", "egg", "head"),
    ("dog", "natural", "blob", "pair_y"),
    ("dog", "natural", "blob", "pair_y"),
    ("dog", "natural", "blob", "pair_y"),
    ("flower", "natural", "star", "center"),
    ("flower", "natural", "star", "center"),
    ("flower", "natural", "polygon", "center"),
    ("fish", "natural", "ellipse", "tip"),
    ("insect", "natural", "crescent", "pair_y"),
    ("reptile", "natural", "blob", "head"),
    ("fungus", "natural", "ellipse", "center"),
    ("car", "artifact", "bar", "pair_x"),
    ("car", "artifact", "bar", "pair_x"),
    ("car", "artifact", "bar", "pair_x"),
    ("aircraft", "artifact", "cross", "tip"),
    ("aircraft", "artifact", "cross", "tip"),
    ("aircraft", "artifact", "cross", "tip"),
    ("food", "artifact", "ring", "center"),
    ("food", "artifact", "ellipse", "center"),
    ("food", "artifact", "polygon", "center"),
    ("tool", "artifact", "bar", "tip"),
    ("building", "artifact", "polygon", "pair_x"),
    ("furniture", "artifact", "cross", "pair_x"),
    ("sign", "artifact", "star", "center"),
    ("instrument", "artifact", "ring", "tip"),
)
N_FAMILIES = len(_FAMILIES)

# kinds that come in several colour morphs (like car paints): each image takes one of
# the first k (saturation, value) factors of _MORPHS: normal, dark, pale
_COLOR_MORPHS = {"car": 3, "tool": 3, "building": 3, "furniture": 3, "sign": 3}
_MORPHS = np.array([(1.0, 1.0), (0.9, 0.45), (0.35, 1.15)])

_PATTERNS = ("stripes", "bands", "spots", "checker", "spokes")

# family aspect-ratio ranges per shape (long axis / short axis)
_ASPECT = {
    "ellipse": (1.3, 1.8),
    "egg": (1.3, 1.7),
    "blob": (1.0, 1.35),
    "star": (1.0, 1.15),
    "polygon": (1.0, 1.2),
    "ring": (1.0, 1.2),
    "bar": (1.9, 2.6),
    "cross": (1.0, 1.15),
    "crescent": (1.0, 1.2),
}

# species slots per use (see module docstring)
_SLOT_GENERIC = 0
_SLOTS_NATURAL = (1, 2, 3)
_SLOTS_PROBE = (4, 5)
_SLOTS_TARGET = (8, 9, 10)
_SLOTS_GEN100 = (12, 13)
_SLOT_GEN10 = 14


def _stable_int(*parts: object) -> int:
    """128-bit integer from a BLAKE2 hash of the parts (stable across runs)."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_stable_int(*parts))))


def _halton(index: int, base: int) -> float:
    """Radical inverse of ``index`` in ``base`` (a low-discrepancy sequence)."""
    out, f = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        out += digit * f
        f /= base
    return out


def _code(index: int, shift: np.ndarray, bases: tuple[int, ...]) -> np.ndarray:
    """Shifted Halton point in [-1, 1]^d: well-spread offsets for siblings."""
    h = np.array([_halton(index + 1, b) for b in bases])
    return ((h + shift) % 1.0) * 2.0 - 1.0


def _class_name(family: int, genus: int, species: int) -> str:
    return f"f{family:02d}.g{genus}.s{species:02d}"


def _parse_class(name: str) -> tuple[int, int, int]:
    try:
        f, g, s = name.split(".")
        if not (f[0] == "f" and g[0] == "g" and s[0] == "s"):
            raise ValueError
        family, genus, species = int(f[1:]), int(g[1:]), int(s[1:])
    except (ValueError, IndexError):
        raise ValueError(f"bad class id {name!r}; expected 'fFF.gG.sSS'") from None
    if not (0 <= family < N_FAMILIES and 0 <= genus < N_GENERA and 0 <= species < N_SPECIES):
        raise ValueError(
            f"class id {name!r} out of range: {N_FAMILIES} families, "
            f"{N_GENERA} genera, {N_SPECIES} species"
        )
    return family, genus, species


@dataclass(frozen=True)
class ClassSpec:
    """Appearance of one species (all colours HSV in [0, 1]; lengths in object units)."""

    class_name: str
    realm: str
    kind: str
    shape: str
    pattern: str
    aspect: float  # long / short axis of the body
    shape_param: float  # egg taper, blob lobe depth, star points, polygon sides, ring hole
    #                     radius, cross wing offset, crescent bite offset (else 0)
    shape_param2: float  # blob lobe phase, star depth, cross bar half-thickness (else 0)
    body_hsv: tuple[float, float, float]
    pattern_hsv: tuple[float, float, float]
    pattern_freq: float  # cycles per object radius (spokes: number of spokes)
    pattern_angle: float  # radians, stripe/checker orientation in the object frame
    pattern_contrast: float  # 0..1 mix of pattern colour into the body
    part_hsv: tuple[float, float, float]
    part_xy: tuple[float, float]  # part centre relative to the body's half-axes
    part_radius: float  # part radius, object units
    part_mirror: str  # "none", "x" (mirror across the y axis) or "y"
    color_morphs: int  # number of (saturation, value) morphs an image's body takes


def _hue(h: float) -> float:
    return float(h % 1.0)


@lru_cache(maxsize=None)
def _family_params(seed: int, family: int) -> dict:
    kind, realm, shape, layout = _FAMILIES[family]
    rng = _rng(seed, "family", family)
    lo, hi = _ASPECT[shape]
    # kinds own a colour region (hues spread by the golden ratio); families sit inside it
    kinds = list(dict.fromkeys(k for k, *_ in _FAMILIES))
    base_hue = kinds.index(kind) * 0.6180339887 + _rng(seed, "hue-origin").uniform(0, 1)
    p = {
        "aspect": float(rng.uniform(lo, hi)),
        "hue": _hue(base_hue + rng.uniform(-0.07, 0.07)),
        "sat": float(rng.uniform(0.55, 0.9)),
        "val": float(rng.uniform(0.55, 0.9)),
        "pattern": _PATTERNS[int(rng.integers(len(_PATTERNS)))],
        "pat_hue_off": float(rng.uniform(0.25, 0.75)),
        "pat_val": float(rng.uniform(0.15, 0.95)),
        "freq": float(rng.uniform(1.2, 2.2)),
        "angle": float(rng.uniform(0, math.pi)),
        "contrast": float(rng.uniform(0.45, 0.75)),
        "part_hue_off": float(rng.uniform(0.3, 0.7)),
        "part_r": float(rng.uniform(0.24, 0.34)),
        # genus codes: a Latin hypercube, each attribute takes every one of N_GENERA
        # evenly spaced levels exactly once, so genera never coincide on any attribute
        "genus_codes": (np.argsort(rng.random((4, N_GENERA)), axis=1).T + 0.5) * (2.0 / N_GENERA) - 1.0,
    }
    if shape == "egg":
        p["sp"] = float(rng.uniform(0.25, 0.45))  # taper
    elif shape == "blob":
        p["sp"] = float(rng.uniform(0.12, 0.22))  # lobe depth
        p["sp2"] = float(rng.uniform(0, 2 * math.pi))  # lobe phase
    elif shape == "star":
        p["sp"] = float(rng.integers(5, 9))  # points
        p["sp2"] = float(rng.uniform(0.2, 0.35))  # depth
    elif shape == "polygon":
        p["sp"] = float(rng.integers(5, 9))  # sides
    elif shape == "ring":
        p["sp"] = float(rng.uniform(0.3, 0.45))  # hole radius / outer radius
    elif shape == "cross":
        p["sp"] = float(rng.uniform(-0.15, 0.25))  # wing offset along the body
        p["sp2"] = float(rng.uniform(0.3, 0.4))  # bar half-thickness
    elif shape == "crescent":
        p["sp"] = float(rng.uniform(0.45, 0.65))  # bite offset
    if layout == "head":
        p["part_xy"] = (0.95, float(rng.uniform(0.0, 0.3)))
    elif layout == "pair_x":
        p["part_xy"] = (float(rng.uniform(0.45, 0.65)), -0.85)
    elif layout == "pair_y":
        p["part_xy"] = (float(rng.uniform(0.3, 0.6)), 0.8)
    elif layout == "center":
        p["part_xy"] = (float(rng.uniform(-0.1, 0.1)), 0.0)
    else:  # tip
        p["part_xy"] = (-0.95, 0.0)
    return p


def family_table() -> pd.DataFrame:
    """The 28 families: id, kind, realm, shape, part layout.

    Returns
    -------
    pd.DataFrame
        Columns ``family`` (``"fFF"``), ``kind``, ``realm``, ``shape``, ``part_layout``.
    """
    return pd.DataFrame(
        [
            {"family": f"f{i:02d}", "kind": k, "realm": r, "shape": s, "part_layout": lay}
            for i, (k, r, s, lay) in enumerate(_FAMILIES)
        ]
    )


# half-ranges of the genus / species offsets: body hue (fraction of the hue circle),
# log2 pattern frequency, log2 part radius, log2 aspect ratio, part hue (species only)
_GENUS_SPREAD = (0.2, 0.8, 0.5, 0.35)
_SPECIES_SPREAD = (0.06, 0.42, 0.42, 0.24, 0.1)


@lru_cache(maxsize=4096)
def class_spec(class_name: str, seed: int = 0, detail: float = 1.0) -> ClassSpec:
    """Appearance of a species: a pure function of (seed, detail, class id).

    Parameters
    ----------
    class_name : str
        ``"fFF.gG.sSS"`` with FF < 28, G < 4, SS < 16.
    seed : int
        ``WorldConfig.seed``.
    detail : float
        ``WorldConfig.detail``; scales the species-level offsets.

    Returns
    -------
    ClassSpec
    """
    family, genus, species = _parse_class(class_name)
    kind, realm, shape, layout = _FAMILIES[family]
    fp = _family_params(seed, family)
    grng = _rng(seed, "genus", family, genus)
    gc = fp["genus_codes"][genus]
    sc = _code(species, grng.uniform(0, 1, size=5), (2, 3, 5, 7, 11)) * detail

    body_hue = fp["hue"] + _GENUS_SPREAD[0] * gc[0] + _SPECIES_SPREAD[0] * sc[0]
    freq = fp["freq"] * 2 ** (_GENUS_SPREAD[1] * gc[1] + _SPECIES_SPREAD[1] * sc[1])
    part_r = fp["part_r"] * 2 ** (_GENUS_SPREAD[2] * gc[2] + _SPECIES_SPREAD[2] * sc[2])
    aspect = fp["aspect"] * 2 ** (_GENUS_SPREAD[3] * gc[3] + _SPECIES_SPREAD[3] * sc[3])
    if shape in ("star", "polygon", "ring", "cross", "crescent"):
        aspect = max(aspect, 1.0)
    pattern = fp["pattern"]
    if pattern == "spokes":
        freq = float(round(2.5 * freq + 1))  # whole number of spokes
    angle = fp["angle"] + grng.uniform(-0.6, 0.6)
    pat_hue = body_hue + fp["pat_hue_off"] + grng.uniform(-0.08, 0.08)
    pat_val = float(np.clip(fp["pat_val"] + grng.uniform(-0.15, 0.15), 0.1, 1.0))
    part_hue = body_hue + fp["part_hue_off"] + grng.uniform(-0.12, 0.12) + _SPECIES_SPREAD[4] * sc[4]
    px, py = fp["part_xy"]
    px += grng.uniform(-0.1, 0.1)
    py += grng.uniform(-0.1, 0.1)
    mirror = {"pair_x": "x", "pair_y": "y"}.get(layout, "none")
    sp = fp.get("sp", 0.0)
    sp2 = fp.get("sp2", 0.0)
    if shape == "star":
        sp2 = sp2 * 2 ** (0.3 * gc[3])  # genus varies petal depth
    return ClassSpec(
        class_name=class_name,
        realm=realm,
        kind=kind,
        shape=shape,
        pattern=pattern,
        aspect=float(aspect),
        shape_param=float(sp),
        shape_param2=float(sp2),
        body_hsv=(_hue(body_hue), fp["sat"], fp["val"]),
        pattern_hsv=(_hue(pat_hue), float(np.clip(fp["sat"] + grng.uniform(-0.2, 0.1), 0.2, 1)), pat_val),
        pattern_freq=float(freq),
        pattern_angle=float(angle),
        pattern_contrast=fp["contrast"],
        part_hsv=(_hue(part_hue), float(grng.uniform(0.5, 0.95)), float(grng.uniform(0.3, 0.95))),
        part_xy=(float(px), float(py)),
        part_radius=float(part_r),
        part_mirror=mirror,
        color_morphs=_COLOR_MORPHS.get(kind, 1),
    )


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class _DatasetSpec:
    classes: tuple[str, ...]
    train_per_class: int
    test_per_class: int
    imbalance: float  # train count ratio head/tail; 1 = balanced


def _species(families, genera, slots) -> list[str]:
    return [_class_name(f, g, s) for f in families for g in genera for s in slots]


_NATURAL_SOURCE_FAMILIES = (0, 1, 2, 4, 5, 7, 8, 10)
_GEN10_FAMILIES = (0, 3, 4, 6, 7, 9, 14, 16, 17, 19)
_GEN100_FAMILIES = tuple(range(0, 10)) + tuple(range(14, 24))


def _build_specs() -> dict[str, _DatasetSpec]:
    all_g = range(N_GENERA)
    t8_9 = _SLOTS_TARGET[:2]
    gen100 = []
    for f in _GEN100_FAMILIES:
        gen100 += _species([f], all_g, [_SLOTS_GEN100[0]]) + [_class_name(f, 0, _SLOTS_GEN100[1])]
    probe = []
    for f in range(N_FAMILIES):
        probe += _species([f], all_g, [_SLOTS_PROBE[0]]) + [_class_name(f, 0, _SLOTS_PROBE[1])]
    specs = {
        "gen10": _DatasetSpec(tuple(_class_name(f, 0, _SLOT_GEN10) for f in _GEN10_FAMILIES), 500, 100, 1.0),
        "gen100": _DatasetSpec(tuple(gen100), 100, 20, 1.0),
        "generic": _DatasetSpec(tuple(_species(range(N_FAMILIES), range(3), [_SLOT_GENERIC])), 100, 20, 1.0),
        "natural": _DatasetSpec(tuple(_species(_NATURAL_SOURCE_FAMILIES, all_g, _SLOTS_NATURAL)), 250, 20, 10.0),
        "cub200": _DatasetSpec(tuple(_species((0, 1), all_g, t8_9)), 30, 30, 1.0),
        "stanford_dogs": _DatasetSpec(tuple(_species((4, 5), all_g, t8_9)), 30, 30, 1.0),
        "flowers102": _DatasetSpec(tuple(_species((7, 8), all_g, t8_9)), 30, 30, 1.0),
        "stanford_cars": _DatasetSpec(tuple(_species((14, 15), all_g, t8_9)), 30, 30, 1.0),
        "fgvc_aircraft": _DatasetSpec(tuple(_species((17, 18), all_g, t8_9)), 30, 30, 1.0),
        "food101": _DatasetSpec(tuple(_species((20, 21, 22), all_g, _SLOTS_TARGET[:1])), 30, 30, 1.0),
        "nabirds": _DatasetSpec(tuple(_species((0,), all_g, t8_9) + _species((2,), all_g, _SLOTS_TARGET)), 30, 30, 1.0),
        "probe": _DatasetSpec(tuple(probe), 100, 20, 1.0),
    }
    for name, spec in specs.items():
        if len(set(spec.classes)) != len(spec.classes):
            raise RuntimeError(f"duplicate classes in {name}")
    return specs


_SPECS = _build_specs()
if tuple(_SPECS) != WORLD_DATASETS:
    raise RuntimeError("world data set table out of sync with WORLD_DATASETS")


def _spec(name: str) -> _DatasetSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown world data set {name!r}; valid names: {', '.join(WORLD_DATASETS)}")
    return _SPECS[name]


def dataset_defaults(name: str) -> dict:
    """Default sizes of a world data set.

    Parameters
    ----------
    name : str
        One of :data:`WORLD_DATASETS`.

    Returns
    -------
    dict
        ``{"train_per_class": int, "test_per_class": int}``.  For the long-tailed
        ``natural`` set ``train_per_class`` is the head class's count.
    """
    s = _spec(name)
    return {"train_per_class": s.train_per_class, "test_per_class": s.test_per_class}


def dataset_classes(name: str) -> list[str]:
    """Class ids of a world data set, in label order.

    Parameters
    ----------
    name : str
        One of :data:`WORLD_DATASETS`.

    Returns
    -------
    list[str]
        Sorted ``"fFF.gG.sSS"`` ids; label i is element i.
    """
    return sorted(_spec(name).classes)


def _train_counts(name: str, classes: list[str], n_max: int, imbalance: float, seed: int) -> np.ndarray:
    c = len(classes)
    if imbalance == 1.0 or c == 1:
        return np.full(c, n_max, dtype=np.int64)
    ranks = np.arange(c)
    profile = np.array([max(1, int(n_max * (1.0 / imbalance) ** (i / (c - 1)))) for i in ranks])
    perm = _rng(seed, "longtail", name).permutation(c)  # class k gets rank perm[k]
    return profile[perm].astype(np.int64)


# --------------------------------------------------------------------------- rendering

_F32 = np.float32
_CHUNK_PIXELS = 65536  # pixels per vectorised batch: its float32 planes stay cache-sized


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs broadcastable arrays in [0, 1]; output (..., 3)."""
    h = np.asarray(h) % 1.0
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _body_distance(spec: ClassSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance-like field of the body (< 0 inside), object units."""
    a = math.sqrt(spec.aspect)
    b = 1.0 / a
    xs, ys = x * _F32(1.0 / a), y * _F32(1.0 / b)
    shape = spec.shape
    if shape == "ellipse":
        return np.sqrt(xs * xs + ys * ys) - _F32(1.0)
    if shape == "egg":
        w = np.maximum(_F32(1.0) + _F32(spec.shape_param) * xs, _F32(0.3))
        yy = ys / w
        return np.sqrt(xs * xs + yy * yy) - _F32(1.0)
    if shape == "ring":
        r = np.sqrt(xs * xs + ys * ys)
        hole = _F32(spec.shape_param)
        mid, half = (_F32(1.0) + hole) / 2, (_F32(1.0) - hole) / 2
        return (np.abs(r - mid) - half) / half * _F32(0.5)
    if shape == "bar":
        q = (xs * xs) ** 2 + (ys * ys) ** 2
        return np.sqrt(np.sqrt(q)) - _F32(1.0)
    if shape == "cross":
        t = _F32(spec.shape_param2)
        fx = x * _F32(1.0 / 1.1)
        q1 = (fx * fx) ** 2 + ((y / t) ** 2) ** 2
        wx = (x - _F32(spec.shape_param)) / t
        wy = y * _F32(1.0 / (1.1 * spec.aspect))
        q2 = (wx * wx) ** 2 + (wy * wy) ** 2
        return np.sqrt(np.sqrt(np.minimum(q1, q2))) - _F32(1.0)
    if shape == "crescent":
        d1 = np.sqrt(xs * xs + ys * ys) - _F32(1.0)
        bx = xs - _F32(spec.shape_param)
        d2 = _F32(0.85) - np.sqrt(bx * bx + ys * ys)
        return np.maximum(d1, d2)
    r = np.sqrt(xs * xs + ys * ys)
    phi = np.arctan2(ys, xs)
    if shape == "blob":
        depth = _F32(spec.shape_param)
        rad = _F32(1.0) + depth * np.cos(_F32(3.0) * phi + _F32(spec.shape_param2))
        return r / rad - _F32(1.0)
    if shape == "star":
        k, depth = spec.shape_param, spec.shape_param2
        rad = _F32(1.2 * (1.0 - depth)) + _F32(1.2 * depth) * np.cos(_F32(k) * phi)
        return r / rad - _F32(1.0)
    if shape == "polygon":
        k = spec.shape_param
        sector = _F32(2 * math.pi / k)
        m = phi - np.floor(phi / sector) * sector - sector / 2  # np.mod is ~40x slower
        return r * np.cos(m) / _F32(math.cos(math.pi / k)) - _F32(1.0)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(spec: ClassSpec, x, y, phase, fade):
    """Pattern map in [0, 1] (n, H, W); ``phase``/``fade`` are (n, 1, 1)."""
    f = _F32(2 * math.pi * spec.pattern_freq)
    kind = spec.pattern
    if kind == "stripes":
        t = np.cos(f * (x * _F32(math.cos(spec.pattern_angle)) + y * _F32(math.sin(spec.pattern_angle))) + phase)
    elif kind == "bands":
        t = np.cos(f * np.sqrt(x * x + y * y) + phase)
    elif kind == "spots":
        c, s = _F32(math.cos(spec.pattern_angle)), _F32(math.sin(spec.pattern_angle))
        t = np.cos(f * (c * x + s * y) + phase) * np.cos(f * (c * y - s * x))
        t = t * _F32(2.0) - _F32(0.6)
    elif kind == "checker":
        c, s = _F32(math.cos(spec.pattern_angle)), _F32(math.sin(spec.pattern_angle))
        t = np.cos(f * (c * x + s * y)) * np.cos(f * (c * y - s * x) + phase) * _F32(2.0)
    elif kind == "spokes":
        t = np.cos(_F32(spec.pattern_freq) * np.arctan2(y, x) + phase)
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return np.clip(_F32(0.5) + _F32(1.5) * t, _F32(0.0), _F32(1.0)) * fade


# Columns of the per-image uniforms (fixed, so image streams stay prefix-stable).
_U_POSE = 0  # cx, cy, scale, rotation
_U_BG = 4  # hue, saturation, value
_U_GRATING = 7  # 2 gratings x (angle, frequency, phase, hue)
_U_DISTRACT = 15  # _N_DISTRACT discs x (x, y, radius, hue, saturation/value)
_N_DISTRACT = 4
_U_LOOK = 35  # hue jitter, value jitter, pattern phase, light angle, colour morph
_U_CAMERA = 40  # gain, bias, 3 x colour cast
_N_POSE = 48
# the 256 mid-quantiles of N(0, 1), rescaled to unit variance
_NOISE_TABLE = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])
_NOISE_TABLE = (_NOISE_TABLE / _NOISE_TABLE.std()).astype(np.float32)
_HAZE = 0.35  # max per-image haze: blend towards a grey-ish fog colour


def _draw_distractor(img, q, gx, gy, clutter, size, realm):
    """Alpha-blend one distractor described by uniforms ``q[:, :5]`` onto ``img`` (n, 3, H, W).

    Natural scenes get round pebbles/leaves (discs); artifact scenes get boxes (squares).
    """
    ddx = gx - ((q[:, 0] * 2 - 1) * 0.95).astype(_F32)[:, None, None]
    ddy = gy - ((q[:, 1] * 2 - 1) * 0.95).astype(_F32)[:, None, None]
    rad = (0.08 + 0.2 * q[:, 2]).astype(_F32)[:, None, None]
    if realm == "natural":
        d = np.sqrt(ddx * ddx + ddy * ddy) - rad
    else:
        d = np.maximum(np.abs(ddx), np.abs(ddy)) - rad * _F32(0.85)
    m = np.clip(_F32(0.5) - d * _F32(size / 2), _F32(0.0), _F32(1.0)) * clutter
    sv = 0.3 + 0.6 * q[:, 4]
    colour = _hsv_to_rgb(q[:, 3], sv, sv).astype(_F32)[:, :, None, None]
    _blend(img, colour, m)
    return img


def _blend(img: np.ndarray, colour: np.ndarray, mask: np.ndarray) -> None:
    """``img += (colour - img) * mask`` in place; img (n, 3, H, W), mask (n, H, W)."""
    tmp = colour - img
    tmp *= mask[:, None]
    img += tmp


def _per_image(values) -> np.ndarray:
    """Per-image values (n,) -> (n, 1, 1) float32, to broadcast over an image."""
    return np.asarray(values, dtype=_F32)[:, None, None]


def _rgb(n: int, h, s, v) -> np.ndarray:
    """Per-image colour (each of h, s, v a scalar or (n,)) -> (n, 3, 1, 1) float32."""
    h, s, v = np.broadcast_arrays(h, s, v, np.zeros(n))[:3]
    return _hsv_to_rgb(h, np.clip(s, 0, 1), np.clip(v, 0, 1)).astype(_F32)[:, :, None, None]


def _object_frame(u: np.ndarray, world: WorldConfig, gx: np.ndarray, gy: np.ndarray):
    """Object-frame coordinates ``x, y`` (n, H, W) from the pose uniforms (object radius ~ 1),
    one pixel in object units ``px_obj`` (n,) and ``aa`` (n, 1, 1), distance -> pixels for
    anti-aliased edges."""
    p = u[:, _U_POSE:]
    cx, cy = (p[:, 0] * 2 - 1) * world.position, (p[:, 1] * 2 - 1) * world.position
    scale = 0.34 + 0.2 * p[:, 2]
    theta = np.deg2rad((p[:, 3] * 2 - 1) * world.rotation)
    cos_s, sin_s = _per_image(np.cos(theta) / scale), _per_image(np.sin(theta) / scale)
    dx, dy = gx - _per_image(cx), gy - _per_image(cy)
    x = cos_s * dx + sin_s * dy
    y = cos_s * dy - sin_s * dx
    px_obj = (2.0 / world.image_size) / scale
    aa = _per_image(1.0 / px_obj)
    return x, y, px_obj, aa


def _background(spec: ClassSpec, u: np.ndarray, world: WorldConfig, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The scene behind the object (n, 3, H, W) float32: the realm's palette (natural: greens
    and browns, artifact: any hue, greyer; the realm is part of the domain), two colour
    gratings and all distractors but the last."""
    n, size = u.shape[0], world.image_size
    b = u[:, _U_BG:]
    if spec.realm == "natural":
        bg = _rgb(n, 0.05 + 0.4 * b[:, 0], 0.2 + 0.35 * b[:, 1], 0.25 + 0.5 * b[:, 2])
    else:
        bg = _rgb(n, b[:, 0], 0.05 + 0.2 * b[:, 1], 0.35 + 0.5 * b[:, 2])
    img = np.broadcast_to(bg, (n, 3, size, size)).copy()
    clutter = _F32(world.clutter)
    if world.clutter > 0:
        for j in range(2):
            g = u[:, _U_GRATING + 4 * j :]
            kfreq = 1.5 + 5.0 * g[:, 1]  # radians per half-width unit
            kx = _per_image(kfreq * np.cos(2 * math.pi * g[:, 0]))
            ky = _per_image(kfreq * np.sin(2 * math.pi * g[:, 0]))
            wave = np.cos(kx * gx + ky * gy + _per_image(2 * math.pi * g[:, 2]))
            img += (clutter * _F32(0.3)) * wave[:, None] * (_rgb(n, g[:, 3], 0.5, 0.5) - _F32(0.25))
        for j in range(_N_DISTRACT - 1):
            img = _draw_distractor(img, u[:, _U_DISTRACT + 5 * j :], gx, gy, clutter, size, spec.realm)
    return img


def _look_jitter(u: np.ndarray, world: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-image hue shift and value factor (n,), shared by the body, its pattern and its part."""
    look = u[:, _U_LOOK:]
    hue_jit = (look[:, 0] * 2 - 1) * world.color_jitter
    val_jit = 1.0 + (look[:, 1] - 0.5) * 0.3
    return hue_jit, val_jit


def _draw_body(img, spec: ClassSpec, u, world: WorldConfig, frame, jitter) -> None:
    """Blend the body with its surface pattern and shading onto ``img`` in place; some
    artifacts come in several colours (cars, ...)."""
    x, y, px_obj, aa = frame
    hue_jit, val_jit = jitter
    n = u.shape[0]
    look = u[:, _U_LOOK:]
    bh, bs, bv = spec.body_hsv
    ph, ps, pv = spec.pattern_hsv
    morph = _MORPHS[np.minimum((look[:, 4] * spec.color_morphs).astype(np.int64), spec.color_morphs - 1)]
    body_rgb = _rgb(n, bh + hue_jit, bs * morph[:, 0], bv * val_jit * morph[:, 1])
    pat_rgb = _rgb(n, ph + hue_jit, ps, pv * val_jit)
    d = _body_distance(spec, x, y)
    mask = np.clip(_F32(0.5) - d * aa, _F32(0.0), _F32(1.0))
    # fade patterns finer than ~4 pixels per cycle (they would only alias)
    freq = spec.pattern_freq if spec.pattern != "spokes" else spec.pattern_freq / (2 * math.pi * 0.6)
    fade = np.clip(2.0 - 4.0 * freq * px_obj, 0.0, 1.0) * spec.pattern_contrast
    pat = _pattern(spec, x, y, _per_image(2 * math.pi * look[:, 2]), _per_image(fade))
    # light from a random direction gives the body a little shading
    la = 2 * math.pi * look[:, 3]
    shade = _F32(1.0) + _F32(0.12) * (x * _per_image(np.cos(la)) + y * _per_image(np.sin(la)))
    body = (pat_rgb - body_rgb) * pat[:, None]
    body += body_rgb
    body *= shade[:, None]
    _blend(img, body, mask)


def _draw_part(img, spec: ClassSpec, frame, jitter) -> None:
    """Blend the secondary part (a disc, mirrored in x or y for pairs) onto ``img`` in place."""
    x, y, _, aa = frame
    hue_jit, val_jit = jitter
    a = math.sqrt(spec.aspect)
    pxc, pyc = _F32(spec.part_xy[0] * a), _F32(spec.part_xy[1] / a)
    pdx, pdy = x - pxc, y - pyc
    pd = pdx * pdx + pdy * pdy
    if spec.part_mirror == "x":
        qdx = x + pxc
        pd = np.minimum(pd, qdx * qdx + pdy * pdy)
    elif spec.part_mirror == "y":
        qdy = y + pyc
        pd = np.minimum(pd, pdx * pdx + qdy * qdy)
    pmask = np.clip(_F32(0.5) - (np.sqrt(pd) - _F32(spec.part_radius)) * aa, _F32(0.0), _F32(1.0))
    part_rgb = _rgb(x.shape[0], spec.part_hsv[0] + hue_jit, spec.part_hsv[1], spec.part_hsv[2] * val_jit)
    _blend(img, part_rgb, pmask)


def _camera(img: np.ndarray, u: np.ndarray, world: WorldConfig, noise_rng: np.random.Generator) -> np.ndarray:
    """Haze, gain, bias, colour cast and noise on ``img`` (n, 3, H, W) float32 (modified) ->
    uint8 (n, H, W, 3). The only consumer of ``noise_rng``."""
    n, size = u.shape[0], world.image_size
    c = u[:, _U_CAMERA:]
    haze = (_HAZE * c[:, 5]).astype(_F32)[:, None, None, None]
    fog = _rgb(n, c[:, 6], 0.15, 0.4 + 0.4 * c[:, 7])
    gain = (0.85 + 0.3 * c[:, 0]).astype(_F32)[:, None, None, None]
    bias = ((c[:, 1:2] - 0.5) * 0.1 + (c[:, 2:5] - 0.5) * 0.08).astype(_F32)[:, :, None, None]
    # 255 * ((img * (1 - haze) + fog * haze) * gain + bias) + 0.5, folded into one affine map
    img *= _F32(255.0) * (_F32(1.0) - haze) * gain
    img += _F32(255.0) * (fog * haze * gain + bias) + _F32(0.5)
    if world.noise > 0:
        # Gaussian noise through a 256-level quantile table: 5x faster than standard_normal
        noise = _NOISE_TABLE.take(noise_rng.integers(0, 256, size=img.shape, dtype=np.uint8))
        noise *= _F32(255.0 * world.noise)
        img += noise
    out = np.empty((n, size, size, 3), dtype=_F32)
    np.clip(img.transpose(0, 2, 3, 1), _F32(0.0), _F32(255.0), out=out)
    return out.astype(np.uint8)


def _render_chunk(spec: ClassSpec, u: np.ndarray, world: WorldConfig, noise_rng: np.random.Generator) -> np.ndarray:
    """Render images from per-image uniforms ``u`` (n, _N_POSE) -> uint8 (n, H, W, 3).

    Back to front: background (with all distractors but one), body, part, the last
    distractor (it occludes the object), camera.
    """
    size = world.image_size
    lin = (np.arange(size, dtype=_F32) + _F32(0.5)) * _F32(2.0 / size) - _F32(1.0)
    gx = lin[None, None, :]  # (1, 1, W) image x in [-1, 1]
    gy = lin[None, :, None]  # (1, H, 1)
    frame = _object_frame(u, world, gx, gy)
    jitter = _look_jitter(u, world)
    img = _background(spec, u, world, gx, gy)
    _draw_body(img, spec, u, world, frame, jitter)
    _draw_part(img, spec, frame, jitter)
    if world.clutter > 0:
        last = u[:, _U_DISTRACT + 5 * (_N_DISTRACT - 1) :]
        img = _draw_distractor(img, last, gx, gy, _F32(world.clutter), size, spec.realm)
    return _camera(img, u, world, noise_rng)


def render_class(class_name: str, n: int, world: WorldConfig, stream: str = "") -> np.ndarray:
    """Render ``n`` images of one species.

    Parameters
    ----------
    class_name : str
        Species id ``"fFF.gG.sSS"``.
    n : int
        Number of images.
    world : WorldConfig
        World settings.
    stream : str
        Key of the image stream; ``generate`` uses ``"<data set>/<split>"``.  The same
        (world, class, stream) gives the same images, and the first k of n images equal a
        request for k (prefix-stable).

    Returns
    -------
    np.ndarray
        uint8, shape (n, image_size, image_size, 3).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    size = world.image_size
    spec = class_spec(class_name, world.seed, world.detail)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    if n == 0:
        return out
    u = _rng(world.seed, "pose", class_name, stream).random((n, _N_POSE))
    noise_rng = _rng(world.seed, "noise", class_name, stream)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        out[start:stop] = _render_chunk(spec, u[start:stop], world, noise_rng)
    return out


def generate(
    name: str,
    world: WorldConfig,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> GeneratedSet:
    """Generate one world data set.

    Parameters
    ----------
    name : str
        One of :data:`WORLD_DATASETS`.
    world : WorldConfig
        World settings.
    train_per_class, test_per_class : int, optional
        Images per class; default :func:`dataset_defaults`.  For ``natural`` the train
        count is the head class's; class k gets ``int(n * 0.1 ** (r_k / (C - 1)))``
        (at least 1) for a seeded rank r_k, so the tail is about a tenth of the head.

    Returns
    -------
    GeneratedSet
        Train images (class by class, in label order) followed by test images.

    Raises
    ------
    ValueError
        For an unknown name or a negative size.
    """
    spec = _spec(name)
    n_train = spec.train_per_class if train_per_class is None else int(train_per_class)
    n_test = spec.test_per_class if test_per_class is None else int(test_per_class)
    if n_train < 0 or n_test < 0:
        raise ValueError(f"sizes must be >= 0, got train={n_train}, test={n_test}")
    classes = sorted(spec.classes)
    train_counts = _train_counts(name, classes, n_train, spec.imbalance, world.seed) if n_train > 0 else np.zeros(len(classes), np.int64)
    test_counts = np.full(len(classes), n_test, dtype=np.int64)

    parts, labels, splits = [], [], []
    for split, counts in (("train", train_counts), ("test", test_counts)):
        for label, cls in enumerate(classes):
            k = int(counts[label])
            parts.append(render_class(cls, k, world, stream=f"{name}/{split}"))
            labels.append(np.full(k, label, dtype=np.int64))
            splits.append(np.full(k, split, dtype=object))
    size = world.image_size
    images = np.concatenate(parts) if parts else np.empty((0, size, size, 3), np.uint8)

    rows = []
    for label, cls in enumerate(classes):
        f, g, _ = _parse_class(cls)
        kind, realm, _, _ = _FAMILIES[f]
        rows.append(
            {
                "label": label,
                "class_name": cls,
                "family": cls[:3],
                "genus": cls[:6],
                "species": cls,
                "train_count": int(train_counts[label]),
                "test_count": int(test_counts[label]),
                "realm": realm,
                "kind": kind,
            }
        )
    return GeneratedSet(
        images=images,
        labels=np.concatenate(labels),
        split=np.concatenate(splits),
        class_names=classes,
        class_info=pd.DataFrame(rows),
    )


def write_world_dataset(name: str, spec: dict, out: Path) -> str:
    """``finetail generate``: render dataset ``name`` of the world ``spec["world"]`` at the
    sizes ``spec["dataset"]`` and write ``images.npy``, ``manifest.parquet``, ``classes.csv``
    and ``source.json`` (the generator's settings, for lineage) to ``out``. Returns a log line."""
    import time

    from .fileio import write_json
    from .manifest import class_table, write_array_dataset

    unknown = sorted(set(spec.get("world", {})) - {f.name for f in fields(WorldConfig)})
    if unknown:
        raise ValueError(f"unknown world setting(s) {unknown}; valid: {', '.join(f.name for f in fields(WorldConfig))}")
    world = WorldConfig(**spec.get("world", {}))
    ds = {k: v for k, v in spec.get("dataset", {}).items() if k != "kind"}
    t0 = time.perf_counter()
    g = generate(name, world, ds.get("train_per_class"), ds.get("test_per_class"))
    df = write_array_dataset(out, g.images, g.labels, g.class_names, g.split)
    info = g.class_info.merge(class_table(df)[["label"]], on="label")
    info.to_csv(out / "classes.csv", index=False)
    source = {"dataset": name, "source": "finetail.world", "world": spec.get("world", {}), "sizes": ds,
              "images": int(len(df)), "classes": len(g.class_names), "shape": list(g.images.shape[1:])}
    write_json(source, out / "source.json")
    return f"generated {name}: {len(df)} images, {len(g.class_names)} classes in {time.perf_counter() - t0:.1f}s"
