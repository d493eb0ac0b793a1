"""Per-class mean penultimate features of a network's penultimate layer (the input of domain similarity).

The feature model is either one the pipeline pretrained (a ``model.pt`` written by
``finetail train --save-model``: in the default study the feature network pretrained on the
world's ``probe`` classes, which no source or target holds) or a torchvision network with its
pretrained-weights enum (``tv:resnet101`` + ``IMAGENET1K_V2``; needs the internet on first
use). Its identity (tracking run id or weights name, plus a sha256 digest of its weights) and
the preprocessing travel with the features.

Images come from either kind of manifest: an array store (small images, in memory) or image
files (decoded by :mod:`finetail.loader`, as the training engine's test images are). Both go
through one preprocessing, :class:`Preprocess`: resize and crop to the model's input side
(:func:`finetail.loader.eval_transform`), then the model's normalisation. Cui et al. (2018)
fed ResNet-101 299 x 299 inputs made by TF-slim's evaluation preprocessing: the central 87.5%
of each side, resized to 299 x 299 (``Preprocess(299, 0.875, "central")``); torchvision's
ImageNet evaluation instead resizes the short side to ``size / 0.875`` and takes the centre
square (``"short_side"``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .loader import TEST_CROP_FRACTION, check_crop, eval_transform
from .models import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model

__all__ = [
    "TV_IMAGE_SIZE",
    "FeatureModel",
    "Preprocess",
    "class_mean_features",
    "file_class_mean_features",
    "SplitImages",
    "load_feature_model",
    "split_images",
    "state_digest",
    "write_class_features",
]

TV_IMAGE_SIZE = 224  # torchvision models' input side unless Preprocess.image_size says otherwise


@dataclass
class FeatureModel:
    backbone: torch.nn.Module
    mean: torch.Tensor  # (1, 3, 1, 1), pixel units 0..255
    std: torch.Tensor
    identity: dict  # {"kind", "name", "run_id" or "weights", "sha256"}
    image_size: int | None = None  # its own input side: tv: models 224; pipeline: the recipe's (file manifests)
    head: torch.nn.Module | None = None  # a pipeline network's classifier over its own (source) classes


@dataclass(frozen=True)
class Preprocess:
    """How images reach the feature model.

    ``image_size`` None: the model's own side (:attr:`FeatureModel.image_size`) for files and
    torchvision models; array images of a pipeline network as stored (as its engine tested
    them). Whenever images are resized, ``crop`` and ``crop_fraction`` choose the crop
    (:func:`finetail.loader.eval_transform`).
    """

    image_size: int | None = None  # pixels
    crop_fraction: float = TEST_CROP_FRACTION
    crop: str = "short_side"  # or "central" (Cui et al.'s TF-slim evaluation crop)

    def __post_init__(self) -> None:
        check_crop(self.crop_fraction, self.crop)
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")

    def size_for(self, fm: FeatureModel, files: bool) -> int | None:
        """The input side for ``fm`` on files (``files``) or arrays; None = arrays as stored."""
        if self.image_size:
            return self.image_size
        if files or fm.identity.get("kind") == "torchvision":
            return fm.image_size or TV_IMAGE_SIZE
        return None


def state_digest(state: dict) -> str:
    """sha256 over a state_dict's names and tensor bytes (stable across save formats)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_feature_model(spec: str, weights: str | None = None, num_classes: int = 1) -> FeatureModel:
    """``spec`` is a path to a pipeline ``model.pt`` or ``tv:<name>`` (then ``weights`` names its enum)."""
    if spec.startswith("tv:"):
        model = build_model(spec, num_classes, weights=weights)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        ident = {"kind": "torchvision", "name": spec, "weights": weights or "", "sha256": state_digest(model.backbone.state_dict())}
        return FeatureModel(model.backbone, mean, std, ident, image_size=TV_IMAGE_SIZE)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"feature model {path} does not exist: run the pretrain job that writes it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = json.loads(state["cfg"])["recipe"]
    norm = json.loads(state["normalisation"])
    num = state["model"]["head.weight"].shape[0]
    # The shortcut changes the forward pass (init does not: the weights are loaded); a
    # bias-free head is LDAM's cosine head.
    model: Classifier = build_model(cfg.get("model", "resnet32"), num, cfg.get("width", 16),
                                    shortcut=cfg.get("shortcut", "subsample"),
                                    head="linear" if "head.bias" in state["model"] else "normed")
    model.load_state_dict(state["model"])
    ident = {"kind": "pipeline", "name": str(path), "run_id": state.get("run_id", ""), "sha256": state_digest(state["backbone"])}
    return FeatureModel(
        model.backbone,
        torch.tensor(norm["mean"]).view(1, 3, 1, 1),
        torch.tensor(norm["std"]).view(1, 3, 1, 1),
        ident,
        image_size=cfg.get("image_size"),
        head=model.head,
    )


@torch.no_grad()
def _class_sums(fm: FeatureModel, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                device: str) -> torch.Tensor:
    """Per-class sums of penultimate features over uint8 ``(B, 3, S, S)`` batches on ``device``."""
    net = fm.backbone.to(device).eval()
    mean, std = fm.mean.to(device), fm.std.to(device)
    sums: torch.Tensor | None = None
    for x, y in batches:
        f = net((x.float() - mean) / std).double().cpu()
        if sums is None:
            sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
        sums.index_add_(0, y.cpu(), f)
    if sums is None:
        raise ValueError("no images to extract features from")
    return sums


def _means(sums: torch.Tensor, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.int64)
    return sums.numpy() / np.maximum(counts, 1)[:, None], counts


def class_mean_features(
    fm: FeatureModel, images: np.ndarray, labels: np.ndarray, num_classes: int, batch: int = 512, device: str = "cpu",
    preprocess: Preprocess = Preprocess(),
) -> tuple[np.ndarray, np.ndarray]:
    """Mean penultimate feature and image count per class, of images in memory.

    Parameters
    ----------
    images : uint8 (N, H, W, 3); labels : (N,) in 0..C-1.
    preprocess : resize and crop (a pipeline network with ``image_size`` None sees the images as they are).

    Returns
    -------
    means : (C, D) float64 (rows of classes without images are 0); counts : (C,) int64.
    """
    batches = _array_batches(images, labels, batch, device, preprocess.size_for(fm, files=False), preprocess)
    return _means(_class_sums(fm, batches, num_classes, device), labels, num_classes)


def _array_batches(images: np.ndarray, labels: np.ndarray, batch: int, device: str, size: int | None,
                   preprocess: Preprocess) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 ``(B, 3, S, S)`` batches of in-memory images on ``device`` (resized and cropped
    to ``size`` when one is given) with their labels."""
    y = torch.from_numpy(labels.astype(np.int64))
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device).permute(0, 3, 1, 2)
        if size:
            x = eval_transform(x, size, preprocess.crop_fraction, preprocess.crop)
        yield x, y[i : i + batch]


def file_class_mean_features(
    fm: FeatureModel, files, labels: np.ndarray, num_classes: int, batch: int = 64, device: str = "cpu",
    preprocess: Preprocess = Preprocess(), workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_mean_features` of image files (a file manifest's
    :class:`finetail.loader.ImageFiles`), decoded and cropped by :func:`finetail.loader.eval_batches`.
    ``workers``: loader processes (None: :func:`finetail.loader.default_workers`)."""
    from .loader import default_workers, eval_batches

    size = preprocess.size_for(fm, files=True)
    batches = eval_batches(files, labels, size=size, batch_size=batch, device=torch.device(device),
                           workers=default_workers() if workers is None else workers,
                           crop_fraction=preprocess.crop_fraction, crop=preprocess.crop)
    return _means(_class_sums(fm, batches, num_classes, device), labels, num_classes)


@dataclass
class SplitImages:
    """One split of a manifest as uint8 ``(B, 3, S, S)`` batches for a feature model."""

    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    labels: np.ndarray
    class_names: list[str]
    files: bool  # image files (decoded by finetail.loader) rather than an array store
    size: int | None  # the input side (None: arrays as stored)


def split_images(fm: FeatureModel, manifest: str | Path, split: str, device: str = "cpu",
                 preprocess: Preprocess = Preprocess(), workers: int | None = None,
                 batch: int | None = None) -> SplitImages:
    """The images of one split of ``manifest`` (an array store, in memory; or image files,
    decoded and cropped by :func:`finetail.loader.eval_batches`: the large-image path) as the
    feature model ``fm`` takes them."""
    from .manifest import load_array_split, read_manifest

    files = "store" not in read_manifest(manifest).columns
    size = preprocess.size_for(fm, files)
    if files:
        from .loader import default_workers, eval_batches, load_file_split

        fsplit = load_file_split(manifest, split)
        batches = eval_batches(fsplit.images, fsplit.labels, size=size, batch_size=batch or 64,
                               device=torch.device(device), workers=default_workers() if workers is None else workers,
                               crop_fraction=preprocess.crop_fraction, crop=preprocess.crop)
        return SplitImages(batches, fsplit.labels, list(fsplit.class_names), True, size)
    data = load_array_split(manifest, split)
    batches = _array_batches(data.images, data.labels, batch or 512, device, size, preprocess)
    return SplitImages(batches, data.labels, list(data.class_names), False, size)


def write_class_features(model: str, weights: str | None, model_name: str, manifest: str | Path, split: str,
                         out: str | Path, threads: int = 1, device: str = "cpu",
                         preprocess: Preprocess = Preprocess(), workers: int | None = None) -> str:
    """``finetail features``: the per-class mean penultimate features of one split of a
    manifest (an array store or image files) under a feature model (a pipeline ``model.pt``
    or ``tv:<name>``), saved with the model's identity, the preprocessing and the manifest's
    sha256. Returns a log line."""
    from .fileio import file_sha256
    from .similarity import ClassStats, save_class_stats

    torch.set_num_threads(threads)
    fm = load_feature_model(model, weights)
    part = split_images(fm, manifest, split, device, preprocess, workers)
    labels, class_names, files, size = part.labels, part.class_names, part.files, part.size
    means, counts = _means(_class_sums(fm, part.batches, len(class_names), device), labels, len(class_names))
    keep = counts > 0
    stats = ClassStats(means[keep], counts[keep], [n for n, k in zip(class_names, keep, strict=True) if k])
    ident = fm.identity
    save_class_stats(
        out, stats, model=model_name, model_kind=ident["kind"], model_run_id=ident.get("run_id", ""),
        model_weights=ident.get("weights", ""), model_sha256=ident["sha256"],
        input_size=size or "as stored", crop=preprocess.crop if size else "none",
        crop_fraction=preprocess.crop_fraction if size else 1.0,
        manifest=str(manifest), manifest_sha256=file_sha256(manifest), split=split,
    )
    how = f"{size} px, {preprocess.crop} crop {preprocess.crop_fraction:g}" if size else "images as stored"
    return (f"features of {manifest} ({split}, {'files' if files else 'array store'}, {how}): "
            f"{stats.means.shape[0]} classes x {stats.means.shape[1]} dims -> {out}")
