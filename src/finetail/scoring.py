"""Transferability scores of a source's pretrained networks on one target (rule ``transferability``).

For one (source, target) pair and each of the source's pretrained networks (one per
pretraining seed), the target's *training* images go through the network once: its
penultimate features (for LogME, H-score and k-NN) and its head's softmax over the source's
own classes (for LEEP, and the argmax for NCE). The scores (:mod:`finetail.transferability`)
then see nothing else: no fine-tuning, no target test image. Each score is timed on its own;
the forward pass is timed apart (``extract_s``).

Output: ``scores.csv``, one row per source network: the pair, the seed, the network's
identity (its MLflow run id and weights digest), the target manifest's sha256, the sizes
(images, classes, feature dimension, source classes), ``n_le_d`` (True where the images are
no more than the feature dimensions: the plain H-score is then C - 1 for every network, use
``regularized_hscore``), each score and its seconds. A score
that comes out NaN or infinite fails the job, naming the pair and the score.

Score plugins (``spec["plugins"]``: name -> an entry point of ``finetail.scores`` or
``module:callable``, :mod:`finetail.plugins`) are loaded and checked before any image is read,
then called on the same features and labels (and the softmax, when they declare ``probs``),
timed like the built-in scores. Their columns are ``<name>``, ``<name>_s`` and
``<name>_plugin`` (the plugin's ref, distribution and version if installed, and code digest). A plugin that
raises, or returns anything but a finite number, fails the job in one line naming it, and no
``scores.csv`` is written.

Images reach the network as its own fine-tuning test images do (:func:`finetail.features.split_images`:
an array store as stored, image files decoded and centre-cropped at the recipe's size by
:mod:`finetail.loader`, the large-image path), on the GPU where there is one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import NonFiniteError
from .features import FeatureModel, Preprocess, load_feature_model, split_images
from .fileio import atomic_write, file_sha256
from .transferability import SCORES, all_scores

__all__ = ["load_score_plugins", "model_outputs", "pair_scores", "plugin_scores", "write_scores"]


@torch.no_grad()
def model_outputs(fm: FeatureModel, batches, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features ``(N, D)`` and the head's softmax ``(N, C_source)`` (float64) of a
    pipeline network over uint8 batches."""
    if fm.head is None:
        raise ValueError(f"{fm.identity.get('name')}: no classifier head (a torchvision backbone); "
                         "LEEP and NCE need the source network's own classes")
    net, head = fm.backbone.to(device).eval(), fm.head.to(device).eval()
    mean, std = fm.mean.to(device), fm.std.to(device)
    feats, probs = [], []
    for x, _ in batches:
        f = net((x.float() - mean) / std).float()
        feats.append(f.double().cpu())
        probs.append(torch.softmax(head(f).double(), dim=1).cpu())
    if not feats:
        raise ValueError("no images to score")
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def pair_scores(features: np.ndarray, probs: np.ndarray, labels: np.ndarray, scores: list[str],
                knn_k: int) -> dict[str, tuple[float, float]]:
    """Each score in ``scores`` of one (source network, target) pair: name -> (value, seconds).
    k-NN's ``k`` is capped at N - 1 (a target with few training images)."""
    return all_scores(features, probs, labels, k=min(knn_k, len(labels) - 1), names=scores)


def load_score_plugins(plugins: dict[str, str]) -> dict[str, tuple]:
    """name -> (plugin, declared keywords) of each score plugin, imported and checked against
    the score contract (:func:`finetail.plugins.check_signature`)."""
    from .plugins import PluginError, check_signature, load

    out = {}
    for name, ref in plugins.items():
        if name in SCORES or name == "emd":
            raise PluginError(f"score plugin {name!r}: the name is a built-in score's; rename it")
        plugin = load("score", ref)
        out[name] = (plugin, check_signature(plugin))
    return out


def plugin_scores(loaded: dict[str, tuple], features: np.ndarray, probs: np.ndarray,
                  labels: np.ndarray) -> dict[str, tuple[float, float]]:
    """Each loaded score plugin's value and seconds: ``fn(features, labels)`` (with
    ``probs=`` when it declares it), on float64 features and probabilities and int64 labels
    (copies: a plugin cannot change what the next one sees). One line naming the plugin
    (:class:`~finetail.plugins.PluginError`) when it raises or returns no finite number."""
    from .plugins import PluginError

    out = {}
    for name, (plugin, declared) in loaded.items():
        kwargs = {"probs": np.array(probs, dtype=np.float64)} if declared.get("probs") else {}
        t0 = time.perf_counter()
        try:
            value = plugin.fn(np.array(features, dtype=np.float64), np.array(labels, dtype=np.int64), **kwargs)
        except Exception as e:  # the plugin's own error, reported in one line
            raise PluginError(f"score plugin {name!r} ({plugin.ref}) raised {type(e).__name__}: {e}; "
                              "no scores.csv is written") from None
        secs = time.perf_counter() - t0
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise PluginError(f"score plugin {name!r} ({plugin.ref}) returned a {type(value).__name__}, not a number; "
                              "no scores.csv is written") from None
        if not math.isfinite(value):
            raise PluginError(f"score plugin {name!r} ({plugin.ref}) returned {value}; no scores.csv is written")
        out[name] = (value, secs)
    return out


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def write_scores(models: list[str], seeds: list[int], manifest: str | Path, out: str | Path, spec: dict,
                 threads: int = 1, device: str = "cpu", workers: int | None = None) -> str:
    """``finetail transferability``: ``scores.csv`` of one source (its networks ``models``, one
    per pretraining seed in ``seeds``) on one target's training split (``manifest``); ``spec``:
    source, target, scores, knn_k. Returns a log line."""
    if len(models) != len(seeds):
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds: give one seed per model")
    torch.set_num_threads(threads)
    dev = _device(device)
    scores = list(spec.get("scores", SCORES))
    knn_k = int(spec.get("knn_k", 10))
    plugins = load_score_plugins(spec.get("plugins") or {})  # before any image is read
    manifest_sha = file_sha256(manifest)
    rows = []
    for path, seed in zip(models, seeds, strict=True):
        fm = load_feature_model(str(path))
        t0 = time.perf_counter()
        part = split_images(fm, manifest, "train", dev, Preprocess(), workers)
        feats, probs = model_outputs(fm, part.batches, dev)
        extract_s = time.perf_counter() - t0
        row = {
            "source": spec.get("source", ""), "target": spec.get("target", ""), "seed": int(seed),
            "model_run_id": fm.identity.get("run_id", ""), "model_sha256": fm.identity["sha256"],
            "manifest_sha256": manifest_sha, "n_images": len(part.labels),
            "n_classes": len(np.unique(part.labels)), "feature_dim": feats.shape[1],
            "source_classes": probs.shape[1], "knn_k": knn_k, "device": dev, "extract_s": extract_s,
            # N <= D: the sample covariance is singular and the plain H-score is C - 1 for any network
            "n_le_d": bool(len(part.labels) <= feats.shape[1]),
        }
        for name, (value, secs) in pair_scores(feats, probs, part.labels, scores, knn_k).items():
            if not math.isfinite(value):
                raise NonFiniteError(f"{name} of {spec.get('source')} (seed {seed}) on {spec.get('target')} "
                                     f"is {value}: not written")
            row[name], row[f"{name}_s"] = value, secs
        for name, (value, secs) in plugin_scores(plugins, feats, probs, part.labels).items():
            row[name], row[f"{name}_s"], row[f"{name}_plugin"] = value, secs, plugins[name][0].label()
        rows.append(row)
    df = pd.DataFrame(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: df.to_csv(tmp, index=False, float_format="%.10g"))
    means = ", ".join(f"{n} {df[n].mean():.4g}" for n in [*scores, *plugins])
    return (f"scored {spec.get('source')} -> {spec.get('target')}: {len(rows)} network(s), {rows[0]['n_images']} "
            f"images, {rows[0]['feature_dim']}-d features, {rows[0]['source_classes']} source classes on {dev}; "
            f"seed means: {means} -> {out}")
