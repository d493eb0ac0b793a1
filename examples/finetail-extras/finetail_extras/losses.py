"""The softmax equalization loss (Tan, Wang, Li, Li, Ouyang, Yin and Yan, "Equalization Loss
for Long-Tailed Object Recognition", CVPR 2020, section 3.3): a softmax cross-entropy in
which a rare class gets no discouraging gradient from the images of other classes.

    L = -log( exp(z_y) / sum_k w_k exp(z_k) ),   w_k = 1 - beta * T_lam(f_k) * (1 - y_k)

with ``f_k = n_k / sum(n)`` class k's share of the training images, ``T_lam(f) = 1`` for
``f < lam`` (a rare class), else 0, and ``beta`` drawn per image and class, 1 with
probability ``gamma`` (the paper's softmax variant keeps some negative gradients for rare
classes this way). The true class is never masked. Random draws come from torch's global
generator, which finetail's engine seeds, so a run is repeatable.

A finetail loss plugin: ``SoftmaxEqualizationLoss(counts, lam=..., gamma=...)`` is called with
the training counts and returns the module; its ``forward(logits, targets)`` is a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxEqualizationLoss(nn.Module):
    """Softmax equalization loss.

    Parameters
    ----------
    counts : (C,) int64 tensor, training images per class (each >= 1).
    lam : frequency threshold: classes with a share of the training images below it are rare.
    gamma : probability that a rare negative class is masked for an image (1: always).

    Examples
    --------
    >>> loss = SoftmaxEqualizationLoss(torch.tensor([90, 10]), lam=0.2, gamma=1.0)
    >>> round(float(loss(torch.zeros(1, 2), torch.tensor([0]))), 6)  # class 1 is masked: -log(1)
    0.0
    """

    rare: torch.Tensor

    def __init__(self, counts: torch.Tensor, lam: float = 0.05, gamma: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        freq = counts.double() / counts.sum()
        self.lam, self.gamma = float(lam), float(gamma)
        self.register_buffer("rare", freq < lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, gamma={self.gamma}, rare={int(self.rare.sum())}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        negative = torch.ones_like(logits, dtype=torch.bool).scatter_(1, targets[:, None], False)
        beta = torch.rand(logits.shape, device=logits.device) < self.gamma
        masked = negative & self.rare[None, :] & beta
        return F.cross_entropy(logits.masked_fill(masked, float("-inf")), targets)
