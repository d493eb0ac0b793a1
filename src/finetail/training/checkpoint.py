"""A training job's checkpoint: what it holds, when it may be resumed, and SIGTERM.

A checkpoint is a dict of state_dicts (model, optimizer) + ``epoch`` (the last finished one)
+ ``asdict(cfg)`` + the history and the caller's ``extra`` state, written to a temp file then
``os.replace``-d (:func:`save_state`), and loaded with ``weights_only=True``. A run resumes at
``epoch + 1``. A checkpoint written on SIGTERM in the middle of an epoch also holds where:
the next step (``mid_iter``), the state of the epoch's random generator (``mid_gen``) and
the epoch's global loss/hit totals so far (``mid_totals``), so the rerun continues bit for bit.

A checkpoint is resumed only when it was written for the same **resume key**
(:func:`resume_key`): the recipe less its speed-only switches
(:data:`~finetail.training.recipe.SPEED_ONLY`) and less the settings added later at their
neutral values (:func:`~finetail.training.recipe.key_settings`), the training-set class counts, the data's
digest (both splits), the initial weights' digest and the training code's digest
(:func:`finetail.code.code_digest`); otherwise training starts afresh (and a finished run on
changed data trains and evaluates again).

Only rank 0 writes; every rank loads on resume. SIGTERM (Slurm's warning before a kill)
only sets a flag (:attr:`Checkpointer.stop_requested`); the loop checks it after each step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..code import code_digest
from ..fileio import atomic_write
from .recipe import TrainConfig, key_settings

__all__ = [
    "Checkpointer",
    "MidEpoch",
    "Resumed",
    "digest_data",
    "job_key_digest",
    "load_checkpoint",
    "resume_extra",
    "resume_key",
    "save_state",
]


def save_state(obj: dict, path: str | Path) -> None:
    """``torch.save`` a dict of state_dicts atomically (checkpoints, model.pt)."""
    atomic_write(path, lambda tmp: _save(obj, tmp))


def _save(obj: dict, path: Path) -> None:
    """``torch.save`` through a Python file: a full device raises ``OSError`` (``ENOSPC``),
    not the "unexpected pos" RuntimeError of torch's own file writer."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def digest_data(train_images, train_labels: np.ndarray, test_images, test_labels: np.ndarray, extra: str = "") -> str:
    """sha256 of the data a job trains and evaluates on: both splits' images and labels.

    Arrays are hashed byte for byte (the whole split is in memory anyway; 3 ms for 6,300
    16-px images on the 2-core development machine, so roughly 0.1 s for CIFAR-10's 184 MB). For a file split (:class:`finetail.loader.ImageFiles`) the paths are hashed,
    and ``extra`` should carry the sha256 of the manifest, whose ``sha256`` column records
    each file's bytes (hashed once when the dataset was prepared).
    """
    h = hashlib.sha256(extra.encode())
    for images, labels in ((train_images, train_labels), (test_images, test_labels)):
        if isinstance(images, np.ndarray):
            h.update(repr((images.dtype.str, images.shape)).encode())
            h.update(memoryview(np.ascontiguousarray(images)).cast("B"))
        else:
            h.update("\0".join(map(str, images.paths)).encode())
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def resume_key(cfg: TrainConfig, train_counts: np.ndarray, init_digest: str | None, data: str | None) -> dict:
    """What a checkpoint must have been written for to be resumed: the recipe (less speed-only
    switches and added settings at their neutral values), the data's bytes (both splits), the
    initial weights and the training code (with a plugin loss, the plugin's code too:
    :func:`finetail.plugins.plugin_digest`)."""
    key = {"cfg": key_settings(cfg), "train_counts": [int(c) for c in train_counts], "init": init_digest or "",
           "data": data or "", "code": code_digest("train")}
    if cfg.loss == "plugin":
        from ..plugins import plugin_digest

        key["plugin"] = plugin_digest("loss", cfg.plugin)
    return key


def _counts(train_labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(train_labels, minlength=num_classes)[:num_classes]


def job_key_digest(
    cfg: TrainConfig, train_labels: np.ndarray, num_classes: int, init_digest: str | None, data: str | None
) -> str:
    """sha256 of the resume key: equal for two runs exactly when one may resume the other."""
    cfg = cfg.for_train_size(len(train_labels))
    key = resume_key(cfg, _counts(train_labels, num_classes), init_digest, data)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def resume_extra(
    checkpoint: str | Path, cfg: TrainConfig, train_labels: np.ndarray, num_classes: int, init_digest: str | None,
    data: str | None = None,
) -> dict | None:
    """The ``extra_state`` of a checkpoint that :func:`~finetail.training.loop.train` would
    resume, else ``None``."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        return None
    cfg = cfg.for_train_size(len(train_labels))
    state = load_checkpoint(checkpoint)
    if state.get("key") != resume_key(cfg, _counts(train_labels, num_classes), init_digest, data):
        return None
    return {"epoch": int(state["epoch"]), **json.loads(state.get("extra", "{}"))}


@dataclass
class MidEpoch:
    """Where in an epoch a SIGTERM stopped training."""

    iter: int  # the next step to run
    gen: torch.Tensor  # the epoch generator's state before that step
    totals: torch.Tensor  # (2,) global training loss and hit sums of the steps before it


@dataclass
class Resumed:
    """What a run starts from: nothing (epoch 0), or a checkpoint's epoch, history and extra."""

    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    mid: MidEpoch | None = None


class Checkpointer:
    """Saves and restores one job's checkpoint, written for one resume ``key``.

    ``main``: whether this process writes (rank 0); the others have the same state.
    """

    def __init__(self, path: str | Path, key: dict, cfg: TrainConfig, main: bool,
                 log: Callable[[str], None] = print) -> None:
        self.path, self.key, self.cfg, self.main, self.log = Path(path), key, cfg, main, log
        self.stop_requested = False

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict) -> Resumed:
        """Load the checkpoint into ``model`` and ``opt`` if it was written for this key.
        ``extra`` (this attempt's extra state) wins over the checkpoint's on a clash."""
        if not self.path.exists():
            return Resumed(extra=dict(extra))
        state = load_checkpoint(self.path)
        if state.get("key") != self.key:
            self.log(f"checkpoint {self.path} was written for other settings or data: starting afresh")
            return Resumed(extra=dict(extra))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        out = Resumed(int(state["epoch"]) + 1, json.loads(state["history"]),
                      {**json.loads(state.get("extra", "{}")), **extra})
        where = f"epoch {out.start_epoch}"
        if "mid_iter" in state:
            out.mid = MidEpoch(int(state["mid_iter"]), state["mid_gen"], state["mid_totals"])
            where += f", iteration {out.mid.iter}"
        self.log(f"resuming from checkpoint {self.path} at {where} of {self.cfg.epochs} epochs")
        return out

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, history: list[dict],
             extra: dict, mid: MidEpoch | None = None) -> None:
        """``epoch`` = the last finished epoch; ``mid`` = where in the next one training stopped."""
        if not self.main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "cfg": json.dumps(asdict(self.cfg)),
            "key": self.key,
            "history": json.dumps(history),
            "extra": json.dumps(extra),
        }
        if mid is not None:
            state.update(mid_iter=mid.iter, mid_gen=mid.gen, mid_totals=mid.totals)
        save_state(state, self.path)

    @contextlib.contextmanager
    def watching_sigterm(self) -> Iterator[None]:
        """Within: SIGTERM sets :attr:`stop_requested` (the previous handler comes back after).
        Off the main thread, where no handler can be installed, nothing is watched."""
        try:
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread
            previous = None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, *_args) -> None:
        self.stop_requested = True
