"""How an epoch's training images are drawn: the recipe's ``sampler``.

- ``instance``: a random permutation of the training set, each image once (the default).
- ``sqrt``: class ``j`` with probability ``p_j = sqrt(n_j) / sum_k sqrt(n_k)``, then an image
  of it uniformly (Mahajan et al. 2018's square-root sampling, as Kang et al., ICLR 2020).
- ``class_balanced``: every class with training images equally likely, ``p_j = 1 / C'``,
  then an image of it uniformly (Kang et al.'s class-balanced sampling, cRT's).

An epoch has as many images as the training set, ``N``. The two resampling schemes draw it
**stratified**: class ``j`` gets exactly ``q_j`` images, ``N * p_j`` rounded by largest
remainder (:func:`class_quotas`; so ``|q_j - N p_j| < 1`` and ``sum q = N``), and its ``q_j``
draws cycle through a random permutation of its ``n_j`` images (each image appears
``floor(q_j / n_j)`` or ``ceil(q_j / n_j)`` times; every draw is uniform within the class);
the ``N`` draws are then shuffled. The class frequencies of an epoch are thus exact, not a
multinomial sample around ``N p`` (no variance to average away over epochs).

Every draw comes from the epoch's generator, seeded by ``(seed, epoch)``, so an epoch's
order is a pure function of the seed and the epoch: a resumed job and every rank of a DDP
job draw the same one.

The recipe's ``holdout`` keeps a class-stratified slice of the training images out of
training (:func:`holdout_mask`), for choosing a post-hoc ``tau`` on images the model has
not seen (:mod:`finetail.posthoc`).
"""

from __future__ import annotations

import numpy as np
import torch

from .recipe import SAMPLERS

__all__ = ["class_probabilities", "class_quotas", "epoch_order", "holdout_mask"]


def class_probabilities(counts: np.ndarray, sampler: str) -> np.ndarray:
    """``p_j``, the probability that a draw of ``sampler`` is of class ``j`` (float64 ``(C,)``;
    classes without training images get 0).

    >>> class_probabilities(np.array([9, 1, 0]), "sqrt").tolist()
    [0.75, 0.25, 0.0]
    >>> class_probabilities(np.array([9, 1, 0]), "class_balanced").tolist()
    [0.5, 0.5, 0.0]
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    n = np.asarray(counts, dtype=np.float64)
    if n.sum() <= 0:
        raise ValueError("no training images to sample from")
    w = {"instance": n, "sqrt": np.sqrt(n), "class_balanced": (n > 0).astype(np.float64)}[sampler]
    return w / w.sum()


def class_quotas(counts: np.ndarray, sampler: str) -> np.ndarray:
    """Images of each class in one epoch of ``sampler``: ``N p_j`` rounded by largest
    remainder (ties to the lower class index), int64 ``(C,)`` summing to ``N = sum(counts)``.

    >>> class_quotas(np.array([9, 1, 0]), "sqrt").tolist()  # 10 * [0.75, 0.25, 0]
    [8, 2, 0]
    """
    n = np.asarray(counts, dtype=np.int64)
    total = int(n.sum())
    exact = total * class_probabilities(n, sampler)
    q = np.floor(exact).astype(np.int64)
    short = total - int(q.sum())
    order = np.argsort(-(exact - q), kind="stable")  # largest remainder first
    q[order[:short]] += 1
    return q


def epoch_order(labels: torch.Tensor, sampler: str, gen: torch.Generator,
                quotas: torch.Tensor | None = None) -> torch.Tensor:
    """The training-set indices of one epoch, in order: ``(N,)`` int64 on ``labels``' device.

    Parameters
    ----------
    labels : (N,) int64 training labels, on the generator's device.
    sampler : one of :data:`~finetail.training.recipe.SAMPLERS`.
    gen : the epoch's generator, just seeded. ``instance`` draws one permutation from it
        (``torch.randperm``, as the engine always has); the others draw one key per image
        (the within-class permutations), then the epoch's shuffle.
    quotas : (C,) :func:`class_quotas` on the device (computed here when None).
    """
    n = len(labels)
    dev = labels.device
    if sampler == "instance":
        return torch.randperm(n, generator=gen, device=dev)
    counts = torch.bincount(labels)
    if quotas is None:
        quotas = torch.as_tensor(class_quotas(counts.cpu().numpy(), sampler), device=dev)
    counts = torch.nn.functional.pad(counts, (0, len(quotas) - len(counts)))
    keys = torch.rand(n, generator=gen, device=dev)
    within = torch.argsort(keys)  # a random order of all images ...
    by_class = within[torch.argsort(labels[within], stable=True)]  # ... grouped by class, still random within
    start = torch.cumsum(counts, 0) - counts  # where each class begins in by_class
    cls = torch.repeat_interleave(torch.arange(len(quotas), device=dev), quotas)  # (N,) the class of each draw
    first_draw = torch.cumsum(quotas, 0) - quotas
    k = torch.arange(n, device=dev) - first_draw[cls]  # the draw's number within its class
    drawn = by_class[start[cls] + k % counts[cls].clamp_min(1)]
    return drawn[torch.randperm(n, generator=gen, device=dev)]


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which training images a recipe's ``holdout`` keeps out of training: bool ``(N,)``.

    Class ``j`` holds out ``k_j = min(n_j - 1, round(fraction * n_j))`` of its ``n_j`` images
    (halves round up), chosen by a per-class permutation from ``np.random.default_rng(seed)``
    (classes in label order): every class keeps at least one training image, and classes
    with fewer than ``1 / (2 fraction)`` images hold none out.

    >>> int(holdout_mask(np.array([0, 0, 0, 0, 1, 1, 2]), 0.5, seed=0).sum())  # 2 + 1 + 0
    3
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros(len(labels), dtype=bool)
    if fraction == 0.0 or len(labels) == 0:
        return out
    rng = np.random.default_rng(seed)
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx) - 1, int(np.floor(fraction * len(idx) + 0.5)))
        if k > 0:
            out[idx[rng.permutation(len(idx))[:k]]] = True
    return out
