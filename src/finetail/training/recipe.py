"""The training recipe: one typed dataclass, its schedule, and the constants it names.

Imports neither torch nor numpy, so the config check (:mod:`finetail.config`) and anything
else that only reads or validates a recipe stays cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

__all__ = ["CBLOSS_PAPER_RECIPE", "FEW_SHOT", "LOSS_TYPES", "MANY_SHOT", "SPEED_ONLY", "TrainConfig", "lr_at", "recipe_differences"]

LOSS_TYPES = ("softmax", "sigmoid", "focal")

# Shot groups of the long-tail literature (Liu et al. 2019): a class with more than MANY_SHOT
# training images is many-shot, one with fewer than FEW_SHOT few-shot, the rest medium-shot.
MANY_SHOT = 100
FEW_SHOT = 20

# Settings that change speed, not results: a checkpoint written with one value resumes with
# another. torch.compile computes the same function (its fused kernels round differently, as
# another GPU would), so compile on/off runs resume each other's checkpoints.
SPEED_ONLY = ("compile", "cuda_graphs", "num_workers")


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
    many_shot: int = MANY_SHOT  # classes with > many_shot training images are many-shot
    few_shot: int = FEW_SHOT  # classes with < few_shot training images are few-shot
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


# The CB-loss paper's CIFAR recipe (Cui et al. 2019, section 5.2): ResNet-32, SGD momentum 0.9,
# batch 128, 200 epochs, lr 0.1 with 5 warm-up epochs, x0.01 at 160 and x0.0001 at 180,
# weight decay 2e-4, 4-pixel pad-crop and flips, fp32.
CBLOSS_PAPER_RECIPE = {
    "model": "resnet32", "width": 16, "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
    "weight_decay": 2e-4, "warmup_epochs": 5, "milestones": [160, 180], "lr_factors": [0.01, 0.0001],
    "crop_pad": 4, "flip": True, "amp": False, "budget_images": None, "linear_probe": False,
}


def recipe_differences(recipe: dict, paper: dict = CBLOSS_PAPER_RECIPE) -> list[str]:
    """How a recipe differs from the paper's, as ``"epochs 15 ≠ 200"`` (empty: it is the paper's)."""
    base = TrainConfig()
    cfg = {**{f.name: getattr(base, f.name) for f in fields(TrainConfig)}, **recipe}
    out = []
    for key, want in paper.items():
        have = cfg.get(key)
        if have != want and not (isinstance(want, float) and isinstance(have, int | float) and abs(have - want) < 1e-12):
            out.append(f"{key} {have} ≠ {want}")
    return out
