"""Per-class mean features of a network's penultimate layer (the input of domain similarity).

The feature model is either one the pipeline pretrained (a ``model.pt`` written by
``finetail train --save-model``) or a torchvision network with its pretrained-weights enum
(``tv:resnet101`` + ``IMAGENET1K_V2``; needs the internet on first use). Its identity (tracking
run id or weights name, plus a sha256 digest of its weights) travels with the features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model

__all__ = ["FeatureModel", "class_mean_features", "load_feature_model", "state_digest", "write_class_features"]


@dataclass
class FeatureModel:
    backbone: torch.nn.Module
    mean: torch.Tensor  # (1, 3, 1, 1), pixel units 0..255
    std: torch.Tensor
    identity: dict  # {"kind", "name", "run_id" or "weights", "sha256"}
    resize: int | None = None  # torchvision models: resize the short side to this many pixels


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
        return FeatureModel(model.backbone, mean, std, ident, resize=224)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"feature model {path} does not exist: run the pretrain job that writes it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = json.loads(state["cfg"])["recipe"]
    norm = json.loads(state["normalisation"])
    num = state["model"]["head.weight"].shape[0]
    # The shortcut changes the forward pass (init does not: the weights are loaded).
    model: Classifier = build_model(cfg.get("model", "resnet32"), num, cfg.get("width", 16),
                                    shortcut=cfg.get("shortcut", "subsample"))
    model.load_state_dict(state["model"])
    ident = {"kind": "pipeline", "name": str(path), "run_id": state.get("run_id", ""), "sha256": state_digest(state["backbone"])}
    return FeatureModel(
        model.backbone,
        torch.tensor(norm["mean"]).view(1, 3, 1, 1),
        torch.tensor(norm["std"]).view(1, 3, 1, 1),
        ident,
    )


@torch.no_grad()
def class_mean_features(
    fm: FeatureModel, images: np.ndarray, labels: np.ndarray, num_classes: int, batch: int = 512, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean penultimate feature and image count per class.

    Parameters
    ----------
    images : uint8 (N, H, W, 3); labels : (N,) in 0..C-1.

    Returns
    -------
    means : (C, D) float64 (rows of classes without images are 0); counts : (C,) int64.
    """
    net = fm.backbone.to(device).eval()
    mean, std = fm.mean.to(device), fm.std.to(device)
    sums: torch.Tensor | None = None
    y = torch.from_numpy(labels.astype(np.int64))
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device).permute(0, 3, 1, 2).float()
        if fm.resize:
            x = torch.nn.functional.interpolate(x, size=fm.resize, mode="bilinear", antialias=True, align_corners=False)
        f = net((x - mean) / std).double().cpu()
        if sums is None:
            sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
        sums.index_add_(0, y[i : i + batch], f)
    counts = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.int64)
    if sums is None:
        raise ValueError("no images to extract features from")
    means = sums.numpy() / np.maximum(counts, 1)[:, None]
    return means, counts


def write_class_features(model: str, weights: str | None, model_name: str, manifest: str | Path, split: str,
                         out: str | Path, threads: int = 1, device: str = "cpu") -> str:
    """``finetail features``: the per-class mean penultimate features of one split of a
    manifest under a feature model (a pipeline ``model.pt`` or ``tv:<name>``), saved with the
    model's identity and the manifest's sha256. Returns a log line."""
    from .fileio import file_sha256
    from .manifest import load_array_split
    from .similarity import ClassStats, save_class_stats

    torch.set_num_threads(threads)
    fm = load_feature_model(model, weights)
    data = load_array_split(manifest, split)
    means, counts = class_mean_features(fm, data.images, data.labels, len(data.class_names), device=device)
    keep = counts > 0
    stats = ClassStats(means[keep], counts[keep], [n for n, k in zip(data.class_names, keep, strict=True) if k])
    ident = fm.identity
    save_class_stats(
        out, stats, model=model_name, model_kind=ident["kind"], model_run_id=ident.get("run_id", ""),
        model_weights=ident.get("weights", ""), model_sha256=ident["sha256"],
        manifest=str(manifest), manifest_sha256=file_sha256(manifest), split=split,
    )
    return f"features of {manifest} ({split}): {stats.means.shape[0]} classes x {stats.means.shape[1]} dims -> {out}"
