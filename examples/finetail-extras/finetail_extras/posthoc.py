"""Prediction-rate balancing: a post-hoc correction that shifts each class's logit by an
offset ``b_j`` so that, on the images the cell kept out of training, the mean predicted
probability of every class is ``1 / C``:

    b <- b - log(C * mean_i softmax(z_i + b))     (repeated until it settles)

It uses the held-out images' logits only, never their labels: a label-free cousin of
post-hoc logit adjustment (Menon et al., ICLR 2021), whose offset ``-tau log pi`` assumes a
calibrated model; this one measures the model's own bias towards the head classes.

A finetail post-hoc plugin: called as ``balance_prediction_rate(logits, counts, holdout=...,
iters=...)``; it declares ``holdout``, so finetail passes the held-out training images (the
cells' recipe needs ``holdout`` > 0).
"""

from __future__ import annotations

import math

import torch


def balance_prediction_rate(logits: torch.Tensor, counts: torch.Tensor, *, holdout, iters: int = 100,
                            tol: float = 1e-6) -> torch.Tensor:
    """Test logits ``(N, C)`` plus offsets that balance the held-out prediction rates.

    Parameters
    ----------
    logits : (N, C) the cell's test logits.
    counts : (C,) training images per class (only C is used).
    holdout : finetail.plugins.Holdout; its ``logits`` (H, C) are those of held-out training images.
    iters : at most this many updates of the offsets.
    tol : stop when no offset moves by more than this.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> held = SimpleNamespace(logits=torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
    >>> out = balance_prediction_rate(torch.tensor([[2.0, 0.0]]), torch.tensor([9, 1]), holdout=held)
    >>> round(float(out[0, 0] - out[0, 1]), 4)  # both classes equally likely now
    0.0
    """
    z = holdout.logits.double()
    c = z.shape[1]
    b = torch.zeros(c, dtype=torch.float64, device=z.device)
    for _ in range(iters):
        step = torch.log(c * torch.softmax(z + b, dim=1).mean(0))
        b = b - step
        if float(step.abs().max()) < tol:
            break
    b = b - b.mean()  # offsets are defined up to a constant
    if not math.isfinite(float(b.abs().max())):
        raise ValueError("the offsets diverged: some class is never predicted on the held-out images")
    return (logits.double() + b.to(logits.device)).to(logits.dtype)
