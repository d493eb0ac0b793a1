"""Long-tail losses: class-balanced (Cui et al., CVPR 2019), LDAM with deferred re-weighting
(Cao et al., NeurIPS 2019), balanced softmax (Ren et al., NeurIPS 2020) and the logit-adjusted
loss (Menon et al., ICLR 2021).

**Class-balanced losses** are based on the effective number of samples.

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

**The later methods** are softmax cross-entropies of shifted logits ``z`` (``n_j``: class
``j``'s training images, each >= 1, as the engine passes ``max(n_j, 1)``; ``y``: the label):

- LDAM (:class:`LDAMLoss`): ``CE(s * (z - m_y * onehot(y)), y)`` on a cosine head's logits,
  with margins ``m_j = C * n_j**(-1/4)``, ``C`` such that ``max_j m_j = max_margin``;
- balanced softmax (:class:`BalancedSoftmaxLoss`): ``CE(z + log n, y)``;
- logit-adjusted (:class:`LogitAdjustedLoss`): ``CE(z + tau * log pi, y)``, ``pi = n / sum(n)``.

The shifts are training-only: a model trained with them predicts with its plain logits ``z``
(LDAM: ``s * z``, the same argmax). Deferred re-weighting (DRW, Cao et al.) trains unweighted
until epoch ``drw_epoch``, then with the class-balanced weights above as PyTorch's weighted
mean ``sum_i w[y_i] CE_i / sum_i w[y_i]``: :func:`drw_weights` gives the weights of an epoch,
a function of the epoch alone, so a resumed job applies what an uninterrupted one does.
All of them compute in float32, whatever the logits' dtype.

**A researcher's own loss** is a plugin (:mod:`finetail.plugins`): :func:`build_plugin_loss`
calls it on the counts and wraps what it returns in :class:`PluginLoss`, which checks that
every call returns a scalar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .training.recipe import CB_LOSS_TYPES, DRW_BETA, LOSS_TYPES, TrainConfig

__all__ = [
    "LOSS_TYPES",
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "PluginLoss",
    "ReweightedCrossEntropy",
    "build_loss",
    "build_plugin_loss",
    "class_balanced_weights",
    "drw_weights",
    "effective_number",
    "head_bias_prior",
    "ldam_margins",
    "log_prior",
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
        if loss_type not in CB_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CB_LOSS_TYPES}, got {loss_type!r}")
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


# --------------------------------------------------------------------------- the later methods
def _positive_counts(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """float64 counts, each >= 1 (a class without training images has no prior or margin)."""
    n = _as_counts(counts)
    if torch.any(n < 1):
        empty = torch.nonzero(n < 1).flatten().tolist()
        raise ValueError(f"every class needs at least one training image; classes {empty} have none "
                         "(the engine passes max(n, 1))")
    return n


def ldam_margins(counts: Sequence[int] | torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM's class margins ``m_j = C * n_j**(-1/4)`` with ``C`` such that the largest (the
    rarest class's) is ``max_margin``.

    Parameters
    ----------
    counts : (C,) training images per class, each >= 1.
    max_margin : float > 0.

    Returns
    -------
    (C,) float64 tensor.

    Examples
    --------
    >>> ldam_margins([16, 1], 0.5).tolist()  # 16**(-1/4) = 1/2 of the one-image class's
    [0.25, 0.5]
    """
    if not max_margin > 0:
        raise ValueError(f"max_margin must be > 0, got {max_margin}")
    m = _positive_counts(counts) ** -0.25
    return m * (max_margin / m.max())


def log_prior(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``log pi_j = log(n_j / sum(n))``, the training set's log class prior, float64 ``(C,)``.

    >>> [round(v, 6) for v in log_prior([3, 1]).tolist()]
    [-0.287682, -1.386294]
    """
    n = _positive_counts(counts)
    return torch.log(n) - torch.log(n.sum())


def _check_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, {num_classes}), got {tuple(logits.shape)}")
    return logits.float()


class _Reweightable(nn.Module):
    """A softmax loss with optional per-class weights ``weight`` ((C,) or None), reduced as
    PyTorch's weighted mean ``sum_i w[y_i] CE_i / sum_i w[y_i]`` (the plain mean without).
    Set ``loss.weight = w`` (or :meth:`set_weight`) between steps, e.g. for DRW."""

    weight: torch.Tensor | None

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", None, persistent=False)
        self.set_weight(weight)

    def set_weight(self, weight: torch.Tensor | Sequence[float] | None) -> None:
        """Per-class weights from now on (None: unweighted), kept in float32."""
        self.weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten()

    def _ce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w is not None:
            if w.numel() != logits.shape[1]:
                raise ValueError(f"weight has {w.numel()} classes, the logits {logits.shape[1]}")
            w = w.to(logits.device)
        return F.cross_entropy(logits, targets, weight=w)


class ReweightedCrossEntropy(_Reweightable):
    """Softmax cross-entropy with settable per-class weights (CE-DRW's loss).

    ``forward(logits (B, C), targets (B,)) -> scalar``.

    Examples
    --------
    >>> loss = ReweightedCrossEntropy(weight=[3.0, 1.0])
    >>> round(float(loss(torch.zeros(2, 2), torch.tensor([0, 1]))), 6)  # (3 log 2 + log 2) / 4
    0.693147
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, C), got {tuple(logits.shape)}")
        return self._ce(logits.float(), targets)


class LDAMLoss(_Reweightable):
    """Label-distribution-aware margin loss (Cao et al., NeurIPS 2019).

    ``CE(scale * (z - m_y * onehot(y)), y)`` where ``z`` are a cosine head's logits
    (:class:`finetail.models.NormedLinear`) and ``m = ldam_margins(counts, max_margin)``.

    Parameters
    ----------
    counts : (C,) training images per class, each >= 1.
    max_margin : the rarest class's margin (0.5 in the paper's CIFAR experiments).
    scale : ``s``, the softmax's inverse temperature on cosines (30 in the authors' code).
    weight : (C,) per-class weights or None; settable later (DRW: :func:`drw_weights`).

    ``forward(logits (B, C), targets (B,)) -> scalar``: the batch mean of CE, or with
    ``weight`` the weighted mean ``sum w_y CE / sum w_y``.

    Examples
    --------
    >>> loss = LDAMLoss([16, 1], max_margin=0.5, scale=1.0)
    >>> z, y = torch.zeros(1, 2), torch.tensor([1])
    >>> round(float(loss(z, y)), 6)  # CE([0, -0.5], 1) = log(1 + e^0.5)
    0.974077
    """

    margins: torch.Tensor

    def __init__(self, counts: Sequence[int] | torch.Tensor, max_margin: float = 0.5, scale: float = 30.0,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.max_margin, self.scale = float(max_margin), float(scale)
        self.register_buffer("margins", ldam_margins(counts, max_margin).to(torch.float32))

    @property
    def num_classes(self) -> int:
        return int(self.margins.numel())

    def extra_repr(self) -> str:
        return f"max_margin={self.max_margin}, scale={self.scale}, classes={self.num_classes}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits, self.num_classes)
        shifted = z.scatter_add(1, targets[:, None], -self.margins[targets][:, None])  # z_y - m_y
        return self._ce(self.scale * shifted, targets)


class _PriorShifted(nn.Module):
    """``CE(z + shift, y)`` for a fixed per-class ``shift`` (float32 buffer)."""

    shift: torch.Tensor

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.to(torch.float32))

    @property
    def num_classes(self) -> int:
        return int(self.shift.numel())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits, self.num_classes)
        return F.cross_entropy(z + self.shift, targets)


class BalancedSoftmaxLoss(_PriorShifted):
    """Balanced softmax (Ren et al., NeurIPS 2020): ``CE(z + log n, y)``, the batch mean.

    Parameters
    ----------
    counts : (C,) training images per class, each >= 1.

    Examples
    --------
    >>> loss = BalancedSoftmaxLoss([3, 1])
    >>> round(float(loss(torch.zeros(1, 2), torch.tensor([1]))), 6)  # -log(1/4)
    1.386294
    """

    def __init__(self, counts: Sequence[int] | torch.Tensor) -> None:
        super().__init__(torch.log(_positive_counts(counts)))


class LogitAdjustedLoss(_PriorShifted):
    """Logit-adjusted loss (Menon et al., ICLR 2021): ``CE(z + tau * log pi, y)``, the batch
    mean, with ``pi = counts / sum(counts)``. ``tau = 1`` equals :class:`BalancedSoftmaxLoss`
    (the shifts differ by the constant ``log sum(n)``); ``tau = 0`` is plain softmax.

    Parameters
    ----------
    counts : (C,) training images per class, each >= 1.
    tau : the log prior's weight.
    """

    def __init__(self, counts: Sequence[int] | torch.Tensor, tau: float = 1.0) -> None:
        if not math.isfinite(tau):
            raise ValueError(f"tau must be finite, got {tau}")
        self.tau = float(tau)
        super().__init__(self.tau * log_prior(counts))

    def extra_repr(self) -> str:
        return f"tau={self.tau}, classes={self.num_classes}"


def drw_weights(counts: Sequence[int] | torch.Tensor, epoch: int, drw_epoch: int | None,
                beta: float = DRW_BETA) -> torch.Tensor | None:
    """Deferred re-weighting's per-class weights in ``epoch`` (0-based): None (unweighted)
    before ``drw_epoch`` (and always when it is None), from it on
    :func:`class_balanced_weights` ``(counts, beta)``. A function of the epoch alone, so a job
    resumed mid-training weights as an uninterrupted one.

    Examples
    --------
    >>> drw_weights([3, 1], 0, drw_epoch=1) is None
    True
    >>> drw_weights([3, 1], 1, drw_epoch=1, beta=0.5).tolist()  # 1/E_n: 1/1.75, 1/1, summing to 2
    [0.7272727489471436, 1.2727272510528564]
    """
    if drw_epoch is None or epoch < drw_epoch:
        return None
    return class_balanced_weights(counts, beta)


class PluginLoss(nn.Module):
    """A loss plugin's module (:mod:`finetail.plugins`), checked at every call: the plugin's
    ``forward(logits, targets)`` must return a scalar (a 0-d floating tensor). Anything else,
    or an exception inside the plugin, stops training with one line naming the plugin
    (:class:`~finetail.plugins.PluginError`); a NaN or infinite value is the engine's to catch
    (:class:`~finetail.errors.NonFiniteError`, naming the epoch and step).

    Parameters
    ----------
    inner : the module the plugin built.
    ref : the plugin's name, for messages.
    """

    def __init__(self, inner: nn.Module, ref: str) -> None:
        super().__init__()
        self.inner, self.ref = inner, ref

    def extra_repr(self) -> str:
        return f"plugin={self.ref!r}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from .plugins import PluginError

        try:
            out = self.inner(logits, targets)
        except Exception as e:  # the plugin's own bug, reported in one line
            raise PluginError(f"loss plugin {self.ref!r} raised {type(e).__name__}: {e}") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 0 or not out.is_floating_point():
            what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise PluginError(f"loss plugin {self.ref!r} returned {what} for a batch of {len(targets)}; "
                              "a loss returns a scalar (a 0-d floating tensor, e.g. the batch mean)")
        return out


def build_plugin_loss(cfg: TrainConfig, counts: Sequence[int] | torch.Tensor) -> PluginLoss:
    """The plugin ``cfg.plugin``'s loss on ``counts``: ``callable(counts, **cfg.plugin_params)``
    with ``counts`` a ``(C,)`` int64 tensor, after checking the parameters against its
    signature; it must return an ``nn.Module``."""
    from .plugins import PluginError, check_signature, load

    plugin = load("loss", cfg.plugin)
    params = dict(cfg.plugin_params or {})
    check_signature(plugin, params)
    n = torch.as_tensor(counts, dtype=torch.int64).flatten().clone()
    try:
        inner = plugin.fn(n, **params)
    except Exception as e:  # a plugin's constructor may raise anything
        raise PluginError(f"loss plugin {cfg.plugin!r} raised {type(e).__name__} when built on the class counts: "
                          f"{e}") from None
    if not isinstance(inner, nn.Module):
        raise PluginError(f"loss plugin {cfg.plugin!r} returned a {type(inner).__name__}; a loss plugin returns a "
                          "torch.nn.Module whose forward(logits, targets) is the loss")
    return PluginLoss(inner, cfg.plugin)


def build_loss(cfg: TrainConfig, counts: Sequence[int] | torch.Tensor) -> nn.Module:
    """The loss a recipe trains with, on the training set's ``counts`` (each >= 1):
    :class:`LDAMLoss`, :class:`BalancedSoftmaxLoss`, :class:`LogitAdjustedLoss`,
    :class:`ReweightedCrossEntropy` (softmax with ``drw_epoch``), a plugin's
    (:func:`build_plugin_loss`) or :class:`ClassBalancedLoss`.
    A DRW loss starts unweighted; the engine sets :func:`drw_weights` at every epoch."""
    if cfg.loss == "plugin":
        return build_plugin_loss(cfg, counts)
    if cfg.loss == "ldam":
        return LDAMLoss(counts, cfg.max_margin, cfg.scale)
    if cfg.loss == "balanced_softmax":
        return BalancedSoftmaxLoss(counts)
    if cfg.loss == "logit_adjusted":
        return LogitAdjustedLoss(counts, cfg.tau)
    if cfg.loss == "softmax" and cfg.drw_epoch is not None:
        return ReweightedCrossEntropy()
    return ClassBalancedLoss(counts, cfg.loss, cfg.beta, cfg.gamma)
