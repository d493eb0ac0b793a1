"""Post-hoc long-tail corrections of a trained model: no retraining of the backbone.

- **Logit adjustment** (Menon et al., ICLR 2021), :func:`logit_adjust`: predict with
  ``z - tau * log pi``, ``pi`` the training set's class prior; ``tau = 1`` is the
  balanced-error Bayes rule for a calibrated softmax model.
- **tau-normalisation** (Kang et al., ICLR 2020), :func:`tau_normalize`: rescale each class's
  weight row ``W_j / ||W_j||**tau`` and drop the bias; ``tau = 1`` gives every class a
  unit-norm classifier, ``tau = 0`` keeps the weights (without the bias).
- **cRT** (classifier re-training, Kang et al.): a new head trained on the frozen backbone with
  class-balanced sampling. It needs training, so it is a ``finetail train`` job, not a post-hoc
  one: ``linear_probe: true`` (frozen backbone, BatchNorm in eval mode, a new head) with
  ``sampler: class_balanced``, started from the cell's ``model.pt`` (``--init-model``);
  :func:`crt_spec` writes its spec from the cell's.

``tau`` is given, or chosen (:func:`choose_tau`) from a grid by balanced accuracy on the
cell's held-out slice of its training images: the recipe's ``holdout``
(:func:`finetail.training.sampling.holdout_mask`), which the cell was trained without.
Never on the test split. Both methods apply to softmax models (every loss of
:data:`~finetail.training.recipe.SOFTMAX_LOSSES`); for LDAM the adjusted logits are the
scaled cosines ``scale * z`` the loss's softmax sees (:func:`finetail.training.loop.eval_logits`).

A researcher's own correction is a plugin (:mod:`finetail.plugins`, method ``plugin``):
``callable(logits, counts, **params)`` on the cell's test logits, applied by
:func:`plugin_correction`, which checks what it returns.

``finetail posthoc`` (:mod:`finetail.posthoc_job`) applies one method to one trained cell
and records it as a run of its own, a child of the cell's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import UserError
from .losses import log_prior
from .metrics import classification_metrics
from .training.recipe import POSTHOC_METHODS, SOFTMAX_LOSSES, TrainConfig, channels_last, crt_spec, precision

__all__ = [
    "METHODS",
    "TauChoice",
    "adjusted_logits",
    "choose_tau",
    "crt_spec",
    "extract_features",
    "logit_adjust",
    "plugin_correction",
    "tau_normalize",
]

METHODS = POSTHOC_METHODS


def logit_adjust(logits: torch.Tensor, counts: Sequence[int] | torch.Tensor | np.ndarray, tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment ``z - tau * log pi``, ``pi = counts / sum(counts)``.

    Parameters
    ----------
    logits : (N, C) the model's test-time logits.
    counts : (C,) training images per class, each >= 1.
    tau : the prior's weight; 0 leaves the logits as they are.

    Returns
    -------
    (N, C) tensor of ``logits``' dtype (the shift is computed in float64).

    Examples
    --------
    >>> logit_adjust(torch.zeros(1, 2), [3, 1], 1.0).tolist()  # -log(3/4), -log(1/4)
    [[0.28768208622932434, 1.3862943649291992]]
    """
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    shift = (tau * log_prior(counts)).to(device=logits.device)
    if logits.ndim != 2 or logits.shape[1] != len(shift):
        raise ValueError(f"logits must be (N, {len(shift)}), got {tuple(logits.shape)}")
    return (logits.double() - shift).to(logits.dtype)


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Kang et al.'s tau-normalised classifier ``W_j / ||W_j||**tau``, row by row (no bias).

    Parameters
    ----------
    weight : (C, D) a linear head's weights, one row per class.
    tau : the norm's exponent; 0 returns the weights, 1 unit-norm rows. A row of zeros stays zero.

    Examples
    --------
    >>> tau_normalize(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), 1.0).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 1.0]]
    """
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be (C, D), got {tuple(weight.shape)}")
    w = weight.detach().double()
    norm = w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (w / norm**tau).to(weight.dtype)


@dataclass
class TauChoice:
    """A post-hoc method's tau and how it was chosen."""

    tau: float
    source: str  # "given", or "holdout": the best balanced accuracy on the held-out training images
    grid: list[float] = field(default_factory=list)  # the taus tried ("holdout")
    balanced_acc: list[float] = field(default_factory=list)  # their balanced accuracy on the held-out images
    holdout_images: int | None = None  # held-out training images scored
    holdout_classes: int | None = None  # classes among them

    def to_json(self) -> dict:
        return asdict(self)


def choose_tau(logits_at: Callable[[float], torch.Tensor], labels: np.ndarray, counts: np.ndarray,
               grid: Sequence[float]) -> TauChoice:
    """The tau of ``grid`` whose predictions have the best balanced accuracy on held-out images.

    Parameters
    ----------
    logits_at : tau -> (N, C) adjusted logits of the held-out images.
    labels : (N,) their labels.
    counts : (C,) training images per class (only C matters here).
    grid : taus to try; ties go to the first in grid order (with an increasing grid, the
        smallest adjustment).

    Returns
    -------
    TauChoice with ``source="holdout"``.
    """
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise UserError("no held-out training images to choose tau on")
    if len(grid) == 0:
        raise UserError("the tau grid is empty")
    scores = []
    for tau in grid:
        pred = logits_at(float(tau)).argmax(1).cpu().numpy()
        scores.append(classification_metrics(pred, labels, counts)["balanced_acc"])
    best = int(np.argmax(scores))  # the first of equal maxima
    return TauChoice(float(grid[best]), "holdout", [float(t) for t in grid], [float(s) for s in scores],
                     len(labels), len(np.unique(labels)))


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, batches, mean: torch.Tensor, std: torch.Tensor, cfg: TrainConfig,
                     device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """Penultimate features ``(N, D)`` float32 on ``device`` and labels ``(N,)`` of uint8
    batches (e.g. :func:`finetail.training.batches.plain_batches`), computed as the engine's
    evaluation does (normalised in float32, bf16 autocast when the recipe trains in it)."""
    backbone.eval()
    feats, labels = [], []
    bf16 = precision(cfg, device.type) == "bf16"
    for x, y in batches:
        xb = (x.float() - mean) / std
        if channels_last(cfg, device.type):
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats.append(backbone(xb).float())
        labels.append(y.cpu().numpy())
    if not feats:
        raise UserError("no images to compute features of")
    return torch.cat(feats), np.concatenate(labels)


def adjusted_logits(model, feats: torch.Tensor, method: str, tau: float, counts: np.ndarray,
                    cfg: TrainConfig) -> torch.Tensor:
    """The test-time logits of ``model``'s head on ``feats`` under a post-hoc ``method``.

    ``tau_norm``: ``feats @ tau_normalize(W, tau).T`` (a linear head's weights, no bias);
    ``logit_adjust``: :func:`logit_adjust` of the model's own test logits
    (:func:`finetail.training.loop.eval_logits`) with the training ``counts``.
    """
    from .training.loop import eval_logits

    check_method(method, cfg)
    with torch.no_grad():
        if method == "tau_norm":
            return feats @ tau_normalize(model.head.weight.float(), tau).t()
        return logit_adjust(eval_logits(model.head(feats).float(), cfg), counts, tau)


def plugin_correction(plugin, declared: dict[str, bool], logits: torch.Tensor, counts: np.ndarray, params: dict,
                      extras: dict) -> torch.Tensor:
    """A post-hoc plugin's corrected logits: ``plugin.fn(logits, counts, **params, **extras)``
    with ``counts`` a ``(C,)`` int64 tensor on the logits' device and, of ``extras``
    (``features``, ``weight``, ``bias``, ``holdout``: see :mod:`finetail.plugins`), those
    the plugin declares (``declared``, from :func:`finetail.plugins.check_signature`).

    Raises :class:`~finetail.plugins.PluginError` in one line when the plugin raises, or
    returns anything but a finite ``(N, C)`` tensor (a float array is taken as one).
    """
    from .plugins import PluginError

    n = torch.as_tensor(np.asarray(counts), dtype=torch.int64, device=logits.device)
    given = {k: v for k, v in extras.items() if declared.get(k)}
    try:
        out = plugin.fn(logits.clone(), n, **params, **given)
    except Exception as e:  # the plugin's own bug, reported in one line
        raise PluginError(f"post-hoc plugin {plugin.ref!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor):
        try:
            out = torch.as_tensor(np.asarray(out, dtype=np.float64))
        except (TypeError, ValueError):
            raise PluginError(f"post-hoc plugin {plugin.ref!r} returned a {type(out).__name__}; it returns the "
                              f"corrected logits, a ({logits.shape[0]}, {logits.shape[1]}) tensor") from None
    if tuple(out.shape) != tuple(logits.shape):
        raise PluginError(f"post-hoc plugin {plugin.ref!r} returned shape {tuple(out.shape)}; the corrected logits "
                          f"are {tuple(logits.shape)}, one row per test image")
    out = out.to(device=logits.device, dtype=torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise PluginError(f"post-hoc plugin {plugin.ref!r} returned NaN or infinite logits; nothing is written")
    return out


def check_method(method: str, cfg: TrainConfig) -> None:
    """Raise :class:`~finetail.errors.UserError` unless ``method`` applies to a model trained
    with ``cfg``: both methods assume a softmax model; tau-normalisation a linear head (a
    cosine head normalises its rows itself, so tau would change nothing)."""
    if method not in (*METHODS, "plugin"):
        raise UserError(f"post-hoc method must be one of {(*METHODS, 'plugin')}, got {method!r}")
    if cfg.loss not in SOFTMAX_LOSSES:
        raise UserError(f"post-hoc {method} assumes a softmax model; this cell trained with the {cfg.loss} loss "
                        f"(one sigmoid per class)")
    if method == "tau_norm" and cfg.head != "linear":
        raise UserError(f"tau_norm rescales a linear head's rows; the {cfg.loss} cell's {cfg.head} head "
                        "normalises them itself, so every tau gives the same model (use logit_adjust)")


