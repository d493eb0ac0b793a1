"""One training engine for pretraining, fine-tuning and the CB-loss grid.

Small images live on the training device as uint8 ``(N, 3, H, W)`` tensors; random crop
(zero padding) and horizontal flip run batched on that device; normalisation is fused into
the uint8 -> float conversion. Every random draw of epoch ``e`` comes from a generator seeded
by ``(seed, e)``, so a run resumed at epoch ``e`` replays exactly what an uninterrupted run
does. Checkpoints (a dict of state_dicts + ``epoch`` + ``asdict(cfg)``) are written to a temp
file then ``os.replace``-d, and loaded with ``weights_only=True``.

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

Large images come from a file manifest instead (``train_images``/``test_images`` given as
:class:`finetail.loader.ImageFiles`): a DataLoader decodes and augments them
(RandomResizedCrop to ``image_size`` + flip; test: resize + centre crop), as described in
:mod:`finetail.loader`, with the same epoch order, resume (mid-epoch too, exactly), DDP and
SIGTERM behaviour; normalisation defaults to ImageNet's statistics there.

With ``compile`` the training steps run a ``torch.compile``-d module (on CUDA with
``cuda_graphs``: mode ``reduce-overhead``); evaluation and checkpoints use the plain module.

The engine imports neither snakemake nor mlflow: tracking is an ``on_epoch`` callback.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .code import code_digest
from .errors import NonFiniteError
from .losses import LOSS_TYPES, ClassBalancedLoss
from .manifest import atomic_write
from .features import state_digest
from .metrics import classification_metrics
from .models import Classifier, build_model, init_head_bias, param_groups

__all__ = [
    "TrainConfig",
    "Preempted",
    "augment_batch",
    "digest_data",
    "evaluate",
    "job_key_digest",
    "load_checkpoint",
    "lr_at",
    "resume_extra",
    "save_state",
    "train",
]


@dataclass
class TrainConfig:
    """Everything a training job depends on. Units in comments."""

    model: str = "resnet32"  # registry name (finetail.models)
    width: int = 16  # first-stage filters of CIFAR ResNets
    weights: str | None = None  # torchvision pretrained-weights enum name
    epochs: int = 200
    batch_size: int = 128  # images per step
    lr: float = 0.1  # peak learning rate for batch_size images
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    warmup_epochs: float = 5.0  # linear warm-up from lr/iters to lr, per iteration
    milestones: list[int] = field(default_factory=lambda: [160, 180])  # epochs (0-based) where...
    lr_factors: list[float] = field(default_factory=lambda: [0.01, 0.0001])  # ...lr becomes lr * factor
    crop_pad: int = 4  # random-crop padding, pixels (0 = no crop)
    flip: bool = True  # random horizontal flip
    eval_every: int = 10  # evaluate every N epochs (and after the last)
    budget_images: int | None = None  # if set: rescale epochs, milestones, warm-up, eval to see ~this many images
    linear_probe: bool = False  # train the head only (frozen backbone, BN in eval mode)
    loss: str = "softmax"  # softmax | sigmoid | focal
    beta: float = 0.0  # class-balanced beta, 0 = unweighted
    gamma: float = 0.0  # focal gamma
    many_shot: int = 100  # classes with > many_shot training images are many-shot
    few_shot: int = 20  # classes with < few_shot training images are few-shot
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    amp: bool = True  # bf16 autocast (CUDA only; CPU always fp32)
    channels_last: bool = True  # CUDA only
    image_size: int = 224  # file manifests: side of the training crop and the test centre crop, pixels
    num_workers: int | None = None  # file manifests: loader processes per rank (None = min(8, CPUs per rank))
    compile: bool = False  # torch.compile the training forward/backward (inductor; needs a C compiler on the CPU)
    cuda_graphs: bool = False  # with compile on CUDA: mode "reduce-overhead" (CUDA graphs); ignored on the CPU

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def for_train_size(self, n_train: int) -> TrainConfig:
        """The schedule actually run on ``n_train`` images: with ``budget_images`` set, the
        recipe's epochs (and milestones, warm-up, evaluation period with them) are scaled so
        that training sees about ``budget_images`` images, e.g. equal compute per source."""
        if self.budget_images is None:
            return self
        epochs = max(1, round(self.budget_images / max(1, n_train)))
        f = epochs / self.epochs
        return replace(
            self,
            epochs=epochs,
            milestones=[round(m * f) for m in self.milestones],
            warmup_epochs=self.warmup_epochs * f,
            eval_every=max(1, round(self.eval_every * f)),
            budget_images=None,
        )

    def validate(self) -> None:
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {LOSS_TYPES}, got {self.loss!r}")
        if len(self.milestones) != len(self.lr_factors):
            raise ValueError("milestones and lr_factors must have the same length")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile: true (CUDA graphs come from torch.compile)")
        for name in ("epochs", "batch_size", "eval_every", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Preempted(RuntimeError):
    """Raised after a SIGTERM, once the current step is checkpointed (mid-epoch, resumable exactly)."""


def lr_at(cfg: TrainConfig, epoch: int, it: int, iters_per_epoch: int) -> float:
    """Learning rate at iteration ``it`` of ``epoch``: linear warm-up, then step factors.

    >>> cfg = TrainConfig(lr=0.1, warmup_epochs=1, milestones=[2], lr_factors=[0.01])
    >>> [round(lr_at(cfg, e, 0, 2), 6) for e in range(3)]
    [0.05, 0.1, 0.001]
    """
    t = epoch * iters_per_epoch + it + 1
    warm = cfg.warmup_epochs * iters_per_epoch
    if t <= warm:
        return cfg.lr * t / warm
    factor = 1.0
    for m, f in zip(cfg.milestones, cfg.lr_factors, strict=True):
        if epoch >= m:
            factor = f
    return cfg.lr * factor


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Batched random crop with zero padding and horizontal flip of uint8 ``(B, C, H, W)``."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B,1,H,1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B,1,1,W)
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if flip:
        mask = torch.rand(b, generator=gen, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class _DeviceData:
    """A split of an array store as a uint8 ``(N, 3, H, W)`` tensor on the device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
        self.y = torch.from_numpy(labels.astype(np.int64)).to(device)
        self.labels = labels.astype(np.int64)
        self.device = device

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch: int):
        """``(uint8 images, labels)`` on the device, in order, ``batch`` at a time."""
        for i in range(0, len(self), batch):
            yield self.x[i : i + batch], self.y[i : i + batch]


class _FileData:
    """A split of a file manifest, read through a DataLoader with the test transforms."""

    def __init__(self, files, labels: np.ndarray, size: int, device: torch.device, workers: int) -> None:
        self.files, self.labels, self.size, self.device, self.workers = files, labels.astype(np.int64), size, device, workers

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch: int):
        """``(uint8 images, labels)`` on the device, in order, at most 256 at a time (pixels)."""
        from .loader import eval_batches

        return eval_batches(self.files, self.labels, size=self.size, batch_size=min(batch, 256), device=self.device,
                            workers=self.workers)


def _array_batches(data: _DeviceData, perm: torch.Tensor, gen: torch.Generator, first: int, iters: int,
                   cfg: TrainConfig, rank: int, world: int):
    """This rank's slices of the epoch's augmented global batches, from step ``first`` on."""
    for it in range(first, iters):
        idx = perm[it * cfg.batch_size : (it + 1) * cfg.batch_size]
        xb = augment_batch(data.x[idx], gen, cfg.crop_pad, cfg.flip)
        part = distributed.rank_slice(len(idx), rank, world)
        yield xb[part], data.y[idx[part]]


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = (x.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, data, mean, std, cfg: TrainConfig, batch: int = 1024, k: int = 5) -> np.ndarray:
    """Top-k predicted labels, best first: (N, min(k, C)). ``data``: an array or file split."""
    model.eval()
    cuda = data.device.type == "cuda"
    out = []
    for x, _ in data.batches(batch):
        xb = _normalise(x, mean, std, cuda and cfg.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp):
            logits = model(xb).float()
        out.append(logits.topk(min(k, logits.shape[1]), dim=1).indices)
    return torch.cat(out).cpu().numpy()


def evaluate(model, data, mean, std, cfg: TrainConfig, train_counts: np.ndarray) -> dict:
    topk = predict(model, data, mean, std, cfg)
    labels = data.labels
    out = classification_metrics(topk[:, 0], labels, train_counts, cfg.many_shot, cfg.few_shot)
    out["top5_error"] = float(1.0 - (topk == labels[:, None]).any(axis=1).mean()) if topk.shape[1] >= 5 else None
    return out


def save_state(obj: dict, path: str | Path) -> None:
    """``torch.save`` a dict of state_dicts atomically (checkpoints, model.pt)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# Settings that change speed, not results: a checkpoint written with one value resumes with
# another. torch.compile computes the same function (its fused kernels round differently, as
# another GPU would), so compile on/off runs resume each other's checkpoints.
_SPEED_ONLY = ("compile", "cuda_graphs", "num_workers")


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


def _data_key(cfg: TrainConfig, train_counts: np.ndarray, init_digest: str | None, data: str | None) -> dict:
    """What a checkpoint must have been written for to be resumed: the recipe (less speed-only
    switches), the data's bytes (both splits), the initial weights and the training code."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _SPEED_ONLY}
    return {"cfg": settings, "train_counts": [int(c) for c in train_counts], "init": init_digest or "",
            "data": data or "", "code": code_digest("train")}


def job_key_digest(
    cfg: TrainConfig, train_labels: np.ndarray, num_classes: int, init_digest: str | None, data: str | None
) -> str:
    """sha256 of the resume key: equal for two runs exactly when one may resume the other."""
    cfg = cfg.for_train_size(len(train_labels))
    counts = np.bincount(train_labels, minlength=num_classes)[:num_classes]
    key = _data_key(cfg, counts, init_digest, data)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def resume_extra(
    checkpoint: str | Path, cfg: TrainConfig, train_labels: np.ndarray, num_classes: int, init_digest: str | None,
    data: str | None = None,
) -> dict | None:
    """The ``extra_state`` of a checkpoint that :func:`train` would resume, else ``None``."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        return None
    cfg = cfg.for_train_size(len(train_labels))
    state = load_checkpoint(checkpoint)
    counts = np.bincount(train_labels, minlength=num_classes)[:num_classes]
    if state.get("key") != _data_key(cfg, counts, init_digest, data):
        return None
    return {"epoch": int(state["epoch"]), **json.loads(state.get("extra", "{}"))}


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
) -> dict:
    """Train (or resume) and return ``{"metrics": ..., "history": [...], "model": Classifier, ...}``.

    ``checkpoint`` is resumed when it exists and was written for the same config, the same
    data (``data_digest``, default: :func:`digest_data` of the four arguments), the same
    initial weights and the same training code; otherwise training starts afresh (and a
    finished run on changed data trains and evaluates again). ``init_backbone`` is a backbone
    state_dict to start from (fine-tuning); the head is always new. ``normalisation``
    (``{"mean": [3], "std": [3]}`` in pixel units) defaults to the training set's statistics;
    fine-tuning passes the pretrained model's (file manifests: ImageNet's by default).
    ``train_images``/``test_images`` are uint8 ``(N, H, W, 3)`` arrays or, for a file
    manifest, :class:`~finetail.loader.ImageFiles`. ``extra_state`` (e.g. a
    tracking run id) is stored in the checkpoint and handed back as ``result["extra_state"]``.
    SIGTERM makes the engine checkpoint after the current step (with the epoch's random
    stream, so the rerun continues bit for bit) and raise :class:`Preempted`. A non-finite
    loss or weights raise :class:`finetail.errors.NonFiniteError` naming the epoch and step,
    before anything of that epoch is checkpointed or reported. Under
    ``torchrun`` every rank calls this; ``on_epoch`` runs on rank 0 only, and the returned
    ``metrics`` and ``history`` are the same (global) on every rank.
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
    train_counts = np.bincount(train_labels, minlength=num_classes)[:num_classes]
    if data_digest is None:
        data_digest = digest_data(train_images, train_labels, test_images, test_labels)
    key = _data_key(cfg, train_counts, init_digest, data_digest)
    checkpoint = Path(checkpoint)

    _seed_all(cfg.seed)
    model: Classifier = build_model(cfg.model, num_classes, cfg.width, cfg.weights)
    if init_backbone is not None:
        model.backbone.load_state_dict(init_backbone)
    start_backbone = state_digest(model.backbone.state_dict())
    init_head_bias(model, cfg.loss)
    if cfg.linear_probe:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    model.to(dev)
    if dev.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = ClassBalancedLoss(np.maximum(train_counts, 1), cfg.loss, cfg.beta, cfg.gamma).to(dev)
    opt = torch.optim.SGD(
        param_groups(model, cfg.weight_decay, decay_head_bias=cfg.loss == "softmax"),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
    )

    # The loader (and torchvision with it, 1.5 s to import) only for file manifests.
    files = not isinstance(train_images, np.ndarray)
    if files:
        from .loader import IMAGENET_NORMALISATION, ImageFiles, TrainBatches, default_workers

        if not isinstance(train_images, ImageFiles):
            raise TypeError(f"training images must be a uint8 array or loader.ImageFiles, not {type(train_images)}")
        workers = default_workers() if cfg.num_workers is None else cfg.num_workers
        tr = TrainBatches(train_images, train_labels, size=cfg.image_size, batch_size=cfg.batch_size, seed=cfg.seed,
                          flip=cfg.flip, device=dev, workers=workers)
        te = _FileData(test_images, test_labels, cfg.image_size, dev, workers)
        normalisation = normalisation or IMAGENET_NORMALISATION
    else:
        tr = _DeviceData(train_images, train_labels, dev)
        te = _DeviceData(test_images, test_labels, dev)
    n_train = len(train_labels)
    if normalisation is not None:
        mean = torch.tensor(normalisation["mean"], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(normalisation["std"], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    else:
        mean = tr.x.float().mean(dim=(0, 2, 3), keepdim=True)
        std = tr.x.float().std(dim=(0, 2, 3), keepdim=True).clamp_min(1.0)

    start_epoch, history = 0, []
    extra = dict(extra_state or {})
    mid: dict | None = None  # a mid-epoch resume point (written on SIGTERM)
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"]) + 1
            history = json.loads(state["history"])
            extra = {**json.loads(state.get("extra", "{}")), **extra}
            where = f"epoch {start_epoch}"
            if "mid_iter" in state:
                mid = {"iter": int(state["mid_iter"]), "gen": state["mid_gen"], "totals": state["mid_totals"]}
                where += f", iteration {mid['iter']}"
            log(f"resuming from checkpoint {checkpoint} at {where} of {cfg.epochs} epochs")
        else:
            log(f"checkpoint {checkpoint} was written for other settings or data: starting afresh")
    net: nn.Module = model  # what the training steps call: the model, or its DDP wrapper
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        # Training steps run the compiled module; evaluation and checkpoints use ``model``
        # itself, so state_dicts carry no ``_orig_mod.`` prefix.
        net = torch.compile(net, mode="reduce-overhead" if cfg.cuda_graphs and dev.type == "cuda" else None)

    stop = {"flag": False}
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    except ValueError:  # not the main thread
        previous = None

    def save(epoch: int, mid_epoch: dict | None = None) -> None:
        """``epoch`` = the last finished epoch; ``mid_epoch`` = where in the next one we stopped.
        Rank 0 writes; the others have the same state."""
        if not main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "cfg": json.dumps(asdict(cfg)),
            "key": key,
            "history": json.dumps(history),
            "extra": json.dumps(extra),
        }
        if mid_epoch is not None:
            state.update(mid_iter=mid_epoch["iter"], mid_gen=mid_epoch["gen"], mid_totals=mid_epoch["totals"])
        save_state(state, checkpoint)

    iters = distributed.steps_per_epoch(n_train, cfg.batch_size, world)
    seen = min(n_train, iters * cfg.batch_size)  # images an epoch trains on (all of them when W = 1)
    cuda = dev.type == "cuda"
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, unit="epoch", dynamic_ncols=True)
    metrics: dict = history[-1]["eval"] if history and "eval" in history[-1] else {}
    if main:  # bench/startup.py times the job's start-up up to this line
        log(f"training from epoch {start_epoch + 1} of {cfg.epochs}: {n_train} images, {iters} steps per epoch")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + epoch)
            net.train()
            if cfg.linear_probe:
                model.backbone.eval()
            t0 = time.perf_counter()
            perm = None if files else torch.randperm(n_train, generator=gen, device=dev)
            total_loss = torch.zeros((), device=dev)
            total_hit = torch.zeros((), device=dev)
            first_bad = torch.full((), -1, dtype=torch.int64, device=dev)  # first non-finite step, no sync
            first = 0
            if mid is not None:  # continue the interrupted epoch exactly where it stopped
                first = mid["iter"]
                gen.set_state(mid["gen"])
                if main:  # the saved totals are global: count them once
                    total_loss += mid["totals"][0].to(total_loss.dtype)
                    total_hit += mid["totals"][1].to(total_hit.dtype)
                mid = None
            batches = tr.epoch(epoch, first) if files else _array_batches(tr, perm, gen, first, iters, cfg, rank, world)
            wait = 0.0  # seconds this rank waited for its batches
            for it in range(first, iters):
                tw = time.perf_counter()
                xb, yb = next(batches)
                wait += time.perf_counter() - tw
                n_global = min(cfg.batch_size, n_train - it * cfg.batch_size)
                xb = _normalise(xb, mean, std, cuda and cfg.channels_last)
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, epoch, it, iters)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp):
                    logits = net(xb)
                loss = loss_fn(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                (loss * (world * len(yb) / n_global) if world > 1 else loss).backward()
                opt.step()
                total_loss += loss.detach() * len(yb)
                total_hit += (logits.argmax(1) == yb).sum()
                bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad, torch.full_like(first_bad, it), first_bad)
                if distributed.any_rank(stop["flag"], dev) and it + 1 < iters:
                    _check_finite(model, first_bad, epoch, it + 1, iters)  # never checkpoint NaN weights
                    # SIGTERM (Slurm's warning before a kill): checkpoint this very step,
                    # with the epoch's random stream, so a rerun continues bit for bit.
                    totals = torch.stack([total_loss.detach(), total_hit.detach().to(total_loss.dtype)])
                    totals = distributed.all_reduce_sum(totals).cpu()
                    save(epoch - 1, {"iter": it + 1, "gen": gen.get_state(), "totals": totals})
                    distributed.barrier()  # no rank exits before the checkpoint is written
                    log(f"SIGTERM received: checkpointed epoch {epoch + 1} at iteration {it + 1} of {iters}; exiting")
                    raise Preempted(f"preempted during epoch {epoch}")
            _check_finite(model, first_bad, epoch, iters, iters)
            sums = distributed.all_reduce_sum(torch.stack([total_loss, total_hit.to(total_loss.dtype)]))
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row = {
                "epoch": epoch,
                "train_loss": float(sums[0]) / seen,
                "train_acc": float(sums[1]) / seen,
                "lr": lr_at(cfg, epoch, iters - 1, iters),
                "images_per_s": seen / dt,
                "data_wait_frac": wait / dt,  # rank 0's
            }
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics = distributed.broadcast_object(
                    evaluate(model, te, mean, std, cfg, train_counts) if main else None
                )
                row["eval"] = metrics
                row["test_top1_error"] = metrics["top1_error"]
                row["test_balanced_acc"] = metrics["balanced_acc"]
            history.append(row)
            # Report before checkpointing: a kill in between replays this epoch (same values
            # under deterministic settings) rather than losing its metrics for good.
            if on_epoch is not None and main:
                on_epoch(epoch, {k: v for k, v in row.items() if isinstance(v, float)})
            stopping = distributed.any_rank(stop["flag"], dev)
            save(epoch)
            if stopping:
                distributed.barrier()
                log(f"SIGTERM received: checkpointed the end of epoch {epoch + 1}; exiting")
                raise Preempted(f"preempted after epoch {epoch}")
            msg = (f"epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} {row['images_per_s']:.0f} img/s, "
                   f"{100 * row['data_wait_frac']:.0f}% waiting for data")
            if "eval" in row:
                msg += f" test err {100 * metrics['top1_error']:.2f}%"
            if bar is not None:
                bar.set_postfix_str(msg)
                bar.update(1)
            elif main:
                log(msg)
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not metrics:
        metrics = distributed.broadcast_object(evaluate(model, te, mean, std, cfg, train_counts) if main else None)
    return {
        "metrics": metrics,
        "history": history,
        "model": model,
        "train_counts": train_counts,
        "normalisation": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
        "extra_state": extra,
        "device": str(dev),
        "world_size": world,
        "start_backbone_sha256": start_backbone,
        "epochs": cfg.epochs,
    }
