"""The optimizer: ``torch.optim.SGD`` without importing torch's compiler stack.

``torch.optim.Optimizer`` wraps ``add_param_group`` (called by ``__init__``), ``zero_grad``,
``state_dict``, ``load_state_dict`` and ``step`` in guards for ``torch.compile``
(``torch._disable_dynamo`` and ``_use_grad_for_differentiable``), and the first call of any
of them imports ``torch._dynamo``: 1.3 s on the 2-core development machine (torch 2.x), a
third of a small training job's start-up. The engine never compiles the optimizer (only the
model, see ``TrainConfig.compile``), so :class:`SGD` calls the very functions those guards
wrap: the same update (the same ``torch.optim.sgd.sgd``, bit for bit) and the same
state_dict. Should a torch release stop exposing the wrapped functions (``__wrapped__``),
:func:`sgd` falls back to the plain ``torch.optim.SGD``.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["SGD", "sgd"]

_Optimizer = torch.optim.Optimizer


def _unguarded(fn):
    """The function torch's guard decorators (and the step hook) wrap, or ``None``."""
    inner = inspect.unwrap(fn)
    return inner if inner is not fn else None


_ADD_PARAM_GROUP = _unguarded(_Optimizer.add_param_group)
_ZERO_GRAD = _unguarded(_Optimizer.zero_grad)
_STATE_DICT = _unguarded(_Optimizer.state_dict)
_LOAD_STATE_DICT = _unguarded(_Optimizer.load_state_dict)
_SGD_STEP = _unguarded(torch.optim.SGD.step)


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose methods skip the ``torch.compile`` guards (never compiled)."""

    def add_param_group(self, param_group: dict) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict:
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _LOAD_STATE_DICT(self, state_dict)

    def step(self, closure=None):
        # What ``_use_grad_for_differentiable`` does, less its torch._dynamo graph breaks.
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return _SGD_STEP(self, closure)
        finally:
            torch.set_grad_enabled(prev)


def sgd(groups: list[dict], lr: float, momentum: float, nesterov: bool) -> torch.optim.SGD:
    """SGD over ``groups`` (each with its ``weight_decay``): :class:`SGD` when this torch
    exposes the guarded functions, else ``torch.optim.SGD`` (same numbers, slower start)."""
    guarded = (_ADD_PARAM_GROUP, _ZERO_GRAD, _STATE_DICT, _LOAD_STATE_DICT, _SGD_STEP)
    cls = SGD if all(callable(f) for f in guarded) else torch.optim.SGD
    return cls(groups, lr=lr, momentum=momentum, nesterov=nesterov)
