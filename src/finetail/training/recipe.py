"""The training recipe: one typed dataclass, its schedule, and the constants it names.

Imports neither torch nor numpy, so the config check (:mod:`finetail.config`) and anything
else that only reads or validates a recipe stays cheap to import.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

__all__ = [
    "ADDED_SETTINGS",
    "CBLOSS_CIFAR_RECIPE",
    "CB_LOSS_TYPES",
    "DIV128_NORMALISATION",
    "DRW_BETA",
    "FEW_SHOT",
    "INITS",
    "INPUT_NORMS",
    "LOSS_KEYS",
    "LOSS_TYPES",
    "MANY_SHOT",
    "LONGTAIL_CIFAR_RECIPE",
    "PAPER_RECIPES",
    "PLUGIN_FIELDS",
    "POSTHOC_METHODS",
    "POSTHOC_PLUGIN",
    "SAMPLERS",
    "SHORTCUTS",
    "SOFTMAX_LOSSES",
    "SPEED_ONLY",
    "PaperMatch",
    "TrainConfig",
    "crt_spec",
    "key_settings",
    "lr_at",
    "paper_recipe",
    "precision",
]

# The losses of the class-balanced loss paper (finetail.losses.ClassBalancedLoss).
CB_LOSS_TYPES = ("softmax", "sigmoid", "focal")
# Every loss the engine trains with: the class-balanced ones, then the later long-tail
# methods (LDAM, Cao et al. 2019; balanced softmax, Ren et al. 2020; logit-adjusted, Menon et
# al. 2021). See finetail.losses.
# "plugin": a researcher's own loss (finetail.plugins), named in the study file.
LOSS_TYPES = (*CB_LOSS_TYPES, "ldam", "balanced_softmax", "logit_adjusted", "plugin")
# Losses whose model of the class probabilities is a softmax over the logits (the others,
# sigmoid and focal, train one sigmoid per class). A plugin loss's is, by its contract.
SOFTMAX_LOSSES = ("softmax", "ldam", "balanced_softmax", "logit_adjusted", "plugin")
# The keys a loss setting ({"type": ..., ...}, the config's cbloss.losses) may carry besides
# its type, by type. beta and gamma at 0 are accepted by every type (the schema's defaults).
LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "softmax": ("beta", "drw_epoch"),
    "sigmoid": ("beta",),
    "focal": ("beta", "gamma"),
    "ldam": ("max_margin", "scale", "drw_epoch", "beta"),
    "balanced_softmax": (),
    "logit_adjusted": ("tau",),
    # the plugin's name, its parameters, and its head (which the training job reads from the plugin)
    "plugin": ("plugin", "params", "head"),
}
# A plugin loss setting's keys as TrainConfig fields.
PLUGIN_FIELDS = {"plugin": "plugin", "params": "plugin_params", "head": "plugin_head"}
# The beta of deferred re-weighting's class-balanced weights when a setting gives none
# (Cao et al.'s LDAM-DRW).
DRW_BETA = 0.9999
# How an epoch's images are drawn (finetail.training.sampling): "instance" = a permutation
# of the training set; "sqrt" = class j with probability proportional to sqrt(n_j), then an
# image of it; "class_balanced" = every class equally likely, then an image of it.
SAMPLERS = ("instance", "sqrt", "class_balanced")
# Post-hoc corrections of a trained softmax model (finetail.posthoc): Kang et al.'s
# tau-normalised classifier, Menon et al.'s logit adjustment.
POSTHOC_METHODS = ("tau_norm", "logit_adjust")
# A post-hoc plugin's method (finetail.plugins): a researcher's own correction.
POSTHOC_PLUGIN = "plugin"

# Choices where the CB-loss reference code (github.com/richardaecn/class-balanced-loss, src/,
# TensorFlow) differs from ours; ours first (the default), the reference's second.
# Downsampling shortcut of the CIFAR ResNets: both are parameter-free (option A of He et al.):
# "subsample" keeps every stride-th pixel, "avgpool" averages stride x stride windows (the
# reference's model_base._residual_v1), then both zero-pad the new channels.
SHORTCUTS = ("subsample", "avgpool")
# Weight initialisation of the CIFAR ResNets: "kaiming" = conv kernels He-normal (fan_out,
# ReLU gain), head kernel PyTorch's Linear default; "glorot" = conv and head kernels
# Glorot-uniform, what the reference's tf.layers.conv2d/dense get (no kernel_initializer,
# so TF 1's get_variable default, glorot_uniform_initializer). Biases: see init_head_bias.
INITS = ("kaiming", "glorot")
# Input scaling when no pretrained model's normalisation is given: "dataset" = per-channel
# mean and std of the training set (array stores) or ImageNet's (file manifests); "div128" =
# x / 128 - 1 for every channel, the reference's cifar_model.forward_pass.
INPUT_NORMS = ("dataset", "div128")
# "div128" as a normalisation: (x - 128) / 128 = x / 128 - 1, exactly (powers of two).
DIV128_NORMALISATION = {"mean": [128.0, 128.0, 128.0], "std": [128.0, 128.0, 128.0]}

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
    shortcut: str = "subsample"  # CIFAR ResNets' downsampling shortcut: subsample | avgpool (SHORTCUTS)
    init: str = "kaiming"  # CIFAR ResNets' weight initialisation: kaiming | glorot (INITS)
    input_norm: str = "dataset"  # input scaling without a pretrained model's: dataset | div128 (INPUT_NORMS)
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
    loss: str = "softmax"  # one of LOSS_TYPES
    beta: float = 0.0  # class-balanced beta, 0 = unweighted (with drw_epoch: the deferred weights' beta)
    gamma: float = 0.0  # focal gamma
    max_margin: float = 0.5  # LDAM: the largest class margin (of the rarest class), in cosine units
    scale: float = 30.0  # LDAM: the logits the softmax sees are scale * cosine
    tau: float = 1.0  # logit-adjusted loss: the weight of the log prior
    drw_epoch: int | None = None  # softmax, LDAM: 0-based epoch from which class-balanced weights apply (None: never)
    plugin: str | None = None  # loss "plugin": an entry point of finetail.losses or module:callable (finetail.plugins)
    plugin_params: dict | None = None  # ... the keyword arguments it is called with
    plugin_head: str = "linear"  # ... the head it needs: linear | normed (the plugin says which)
    sampler: str = "instance"  # instance | sqrt | class_balanced (SAMPLERS)
    holdout: float = 0.0  # fraction of each class's training images kept out of training (post-hoc tau choice)
    many_shot: int = MANY_SHOT  # classes with > many_shot training images are many-shot
    few_shot: int = FEW_SHOT  # classes with < few_shot training images are few-shot
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    amp: bool = True  # bf16 autocast on CUDA (and on the CPU with cpu_bf16)
    channels_last: bool = True  # channels-last tensors on CUDA
    cpu_bf16: bool = False  # with amp: bf16 autocast on the CPU too (fast where it has AVX512-BF16 or AMX)
    cpu_channels_last: bool = False  # channels-last tensors on the CPU
    image_size: int = 224  # file manifests: side of the training crop and the test centre crop, pixels
    num_workers: int | None = None  # file manifests: loader processes per rank (None = min(8, CPUs per rank))
    compile: bool = False  # torch.compile the training forward/backward (inductor; needs a C compiler on the CPU)
    cuda_graphs: bool = False  # with compile on CUDA: mode "reduce-overhead" (CUDA graphs); ignored on the CPU

    @property
    def head(self) -> str:
        """The classifier head the loss needs: ``"normed"`` (cosine, no bias) for LDAM, else
        ``"linear"`` (see :func:`finetail.models.build_model`)."""
        if self.loss == "plugin":
            return self.plugin_head
        return "normed" if self.loss == "ldam" else "linear"

    @classmethod
    def from_spec(cls, spec: dict) -> TrainConfig:
        """The recipe of a training job's spec ``{"recipe": {...}, "loss": {"type": ..., ...},
        "shots": {"many", "few"}}`` (``finetail train --spec``). A loss setting carries the keys
        :data:`LOSS_KEYS` lists for its type (``beta`` and ``gamma`` at 0 go with any type);
        a DRW setting without ``beta`` gets :data:`DRW_BETA`.

        >>> cfg = TrainConfig.from_spec({"loss": {"type": "ldam", "drw_epoch": 160}})
        >>> cfg.loss, cfg.drw_epoch, cfg.beta, cfg.head
        ('ldam', 160, 0.9999, 'normed')
        """
        loss = dict(spec.get("loss", {"type": "softmax"}))
        kind = loss.pop("type", None)
        if kind not in LOSS_KEYS:
            raise ValueError(f"loss type must be one of {LOSS_TYPES}, got {kind!r}")
        for key, value in loss.items():
            if key not in LOSS_KEYS[kind] and not (key in ("beta", "gamma") and value == 0):
                allowed = ", ".join(LOSS_KEYS[kind]) or "nothing besides its type"
                raise ValueError(f"loss {kind!r} takes no {key!r} (it takes {allowed})")
        if loss.get("drw_epoch") is not None and "beta" not in loss:
            loss["beta"] = DRW_BETA
        if kind == "plugin":
            loss = {PLUGIN_FIELDS.get(k, k): v for k, v in loss.items()}
        shots = spec.get("shots", {})
        return cls.from_dict({**spec.get("recipe", {}), "loss": kind, **loss,
                              "many_shot": shots.get("many", MANY_SHOT), "few_shot": shots.get("few", FEW_SHOT)})

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
            drw_epoch=None if self.drw_epoch is None else round(self.drw_epoch * f),
            budget_images=None,
        )

    def validate(self) -> None:
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {LOSS_TYPES}, got {self.loss!r}")
        if len(self.milestones) != len(self.lr_factors):
            raise ValueError("milestones and lr_factors must have the same length")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        for name, allowed in (("shortcut", SHORTCUTS), ("init", INITS), ("input_norm", INPUT_NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.model.startswith("tv:"):
            for name, default in (("shortcut", SHORTCUTS[0]), ("init", INITS[0])):
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: {getattr(self, name)!r} applies to the CIFAR ResNets only, "
                                     f"not {self.model!r}; leave it at {default!r}")
        self._validate_loss()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile: true (CUDA graphs come from torch.compile)")
        for name in ("epochs", "batch_size", "eval_every", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


    def _validate_loss(self) -> None:
        """Each loss setting applies to the losses that use it; a value it does not use is an
        error, not ignored."""
        loss = self.loss
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.gamma != 0 and loss != "focal":
            raise ValueError(f"gamma={self.gamma} only applies to the focal loss, not {loss!r}")
        if self.beta != 0 and loss in ("balanced_softmax", "logit_adjusted"):
            raise ValueError(f"beta={self.beta} does not apply to the {loss} loss (its prior already balances)")
        if self.drw_epoch is not None:
            if loss not in ("softmax", "ldam"):
                raise ValueError(f"drw_epoch applies to the softmax and LDAM losses, not {loss!r}")
            if self.drw_epoch < 0:
                raise ValueError(f"drw_epoch must be >= 0, got {self.drw_epoch}")
            if self.beta == 0:
                raise ValueError(f"drw_epoch={self.drw_epoch} with beta 0 re-weights nothing (every weight is 1); "
                                 f"give the deferred weights' beta ({DRW_BETA} in Cao et al.)")
        elif loss == "ldam" and self.beta != 0:
            raise ValueError("beta of the LDAM loss is the deferred weights' beta: give drw_epoch too "
                             "(drw_epoch: 0 weights from the first epoch)")
        if loss == "ldam" and not (self.max_margin > 0 and self.scale > 0):
            raise ValueError(f"LDAM needs max_margin > 0 and scale > 0, got {self.max_margin} and {self.scale}")
        for name in ("max_margin", "scale", "tau"):
            own = {"max_margin": "ldam", "scale": "ldam", "tau": "logit_adjusted"}[name]
            if loss != own and getattr(self, name) != ADDED_SETTINGS[name]:
                raise ValueError(f"{name} applies to the {own} loss only, not {loss!r}")
        if not math.isfinite(self.tau):
            raise ValueError(f"tau must be finite, got {self.tau}")
        self._validate_plugin()

    def _validate_plugin(self) -> None:
        if self.loss != "plugin":
            for name in ("plugin", "plugin_params", "plugin_head"):
                if getattr(self, name) != ADDED_SETTINGS[name]:
                    raise ValueError(f"{name} applies to a plugin loss only, not {self.loss!r}")
            return
        if not isinstance(self.plugin, str) or not self.plugin:
            raise ValueError("a plugin loss needs plugin: an entry point of finetail.losses or module:callable")
        if self.plugin_params is not None and not isinstance(self.plugin_params, dict):
            raise ValueError(f"a plugin loss's params are a mapping, got {self.plugin_params!r}")
        if self.plugin_head not in ("linear", "normed"):
            raise ValueError(f"plugin_head must be linear or normed, got {self.plugin_head!r}")
        if self.beta != 0:
            raise ValueError(f"beta={self.beta} does not apply to a plugin loss (give the plugin its own params)")


# Settings added after the first results were recorded, with the value that leaves training
# as it was. At that value a setting is left out of the resume key (key_settings), so every
# earlier recipe keeps its key and its checkpoints.
ADDED_SETTINGS: dict[str, Any] = {
    "max_margin": 0.5,
    "scale": 30.0,
    "tau": 1.0,
    "drw_epoch": None,
    "sampler": "instance",
    "holdout": 0.0,
    "cpu_bf16": False,  # the CPU's precision and memory format: they change the floats a run computes
    "cpu_channels_last": False,
    "plugin": None,
    "plugin_params": None,
    "plugin_head": "linear",
}


def key_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe as a resume key holds it: every setting but the speed-only switches
    (:data:`SPEED_ONLY`) and the :data:`ADDED_SETTINGS` at their neutral values.

    >>> sorted(set(asdict(TrainConfig())) - set(key_settings(TrainConfig())))[:5]
    ['compile', 'cpu_bf16', 'cpu_channels_last', 'cuda_graphs', 'drw_epoch']
    """
    return {k: v for k, v in asdict(cfg).items()
            if k not in SPEED_ONLY and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}


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


def precision(cfg: TrainConfig, device_type: str) -> str:
    """What the training and evaluation forward passes compute in: ``"bf16"`` (autocast) when
    ``cfg.amp`` is on and the device is CUDA, or the CPU with ``cfg.cpu_bf16``; else ``"fp32"``.

    >>> precision(TrainConfig(amp=True), "cpu"), precision(TrainConfig(amp=True), "cuda")
    ('fp32', 'bf16')
    >>> precision(TrainConfig(amp=True, cpu_bf16=True), "cpu"), precision(TrainConfig(amp=False, cpu_bf16=True), "cpu")
    ('bf16', 'fp32')
    """
    on = cfg.amp and (device_type == "cuda" or (device_type == "cpu" and cfg.cpu_bf16))
    return "bf16" if on else "fp32"


def channels_last(cfg: TrainConfig, device_type: str) -> bool:
    """Whether the model and its input batches use the channels-last memory format: on CUDA
    with ``cfg.channels_last``, on the CPU with ``cfg.cpu_channels_last``.

    >>> channels_last(TrainConfig(), "cuda"), channels_last(TrainConfig(), "cpu")
    (True, False)
    """
    return cfg.channels_last if device_type == "cuda" else device_type == "cpu" and cfg.cpu_channels_last


# The CB-loss paper's CIFAR-LT recipe (Cui et al., CVPR 2019, section 5.2, and the reference
# scripts cifar_im_trainval*.sh with cifar_main.py's defaults): ResNet-32, 200 epochs of batch
# 128, SGD momentum 0.9 (not Nesterov), weight decay 2e-4, lr 0.1 with a linear warm-up over
# 5 epochs, x0.01 from epoch 160 and x0.0001 from 180, pad-4 crop + flip, fp32, and the
# reference code's shortcut, initialisation and input scaling. Keys not named here (seed,
# eval_every, speed switches, image_size of file manifests) do not change what is trained.
CBLOSS_CIFAR_RECIPE: dict[str, Any] = {
    "model": "resnet32",
    "width": 16,
    "weights": None,
    "shortcut": "avgpool",
    "init": "glorot",
    "input_norm": "div128",
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 2e-4,
    "warmup_epochs": 5.0,
    "milestones": [160, 180],
    "lr_factors": [0.01, 0.0001],
    "crop_pad": 4,
    "flip": True,
    "budget_images": None,
    "linear_probe": False,
    "amp": False,
}

# The later long-tail papers' CIFAR-LT recipe (Cao et al. 2019's LDAM-DRW code, which Ren et
# al. 2020, Menon et al. 2021 and the BagofTricks-LT reproductions reuse): the CB paper's
# schedule in PyTorch, with its defaults where the CB reference code differs (option-A
# subsampling shortcut, He-normal convolutions, inputs normalised by the training set's mean
# and std), every image of the training set, drawn as a shuffle.
LONGTAIL_CIFAR_RECIPE: dict[str, Any] = {
    **CBLOSS_CIFAR_RECIPE,
    "shortcut": "subsample",
    "init": "kaiming",
    "input_norm": "dataset",
    "sampler": "instance",
    "holdout": 0.0,
}

PAPER_RECIPES: dict[str, dict[str, Any]] = {"cbloss_cifar": CBLOSS_CIFAR_RECIPE, "longtail_cifar": LONGTAIL_CIFAR_RECIPE}


class PaperMatch(NamedTuple):
    """Whether a recipe is a paper's (``is_paper``) and, if not, how it differs: one
    ``"key ours ≠ paper's"`` string per differing key, in the paper recipe's key order."""

    is_paper: bool
    differences: list[str]

    def reason(self) -> str:
        """``"epochs 15 ≠ 200, batch_size 64 ≠ 128"`` (empty when it is the paper's recipe)."""
        return ", ".join(self.differences)


def _same(ours: Any, paper: Any) -> bool:
    if isinstance(paper, list):
        return isinstance(ours, list | tuple) and len(ours) == len(paper) and all(map(_same, ours, paper))
    if isinstance(paper, bool) or paper is None or isinstance(paper, str):
        return ours == paper and type(ours) is type(paper)
    return isinstance(ours, int | float) and not isinstance(ours, bool) and float(ours) == float(paper)


def show_value(v: Any) -> str:
    """A recipe value as a config file spells it: ``null``, ``true``, ``0.1``, ``[160, 180]``."""
    if v is None or isinstance(v, bool):
        return "null" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(map(show_value, v)) + "]"
    return str(v)


def paper_recipe(recipe: dict, paper: str = "cbloss_cifar") -> PaperMatch:
    """Whether ``recipe`` (a study's recipe mapping, e.g. ``cbloss.recipe``; keys it leaves
    out take :class:`TrainConfig`'s defaults, as the schema fills them) is the paper's
    recipe ``paper`` (a key of :data:`PAPER_RECIPES`), and every key where it is not.

    >>> paper_recipe(CBLOSS_CIFAR_RECIPE).is_paper
    True
    >>> paper_recipe({**CBLOSS_CIFAR_RECIPE, "epochs": 15, "amp": True}).reason()
    'epochs 15 ≠ 200, amp true ≠ false'
    """
    if paper not in PAPER_RECIPES:
        raise ValueError(f"unknown paper recipe {paper!r}; known: {sorted(PAPER_RECIPES)}")
    ours = {**asdict(TrainConfig()), **recipe}
    diffs = [f"{k} {show_value(ours[k])} ≠ {show_value(v)}" for k, v in PAPER_RECIPES[paper].items() if not _same(ours[k], v)]
    return PaperMatch(not diffs, diffs)

def crt_spec(cell_spec: dict, **recipe) -> dict:
    """The ``finetail train --spec`` of a cRT job for a cell: the cell's network, image size,
    held-out slice and seed, a new linear head trained on the frozen backbone
    (``linear_probe``) with class-balanced sampling and the softmax loss; ``recipe`` overrides
    or adds any recipe setting (the schedule: epochs, lr, milestones, ...; unset ones keep the
    cell's). Run it with ``--init-model <cell>/model.pt``: the job then records the cell's run
    as its parent, and its backbone digest (``start_backbone_sha256``) is the cell's.

    >>> spec = crt_spec({"recipe": {"model": "resnet32", "epochs": 200}, "loss": {"type": "ldam"}}, epochs=10)
    >>> spec["recipe"], spec["loss"]
    ({'model': 'resnet32', 'epochs': 10, 'linear_probe': True, 'sampler': 'class_balanced'}, {'type': 'softmax'})
    """
    base = {k: v for k, v in cell_spec.get("recipe", {}).items() if k != "weights"}  # the backbone is loaded
    out = {"recipe": {**base, **recipe, "linear_probe": True, "sampler": "class_balanced"}, "loss": {"type": "softmax"}}
    if "shots" in cell_spec:
        out["shots"] = cell_spec["shots"]
    return out
