"""Where a training job's images come from: one interface, two sources.

Small images (an array store) live on the training device as uint8 ``(N, 3, H, W)``
tensors; random crop (zero padding) and horizontal flip run batched on that device
(:func:`augment_batch`). Every random draw of epoch ``e`` (the epoch's order, then the
augmentation of each batch in turn) comes from the epoch's generator, seeded by
``(seed, e)`` by the loop, so an epoch resumed at step ``i`` with the generator's saved state
replays exactly what an uninterrupted run does. The order is a permutation of the training
set, or with the recipe's ``sampler`` a class-resampled epoch of the same length
(:mod:`.sampling`).

Large images come from a file manifest instead (``train_images``/``test_images`` given as
:class:`finetail.loader.ImageFiles`): a DataLoader decodes and augments them
(RandomResizedCrop to ``image_size`` + flip; test: resize + centre crop), as described in
:mod:`finetail.loader`, with the same epoch order and exact (mid-epoch too) resume; its
default normalisation is ImageNet's statistics (:data:`finetail.models.IMAGENET_NORMALISATION`).

Under DDP (world size W > 1) every rank draws the same permutation and augmentation of each
global batch of ``batch_size`` images and yields its own contiguous slice of it
(:func:`finetail.distributed.rank_slice`); a last partial batch smaller than W is dropped.

Both sources implement :class:`BatchSource`; the training loop sees only that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from .. import distributed
from .recipe import TrainConfig
from .sampling import class_quotas, epoch_order

__all__ = ["ArrayBatches", "BatchSource", "FileBatches", "augment_batch", "batch_source", "plain_batches"]

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 (B, 3, H, W) images and int64 (B,) labels, on the device


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


class BatchSource(ABC):
    """Both splits of a job's data, as the training loop and evaluation read them."""

    device: torch.device
    train_labels: np.ndarray  # int64 (N_train,)
    test_labels: np.ndarray  # int64 (N_test,)

    @abstractmethod
    def epoch(self, epoch: int, gen: torch.Generator, first: int = 0,
              resume_state: torch.Tensor | None = None) -> Iterator[Batch]:
        """This rank's slices of epoch ``epoch``'s augmented global batches, from step ``first``
        on. ``gen`` is the epoch's generator, just seeded; ``resume_state`` is the state it had
        at step ``first`` when an interrupted epoch was checkpointed (None: a fresh epoch)."""

    @abstractmethod
    def test_batches(self, batch: int) -> Iterator[Batch]:
        """The test split, in order, unaugmented."""

    @abstractmethod
    def default_normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each ``(1, 3, 1, 1)`` float32 on the device in pixel units, used when
        the job gives none."""


def normalisation_tensors(norm: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``{"mean": [3], "std": [3]}`` as ``(1, 3, 1, 1)`` float32 tensors on ``device``."""
    mean = torch.tensor(norm["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


class ArrayBatches(BatchSource):
    """Both splits of an array store as uint8 ``(N, 3, H, W)`` tensors on the device."""

    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, cfg: TrainConfig, device: torch.device, rank: int, world: int) -> None:
        self.device, self.cfg, self.rank, self.world = device, cfg, rank, world
        self.x, self.y = self._to_device(train_images, train_labels)
        self.test_x, self.test_y = self._to_device(test_images, test_labels)
        self.train_labels, self.test_labels = train_labels.astype(np.int64), test_labels.astype(np.int64)
        self.iters = distributed.steps_per_epoch(len(self.y), cfg.batch_size, world)
        self.quotas = None if cfg.sampler == "instance" else torch.as_tensor(
            class_quotas(np.bincount(self.train_labels), cfg.sampler), device=device)

    def _to_device(self, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        return x, torch.from_numpy(labels.astype(np.int64)).to(self.device)

    def epoch(self, epoch, gen, first=0, resume_state=None):
        # The order is the epoch's first draw, made before a resumed epoch's generator state
        # is restored (that state was saved after it), so it is the same either way.
        perm = epoch_order(self.y, self.cfg.sampler, gen, self.quotas)
        if resume_state is not None:
            gen.set_state(resume_state)
        return self._slices(perm, gen, first)

    def _slices(self, perm: torch.Tensor, gen: torch.Generator, first: int) -> Iterator[Batch]:
        bs = self.cfg.batch_size
        for it in range(first, self.iters):
            idx = perm[it * bs : (it + 1) * bs]
            xb = augment_batch(self.x[idx], gen, self.cfg.crop_pad, self.cfg.flip)
            part = distributed.rank_slice(len(idx), self.rank, self.world)
            yield xb[part], self.y[idx[part]]

    def test_batches(self, batch):
        for i in range(0, len(self.test_y), batch):
            yield self.test_x[i : i + batch], self.test_y[i : i + batch]

    def default_normalisation(self):
        """The training set's per-channel mean and std (std at least one pixel level)."""
        mean = self.x.float().mean(dim=(0, 2, 3), keepdim=True)
        std = self.x.float().std(dim=(0, 2, 3), keepdim=True).clamp_min(1.0)
        return mean, std


class FileBatches(BatchSource):
    """Both splits of a file manifest, read through :mod:`finetail.loader`'s DataLoaders."""

    def __init__(self, train_files, train_labels: np.ndarray, test_files, test_labels: np.ndarray,
                 cfg: TrainConfig, device: torch.device) -> None:
        # The loader (and torchvision with it, 1.5 s to import) only for file manifests.
        from ..loader import TrainBatches, default_workers

        self.device, self.cfg, self.test_files = device, cfg, test_files
        self.workers = default_workers() if cfg.num_workers is None else cfg.num_workers
        self.train_labels, self.test_labels = train_labels.astype(np.int64), test_labels.astype(np.int64)
        self.train = TrainBatches(train_files, train_labels, size=cfg.image_size, batch_size=cfg.batch_size,
                                  seed=cfg.seed, flip=cfg.flip, device=device, workers=self.workers,
                                  sampler=cfg.sampler)

    def epoch(self, epoch, gen, first=0, resume_state=None):
        # The loader seeds its own draws by (seed, epoch, image); ``gen`` is only carried along,
        # so that a checkpoint's state means the same on both paths.
        if resume_state is not None:
            gen.set_state(resume_state)
        return self.train.epoch(epoch, first)

    def test_batches(self, batch):
        """At most 256 images at a time (pixels, not the array path's tiny images)."""
        from ..loader import eval_batches

        return eval_batches(self.test_files, self.test_labels, size=self.cfg.image_size, batch_size=min(batch, 256),
                            device=self.device, workers=self.workers)

    def default_normalisation(self):
        from ..models import IMAGENET_NORMALISATION

        return normalisation_tensors(IMAGENET_NORMALISATION, self.device)


def batch_source(train_images, train_labels: np.ndarray, test_images, test_labels: np.ndarray, cfg: TrainConfig,
                 device: torch.device, rank: int, world: int) -> BatchSource:
    """:class:`ArrayBatches` for uint8 ``(N, H, W, 3)`` arrays, :class:`FileBatches` for
    :class:`finetail.loader.ImageFiles`."""
    if isinstance(train_images, np.ndarray):
        return ArrayBatches(train_images, train_labels, test_images, test_labels, cfg, device, rank, world)
    from ..loader import ImageFiles

    if not isinstance(train_images, ImageFiles):
        raise TypeError(f"training images must be a uint8 array or loader.ImageFiles, not {type(train_images)}")
    return FileBatches(train_images, train_labels, test_images, test_labels, cfg, device)


def plain_batches(images, labels: np.ndarray, cfg: TrainConfig, device: torch.device,
                  batch: int = 1024) -> Iterator[Batch]:
    """Any split's images in order, unaugmented, read as the engine reads the test split:
    uint8 ``(N, H, W, 3)`` arrays a batch at a time onto the device (the same bytes as
    :meth:`ArrayBatches.test_batches`), or :class:`finetail.loader.ImageFiles` resized and
    centre-cropped to ``cfg.image_size`` (:meth:`FileBatches.test_batches`)."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if isinstance(images, np.ndarray):
        for i in range(0, len(y), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2).contiguous()
            yield x.to(device), y[i : i + batch].to(device)
        return
    from ..loader import default_workers, eval_batches

    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    yield from eval_batches(images, np.asarray(labels, dtype=np.int64), size=cfg.image_size,
                            batch_size=min(batch, 256), device=device, workers=workers)
