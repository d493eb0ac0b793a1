"""One training engine for pretraining, fine-tuning and the CB-loss grid: the loop.

:func:`train` wires the parts: the recipe (:mod:`.recipe`), a batch source (:mod:`.batches`:
uint8 arrays on the device, or a file manifest through a DataLoader), the checkpoint and its
resume key (:mod:`.checkpoint`), then runs :func:`train_one_epoch` and :func:`evaluate` epoch
by epoch. Normalisation is fused into the uint8 -> float conversion of each batch.

Under ``torchrun`` (a process group of world size W > 1, see :mod:`finetail.distributed`)
the model is wrapped in ``DistributedDataParallel``. Every rank draws the same permutation
and augmentation of each global batch of ``batch_size`` images (the same seeded generator)
and trains on its own contiguous slice of it, so a recipe means the same at any W (the
learning rate is not rescaled). Each rank's loss is its slice's mean, scaled by
``W * slice / batch`` so that DDP's gradient average is exactly the full batch's gradient
(the plain per-rank mean when slices are equal). On CUDA, BatchNorm becomes SyncBatchNorm
(batch statistics over the global batch); on the CPU (gloo) BatchNorm statistics are
per-rank, so W > 1 on the CPU matches a single process only within a tolerance. Under DDP a
last partial batch smaller than W is dropped. Only rank 0 writes checkpoints and calls
``on_epoch``; every rank loads the checkpoint on resume; rank 0 evaluates and broadcasts the
metrics; a SIGTERM seen by any rank stops all of them at the same step.

The loss is :func:`finetail.losses.build_loss`'s for the recipe, on the training counts (at
least 1 each). With ``drw_epoch`` (deferred re-weighting) each epoch first sets the loss's
class weights to :func:`finetail.losses.drw_weights` of that epoch, so a resumed epoch is
weighted as an uninterrupted one. Such a loss is a weighted mean over its batch; under DDP
each rank's is over its own slice, so the averaged gradient equals the full batch's only when
the slices' weight sums are proportional to their sizes (close, not exact).

With ``compile`` the training steps run a ``torch.compile``-d module (on CUDA with
``cuda_graphs``: mode ``reduce-overhead``); evaluation and checkpoints use the plain module.

The engine imports neither snakemake nor mlflow: tracking is an ``on_epoch`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..errors import NonFiniteError
from ..features import state_digest
from ..losses import build_loss, drw_weights
from ..metrics import classification_metrics, expected_calibration_error
from ..models import Classifier, build_model, init_head_bias, param_groups
from .batches import BatchSource, batch_source, normalisation_tensors
from .checkpoint import Checkpointer, MidEpoch, Resumed, digest_data, resume_key
from .optim import sgd
from .recipe import DIV128_NORMALISATION, SOFTMAX_LOSSES, TrainConfig, channels_last, lr_at, precision

__all__ = ["Preempted", "TrainResult", "confidence", "eval_logits", "evaluate", "predict", "score", "train",
           "train_one_epoch"]


class Preempted(RuntimeError):
    """Raised after a SIGTERM, once the current step is checkpointed (mid-epoch, resumable exactly)."""


@dataclass
class TrainResult:
    """What :func:`train` returns; ``metrics`` and ``history`` are global (the same on every rank)."""

    metrics: dict  # the last evaluation: classification_metrics + top5_error + ece
    history: list[dict]  # one row per epoch: train_loss, train_acc, lr, images_per_s, data_wait_frac[, eval]
    model: Classifier  # the trained model itself (not a DDP or compiled wrapper)
    train_counts: np.ndarray  # (C,) training images per class
    normalisation: dict  # {"mean": [3], "std": [3]} in pixel units, as used
    extra_state: dict  # the caller's extra_state (merged over the checkpoint's)
    device: str
    world_size: int
    start_backbone_sha256: str  # the backbone's weights before training (after init_backbone)
    epochs: int  # the schedule's epochs (after budget_images)
    precision: str  # what the forward passes computed in: "bf16" (autocast) or "fp32"


@dataclass
class _Run:
    """Everything an epoch needs, built once by :func:`train`."""

    cfg: TrainConfig
    model: Classifier  # evaluated and checkpointed
    net: nn.Module  # what the training steps call: the model, its DDP wrapper, or compiled
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    counts: np.ndarray  # (C,) training images per class, at least 1 (what the loss is built on)
    data: BatchSource
    mean: torch.Tensor
    std: torch.Tensor
    ckpt: Checkpointer
    dev: torch.device
    world: int
    main: bool
    iters: int  # steps per epoch
    log: Callable[[str], None]

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = (x.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def confidence(logits: torch.Tensor, top1: torch.Tensor, loss: str) -> torch.Tensor:
    """The probability the loss's own model gives the predicted class ``top1``: its softmax
    probability for the softmax losses (:data:`~.recipe.SOFTMAX_LOSSES`); for sigmoid and
    focal losses, which train one independent sigmoid per class (one-vs-rest), the sigmoid of
    its logit. ``logits`` are those of :func:`eval_logits`."""
    z = logits.gather(1, top1[:, None])[:, 0]
    if loss in SOFTMAX_LOSSES:
        return torch.exp(z - torch.logsumexp(logits, dim=1))
    return torch.sigmoid(z)


def eval_logits(logits: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The logits a trained model predicts with, from its head's output: LDAM's probability
    model is ``softmax(scale * z)`` of the cosines ``z``; every other loss's is the plain
    output (the balanced-softmax and logit-adjusted shifts are training-only)."""
    return logits * cfg.scale if cfg.loss == "ldam" else logits


@torch.no_grad()
def predict(model: nn.Module, data: BatchSource, mean, std, cfg: TrainConfig, batch: int = 1024,
            k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-k predicted labels of the test split, best first, ``(N, min(k, C))``, and the
    confidence of the first, ``(N,)`` float64 (see :func:`confidence`)."""
    model.eval()
    out, conf = [], []
    for x, _ in data.test_batches(batch):
        xb = _normalise(x, mean, std, channels_last(cfg, data.device.type))
        with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=precision(cfg, data.device.type) == "bf16"):
            logits = eval_logits(model(xb).float(), cfg)
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out.append(top)
        conf.append(confidence(logits, top[:, 0], cfg.loss))
    return torch.cat(out).cpu().numpy(), torch.cat(conf).double().cpu().numpy()


def evaluate(model, data: BatchSource, mean, std, cfg: TrainConfig, train_counts: np.ndarray) -> dict:
    """:func:`score` of the model's predictions on the test split (:func:`predict`)."""
    topk, conf = predict(model, data, mean, std, cfg)
    return score(topk, conf, data.test_labels, train_counts, cfg)


def score(topk: np.ndarray, conf: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, cfg: TrainConfig) -> dict:
    """:func:`finetail.metrics.classification_metrics` of top-k predictions ``(N, k)`` (best
    first), plus ``top5_error`` (``None`` with fewer than 5 classes) and ``ece``
    (:func:`finetail.metrics.expected_calibration_error`, 15 bins, of the top-1 prediction's
    confidence ``conf`` (N,) under the loss's probability model: softmax, or per-class sigmoid)."""
    out = classification_metrics(topk[:, 0], labels, train_counts, cfg.many_shot, cfg.few_shot)
    out["top5_error"] = float(1.0 - (topk == labels[:, None]).any(axis=1).mean()) if topk.shape[1] >= 5 else None
    # Diverged weights give NaN confidences: ECE is NaN then, and the engine's non-finite
    # check (not this metric) stops the job, naming the epoch.
    out["ece"] = expected_calibration_error(conf, topk[:, 0] == labels) if np.isfinite(conf).all() else float("nan")
    return out


def _check_finite(model: nn.Module, first_bad: torch.Tensor, epoch: int, done: int, iters: int) -> None:
    """Raise :class:`NonFiniteError` if this epoch saw a non-finite loss (``first_bad`` >= 0 is
    the step) or left non-finite weights after ``done`` steps of ``iters``, on any rank. One
    device sync per call."""
    weights_ok = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    flags = torch.stack([(first_bad >= 0).float(), (~weights_ok).float()])
    flags = distributed.all_reduce_sum(flags)
    if float(flags.sum()) == 0:
        return
    step = int(first_bad)
    if float(flags[0]):
        what = "the loss became non-finite (NaN or inf)"
        where = f"epoch {epoch + 1}, step {step + 1} of {iters}" if step >= 0 else f"epoch {epoch + 1} (on another rank)"
    else:
        # Every loss was finite, so the weights that produced them were too: the last update did it.
        what = "the weights became non-finite (NaN or inf) in the update"
        where = f"epoch {epoch + 1}, step {done} of {iters}"
    raise NonFiniteError(
        f"training diverged: {what} at {where}; no result is written. Lower the learning rate "
        "(or check the data and loss settings) and rerun"
    )


def _preempt(r: _Run, epoch: int, it: int, gen: torch.Generator, totals: torch.Tensor, history: list[dict],
             extra: dict) -> None:
    """SIGTERM mid-epoch: checkpoint after step ``it`` with the epoch's random stream (so a
    rerun continues bit for bit) and raise :class:`Preempted` on every rank."""
    totals = distributed.all_reduce_sum(totals).cpu()
    r.ckpt.save(r.model, r.opt, epoch - 1, history, extra, MidEpoch(it + 1, gen.get_state(), totals))
    distributed.barrier()  # no rank exits before the checkpoint is written
    r.log(f"SIGTERM received: checkpointed epoch {epoch + 1} at iteration {it + 1} of {r.iters}; exiting")
    raise Preempted(f"preempted during epoch {epoch}")


def train_one_epoch(r: _Run, epoch: int, n_train: int, history: list[dict], extra: dict,
                    mid: MidEpoch | None = None) -> dict:
    """Train epoch ``epoch`` (from ``mid`` if it was interrupted); return its history row
    (global training loss and accuracy, last lr, images/s, rank 0's share of time waiting for data)."""
    cfg = r.cfg
    if cfg.drw_epoch is not None:  # deferred re-weighting: this epoch's weights, a function of the epoch
        r.loss_fn.set_weight(drw_weights(r.counts, epoch, cfg.drw_epoch, cfg.beta))
    gen = torch.Generator(device=r.dev).manual_seed(cfg.seed * 1_000_003 + epoch)
    r.net.train()
    if cfg.linear_probe:
        r.model.backbone.eval()
    t0 = time.perf_counter()
    batches = r.data.epoch(epoch, gen, mid.iter if mid else 0, mid.gen if mid else None)
    total_loss = torch.zeros((), device=r.dev)
    total_hit = torch.zeros((), device=r.dev)
    first_bad = torch.full((), -1, dtype=torch.int64, device=r.dev)  # first non-finite step, no sync
    if mid is not None and r.main:  # the saved totals are global: count them once
        total_loss += mid.totals[0].to(total_loss.dtype)
        total_hit += mid.totals[1].to(total_hit.dtype)
    wait = 0.0  # seconds this rank waited for its batches
    for it in range(mid.iter if mid else 0, r.iters):
        tw = time.perf_counter()
        xb, yb = next(batches)
        wait += time.perf_counter() - tw
        n_global = min(cfg.batch_size, n_train - it * cfg.batch_size)
        xb = _normalise(xb, r.mean, r.std, channels_last(cfg, r.dev.type))
        for g in r.opt.param_groups:
            g["lr"] = lr_at(cfg, epoch, it, r.iters)
        with torch.autocast(r.dev.type, dtype=torch.bfloat16, enabled=precision(cfg, r.dev.type) == "bf16"):
            logits = r.net(xb)
        loss = r.loss_fn(logits.float(), yb)
        r.opt.zero_grad(set_to_none=True)
        (loss * (r.world * len(yb) / n_global) if r.world > 1 else loss).backward()
        r.opt.step()
        total_loss += loss.detach() * len(yb)
        total_hit += (logits.argmax(1) == yb).sum()
        bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
        first_bad = torch.where(bad, torch.full_like(first_bad, it), first_bad)
        if distributed.any_rank(r.ckpt.stop_requested, r.dev) and it + 1 < r.iters:
            _check_finite(r.model, first_bad, epoch, it + 1, r.iters)  # never checkpoint NaN weights
            totals = torch.stack([total_loss.detach(), total_hit.detach().to(total_loss.dtype)])
            _preempt(r, epoch, it, gen, totals, history, extra)
    _check_finite(r.model, first_bad, epoch, r.iters, r.iters)
    sums = distributed.all_reduce_sum(torch.stack([total_loss, total_hit.to(total_loss.dtype)]))
    if r.cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    seen = min(n_train, r.iters * cfg.batch_size)  # images an epoch trains on (all of them when W = 1)
    return {
        "epoch": epoch,
        "train_loss": float(sums[0]) / seen,
        "train_acc": float(sums[1]) / seen,
        "lr": lr_at(cfg, epoch, r.iters - 1, r.iters),
        "images_per_s": seen / dt,
        "data_wait_frac": wait / dt,  # rank 0's
    }


def _evaluate_all(r: _Run, train_counts: np.ndarray) -> dict:
    """Rank 0 evaluates the whole test set (every metric, ECE included, over all of it); every
    rank gets its metrics."""
    return distributed.broadcast_object(
        evaluate(r.model, r.data, r.mean, r.std, r.cfg, train_counts) if r.main else None
    )


def _epochs(r: _Run, start: Resumed, train_counts: np.ndarray, on_epoch, progress: bool) -> dict:
    """Run the epochs left after ``start``; return the last evaluation's metrics ({} if none)."""
    cfg, history, extra, mid = r.cfg, start.history, start.extra, start.mid
    n_train = len(r.data.train_labels)
    bar = None
    if progress and r.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start.start_epoch, unit="epoch", dynamic_ncols=True)
    metrics: dict = history[-1]["eval"] if history and "eval" in history[-1] else {}
    if r.main:  # bench/startup.py times the job's start-up up to this line
        r.log(f"training from epoch {start.start_epoch + 1} of {cfg.epochs}: {n_train} images, "
              f"{r.iters} steps per epoch")
    try:
        for epoch in range(start.start_epoch, cfg.epochs):
            row = train_one_epoch(r, epoch, n_train, history, extra, mid)
            mid = None
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics = _evaluate_all(r, train_counts)
                row.update(eval=metrics, test_top1_error=metrics["top1_error"],
                           test_balanced_acc=metrics["balanced_acc"], test_ece=metrics["ece"])
            history.append(row)
            # Report before checkpointing: a kill in between replays this epoch (same values
            # under deterministic settings) rather than losing its metrics for good.
            if on_epoch is not None and r.main:
                on_epoch(epoch, {k: v for k, v in row.items() if isinstance(v, float)})
            stopping = distributed.any_rank(r.ckpt.stop_requested, r.dev)
            r.ckpt.save(r.model, r.opt, epoch, history, extra)
            if stopping:
                distributed.barrier()
                r.log(f"SIGTERM received: checkpointed the end of epoch {epoch + 1}; exiting")
                raise Preempted(f"preempted after epoch {epoch}")
            msg = (f"epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} {row['images_per_s']:.0f} img/s, "
                   f"{100 * row['data_wait_frac']:.0f}% waiting for data")
            if "eval" in row:
                msg += f" test err {100 * metrics['top1_error']:.2f}%"
            if bar is not None:
                bar.set_postfix_str(msg)
                bar.update(1)
            elif r.main:
                r.log(msg)
    finally:
        if bar is not None:
            bar.close()
    return metrics


def _conv_precision(cfg: TrainConfig, device_type: str) -> None:
    """On CUDA, an fp32 recipe (``amp`` off) computes its convolutions in IEEE fp32: PyTorch's
    default lets cuDNN run fp32 convolutions in TF32 (10-bit mantissa) on Ampere and later
    GPUs. With bf16 autocast, PyTorch's default (TF32) stays. Matrix products are IEEE fp32 by
    PyTorch's default already. Nothing changes on the CPU."""
    if device_type == "cuda":
        torch.backends.cudnn.conv.fp32_precision = "ieee" if precision(cfg, device_type) == "fp32" else "tf32"


def _model(cfg: TrainConfig, num_classes: int, init_backbone: dict | None, dev: torch.device) -> tuple[Classifier, str]:
    """The model on ``dev``, from ``init_backbone`` if given (new head), and its backbone's digest."""
    model: Classifier = build_model(cfg.model, num_classes, cfg.width, cfg.weights, cfg.shortcut, cfg.init, cfg.head)
    if init_backbone is not None:
        model.backbone.load_state_dict(init_backbone)
    start_backbone = state_digest(model.backbone.state_dict())
    init_head_bias(model, cfg.loss)
    if cfg.linear_probe:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    model.to(dev)
    if channels_last(cfg, dev.type):
        model.to(memory_format=torch.channels_last)
    return model, start_backbone


def _wrap(model: Classifier, cfg: TrainConfig, dev: torch.device, world: int) -> tuple[Classifier, nn.Module]:
    """``(model, net)``: the model (with SyncBatchNorm under DDP on CUDA), and what the training
    steps call: the model, under DDP when W > 1, compiled with ``compile``. Evaluation and
    checkpoints use ``model`` itself, so state_dicts carry no ``_orig_mod.`` prefix."""
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, mode="reduce-overhead" if cfg.cuda_graphs and dev.type == "cuda" else None)
    return model, net


def train(
    cfg: TrainConfig,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    checkpoint: str | Path,
    *,
    init_backbone: dict | None = None,
    init_digest: str | None = None,
    data_digest: str | None = None,
    normalisation: dict | None = None,
    device: str = "auto",
    on_epoch: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    extra_state: dict | None = None,
) -> TrainResult:
    """Train (or resume) and return a :class:`TrainResult`.

    ``checkpoint`` is resumed when it exists and was written for the same config, the same
    data (``data_digest``, default: :func:`~.checkpoint.digest_data` of the four arguments),
    the same initial weights and the same training code; otherwise training starts afresh
    (and a finished run on changed data trains and evaluates again). ``init_backbone`` is a
    backbone state_dict to start from (fine-tuning); the head is always new.
    ``normalisation`` (``{"mean": [3], "std": [3]}`` in pixel units) defaults to the training
    set's statistics (file manifests: ImageNet's), or to ``x / 128 - 1`` with ``input_norm:
    div128``; fine-tuning passes the pretrained model's. ``train_images``/``test_images`` are uint8 ``(N, H, W, 3)`` arrays or, for a file
    manifest, :class:`~finetail.loader.ImageFiles`. ``extra_state`` (e.g. a tracking run id)
    is stored in the checkpoint and handed back as ``result.extra_state``. SIGTERM makes the
    engine checkpoint after the current step (with the epoch's random stream, so the rerun
    continues bit for bit) and raise :class:`Preempted`. A non-finite loss or weights raise
    :class:`finetail.errors.NonFiniteError` naming the epoch and step, before anything of that
    epoch is checkpointed or reported. Under ``torchrun`` every rank calls this; ``on_epoch``
    runs on rank 0 only, and the returned ``metrics`` and ``history`` are the same (global)
    on every rank.
    """
    cfg.validate()
    cfg = cfg.for_train_size(len(train_labels))
    dev = distributed.init(device)
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _conv_precision(cfg, dev.type)
    train_counts = np.bincount(train_labels, minlength=num_classes)[:num_classes]
    if data_digest is None:
        data_digest = digest_data(train_images, train_labels, test_images, test_labels)
    ckpt = Checkpointer(checkpoint, resume_key(cfg, train_counts, init_digest, data_digest), cfg, main, log)

    _seed_all(cfg.seed)
    model, start_backbone = _model(cfg, num_classes, init_backbone, dev)
    counts = np.maximum(train_counts, 1)
    loss_fn = build_loss(cfg, counts).to(dev)
    opt = sgd(param_groups(model, cfg.weight_decay, decay_head_bias=cfg.loss in SOFTMAX_LOSSES),
              lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    data = batch_source(train_images, train_labels, test_images, test_labels, cfg, dev, rank, world)
    if normalisation is not None:
        mean, std = normalisation_tensors(normalisation, dev)
    elif cfg.input_norm == "div128":
        mean, std = normalisation_tensors(DIV128_NORMALISATION, dev)
    else:
        mean, std = data.default_normalisation()
    start = ckpt.restore(model, opt, extra_state or {})
    model, net = _wrap(model, cfg, dev, world)
    r = _Run(cfg, model, net, opt, loss_fn, counts, data, mean, std, ckpt, dev, world, main,
             distributed.steps_per_epoch(len(train_labels), cfg.batch_size, world), log)
    with ckpt.watching_sigterm():
        metrics = _epochs(r, start, train_counts, on_epoch, progress)
    if not metrics:
        metrics = _evaluate_all(r, train_counts)
    return TrainResult(
        metrics=metrics,
        history=start.history,
        model=model,
        train_counts=train_counts,
        normalisation={"mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
        extra_state=start.extra,
        device=str(dev),
        world_size=world,
        start_backbone_sha256=start_backbone,
        epochs=cfg.epochs,
        precision=precision(cfg, dev.type),
    )
