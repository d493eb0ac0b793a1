"""The Gaussian Bhattacharyya coefficient (GBC; Pándy, Agostinelli, Uijlings, Ferrari and
Mensink, "Transferability Estimation using Bhattacharyya Class Separability", CVPR 2022).

The target images' features, reduced by PCA to ``dims`` dimensions, are modelled per class
as a Gaussian with diagonal covariance; the score is minus the summed Bhattacharyya
coefficient of every ordered pair of classes,

    GBC = -sum_{c != c'} exp(-D_B(c, c')),
    D_B = 1/8 (mu_c - mu_c')^T S^-1 (mu_c - mu_c') + 1/2 log(det S / sqrt(det S_c det S_c')),
    S = (S_c + S_c') / 2,

so it is at most 0, and higher (less overlap between classes) predicts better transfer.

A finetail score plugin: ``gbc(features, labels)``, features (N, D) float64, labels (N,) int64.
"""

from __future__ import annotations

import numpy as np


def gbc(features: np.ndarray, labels: np.ndarray, dims: int = 64) -> float:
    """GBC of features ``(N, D)`` and labels ``(N,)``; ``dims``: PCA dimensions kept.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1], 50)
    >>> far, near = rng.normal(size=(100, 4)) + 10 * y[:, None], rng.normal(size=(100, 4)) + 0.1 * y[:, None]
    >>> gbc(far, y) > gbc(near, y)
    True
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    x = x - x.mean(axis=0)
    d = max(1, min(dims, x.shape[1], x.shape[0] - 1))
    evals, evecs = np.linalg.eigh(x.T @ x)
    z = x @ evecs[:, np.argsort(evals)[::-1][:d]]
    classes = np.unique(y)
    mu = np.stack([z[y == c].mean(axis=0) for c in classes])
    var = np.stack([z[y == c].var(axis=0) for c in classes]) + 1e-8
    logdet = np.log(var).sum(axis=1)
    total = 0.0
    for i in range(len(classes)):
        s = (var[i] + var) / 2  # (C, d)
        db = 0.125 * ((mu[i] - mu) ** 2 / s).sum(axis=1) + 0.5 * (np.log(s).sum(axis=1) - 0.5 * (logdet[i] + logdet))
        total += np.exp(-db).sum() - 1.0  # leave out c' = c (D_B = 0)
    return float(-total)
