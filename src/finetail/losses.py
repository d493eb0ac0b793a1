"""Class-balanced losses based on the effective number of samples (Cui et al., CVPR 2019).

The effective number of ``n`` samples with ``beta`` in ``[0, 1)`` is

    E_n = (1 - beta**n) / (1 - beta)

and the class-balanced weight of class ``c`` is ``w_c = 1 / E_{n_c}``, normalised so that
``sum(w) = C``. ``n_c`` is the whole training set's count of class ``c`` (never a batch's).
``beta = 0`` gives ``E_n = 1`` for every class, i.e. the unweighted loss.

Reductions follow the reference implementation:

- softmax: ``mean_i w[y_i] * CE_i`` (divided by the batch size, not by the sum of weights);
- sigmoid: one-hot targets, ``sum_{i,j} w[y_i] * BCE(z_ij, y_ij) / batch_size``;
- focal: ``FL = modulator * BCE`` with
  ``modulator = exp(-gamma * y * z - gamma * log1p(exp(-z)))`` (equal to ``(1 - p_t)**gamma``
  and stable for ``gamma < 1``), reduced like sigmoid.

Sigmoid and focal heads start with the bias ``-log(C - 1)`` (prior ``pi = 1/C``), and that
bias takes no weight decay: see :func:`head_bias_prior`, :func:`finetail.models.init_head_bias`
and :func:`finetail.models.param_groups`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .training.recipe import LOSS_TYPES

__all__ = [
    "LOSS_TYPES",
    "ClassBalancedLoss",
    "class_balanced_weights",
    "effective_number",
    "head_bias_prior",
]

def _as_counts(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if c.numel() == 0:
        raise ValueError("counts is empty: need one training-set count per class")
    if torch.any(c < 0) or not torch.all(torch.isfinite(c)):
        raise ValueError(f"counts must be finite and non-negative, got {c.tolist()}")
    return c


def effective_number(counts: Sequence[int] | torch.Tensor, beta: float) -> torch.Tensor:
    """Effective number of samples per class, ``E_n = (1 - beta**n) / (1 - beta)``.

    Parameters
    ----------
    counts : (C,) training images per class.
    beta : float in [0, 1).

    Returns
    -------
    (C,) float64 tensor. ``beta = 0`` gives 1 for every class with n >= 1.

    Examples
    --------
    >>> effective_number([1, 2], 0.5).tolist()
    [1.0, 1.5]
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = _as_counts(counts)
    if beta == 0.0:
        return torch.where(n > 0, torch.ones_like(n), torch.zeros_like(n))
    # -expm1(n*log(beta)) = 1 - beta**n, accurate for beta close to 1.
    return -torch.expm1(n * math.log(beta)) / (1.0 - beta)


def class_balanced_weights(counts: Sequence[int] | torch.Tensor, beta: float) -> torch.Tensor:
    """Per-class weights ``w_c = 1 / E_{n_c}``, normalised to ``sum(w) = C``.

    Parameters
    ----------
    counts : (C,) whole training set's images per class (each >= 1).
    beta : float in [0, 1); 0 gives all-ones weights.

    Returns
    -------
    (C,) float32 tensor.

    Examples
    --------
    >>> class_balanced_weights([1, 3], 0.0).tolist()
    [1.0, 1.0]
    """
    n = _as_counts(counts)
    if torch.any(n < 1):
        empty = torch.nonzero(n < 1).flatten().tolist()
        raise ValueError(f"every class needs at least one training image; classes {empty} have none")
    w = 1.0 / effective_number(n, beta)
    w = w / w.sum() * n.numel()
    return w.to(torch.float32)


def head_bias_prior(num_classes: int) -> float:
    """The initial bias ``-log(C - 1)`` of sigmoid/focal heads (prior ``pi = 1/C``)."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    return -math.log(num_classes - 1)


class ClassBalancedLoss(nn.Module):
    """Class-balanced softmax, sigmoid or focal loss.

    Parameters
    ----------
    counts : (C,) training-set images per class.
    loss_type : "softmax", "sigmoid" or "focal".
    beta : float in [0, 1); 0 is the unweighted loss.
    gamma : focal exponent (focal only; 0 makes focal equal sigmoid).

    ``forward(logits (B, C), targets (B,) int) -> scalar``.

    Examples
    --------
    >>> loss = ClassBalancedLoss([10, 1], "softmax", beta=0.0)
    >>> float(loss(torch.zeros(1, 2), torch.tensor([0])))  # log 2
    0.6931471824645996
    """

    weights: torch.Tensor

    def __init__(
        self,
        counts: Sequence[int] | torch.Tensor,
        loss_type: str = "softmax",
        beta: float = 0.0,
        gamma: float = 0.0,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if loss_type != "focal" and gamma != 0.0:
            raise ValueError(f"gamma={gamma} only applies to the focal loss, not {loss_type!r}")
        self.loss_type = loss_type
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.register_buffer("weights", class_balanced_weights(counts, self.beta))

    @property
    def num_classes(self) -> int:
        return int(self.weights.numel())

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, gamma={self.gamma}, classes={self.num_classes}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        logits = logits.float()
        w = self.weights[targets]  # (B,)
        batch = logits.shape[0]
        if self.loss_type == "softmax":
            ce = F.cross_entropy(logits, targets, reduction="none")
            return (w * ce).sum() / batch
        y = F.one_hot(targets, self.num_classes).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        if self.loss_type == "focal" and self.gamma > 0:
            # (1 - p_t)^gamma written in log space: exp(-g*y*z - g*log(1 + exp(-z))).
            modulator = torch.exp(-self.gamma * y * logits - self.gamma * F.softplus(-logits))
            bce = modulator * bce
        return (w[:, None] * bce).sum() / batch
