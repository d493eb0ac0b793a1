"""Model registry: the CB-loss paper's CIFAR ResNets and torchvision architectures by name.

Every model is a :class:`Classifier`: a ``backbone`` that maps images to penultimate features
``(B, D)`` and a ``head``: linear (``nn.Linear``), or for the LDAM loss a cosine head
(:class:`NormedLinear`: features and class weights L2-normalised, no bias). Feature extraction
uses the backbone; fine-tuning keeps the backbone's weights and puts on a new head.

Names:

- ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
  ``resnet110``: He et al.'s CIFAR ResNets (v1 basic blocks, 3 stages of 16/32/64 filters
  times ``width/16``, parameter-free shortcuts), depth = 6n + 2. ``resnet32`` is the CB-loss
  paper's network. Two choices follow the recipe (``TrainConfig.shortcut`` and ``init``):
  the downsampling shortcut subsamples (ours, He et al.'s option A) or average-pools (the
  CB-loss reference code) before zero-padding the new channels; weights start He-normal
  (ours) or Glorot-uniform (the reference code's TensorFlow default).
- ``tv:<name>``: any ``torchvision.models`` architecture (``tv:resnet50``,
  ``tv:inception_v3``...), optionally with its pretrained-weights enum (``weights:
  IMAGENET1K_V2``), which downloads from the hub on first use.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .losses import head_bias_prior

__all__ = ["CIFAR_RESNETS", "HEADS", "IMAGENET_MEAN", "IMAGENET_NORMALISATION", "IMAGENET_STD", "Classifier",
           "NormedLinear", "build_model", "init_head_bias", "param_groups"]

HEADS = ("linear", "normed")

CIFAR_RESNETS = {f"resnet{6 * n + 2}": n for n in (1, 2, 3, 5, 7, 9, 18)}

# torchvision's ImageNet statistics, of the 0..1 range: what its pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same in pixel units (123.675, ...; rounded, so 0.224 * 255 is 57.12, not 57.120000000000005):
# the file path's default normalisation, as a job records it.
IMAGENET_NORMALISATION = {"mean": [round(255 * m, 3) for m in IMAGENET_MEAN],
                          "std": [round(255 * s, 3) for s in IMAGENET_STD]}


class NormedLinear(nn.Module):
    """Cosine classifier: ``z_j = <x / ||x||, w_j / ||w_j||>``, in [-1, 1], no bias (the head
    of LDAM's CIFAR networks, Cao et al. 2019). ``weight`` is ``(C, D)`` as ``nn.Linear``'s;
    it computes in float32 also under autocast (a bf16 cosine is good to 3 digits, which a
    scale of 30 would turn into errors of 0.1 in the logits).

    Examples
    --------
    >>> head = NormedLinear(2, 1)
    >>> _ = head.weight.data.copy_(torch.tensor([[3.0, 0.0]]))
    >>> head(torch.tensor([[2.0, 2.0]])).tolist()  # cos 45 degrees
    [[0.7071067690849304]]
    """

    bias = None  # a bias-free head, as nn.Linear(bias=False) reads

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (Cao et al.'s ``NormedLinear``:
        ``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`` on its ``(D, C)`` weight): each class
        vector ``w_j`` drawn uniform in [-1, 1]^D, then rescaled to ``||w_j|| = 1``. Our weight is
        ``(C, D)``, so the class dimension is 0 here. The forward pass sees only directions,
        but the norm sets the head's effective step size: a gradient step moves the direction
        of ``w_j`` by about ``lr * g / ||w_j||``, so uniform [-1, 1] rows without the renorm
        (norm ``sqrt(D / 3)``, 4.6 at D = 64) learn about 20 times slower at the start."""
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).renorm_(2, 0, 1e-5).mul_(1e5)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()


class Classifier(nn.Module):
    """``head(backbone(x))`` with ``backbone: images -> (B, D)`` and ``head``: ``Linear(D, C)``
    (``head="linear"``) or :class:`NormedLinear` ``(D, C)`` (``head="normed"``)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head: str = "linear") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes) if head == "linear" else NormedLinear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "subsample") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin
        self.avgpool = shortcut == "avgpool"

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A of He et al.: subsample (or average stride x stride windows, as the CB-loss
        # reference code does; edge windows of odd sizes average their pixels inside, like
        # TensorFlow's SAME pooling) and zero-pad the channels, no parameters.
        if self.stride != 1 and self.avgpool:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        elif self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNetBackbone(nn.Module):
    """ResNet-(6n+2) for small images: conv3x3, 3 stages of n basic blocks, global average pool."""

    def __init__(self, blocks_per_stage: int, width: int = 16, shortcut: str = "subsample",
                 init: str = "kaiming") -> None:
        super().__init__()
        if shortcut not in ("subsample", "avgpool"):
            raise ValueError(f"shortcut must be 'subsample' or 'avgpool', got {shortcut!r}")
        if init not in ("kaiming", "glorot"):
            raise ValueError(f"init must be 'kaiming' or 'glorot', got {init!r}")
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate(widths):
            for b in range(blocks_per_stage):
                layers.append(_BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, shortcut))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and init == "glorot":
                nn.init.xavier_uniform_(m.weight)  # fans: in/out channels x kernel area, as TensorFlow's
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _torchvision_backbone(name: str, weights: str | None) -> tuple[nn.Module, int]:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown torchvision model {name!r}{hint} (the {len(known)} names: torchvision.models.list_models())")
    kwargs: dict = {}
    if weights:
        enum = torchvision.models.get_model_weights(name)
        if weights not in enum.__members__:
            raise UserError(f"unknown weights {weights!r} for torchvision model {name!r}; "
                            f"valid: {', '.join(enum.__members__)}")
        kwargs["weights"] = enum[weights]
    elif name in {"inception_v3", "googlenet"}:
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    net = torchvision.models.get_model(name, **kwargs)
    if hasattr(net, "AuxLogits"):
        net.AuxLogits = None
        net.aux_logits = False
    # The classifier is the last Linear layer: replace it by Identity to expose features.
    parent, attr, last = None, None, None
    for mod_name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last = (mod_name, mod)
    if last is None:
        raise ValueError(f"torchvision model {name!r} has no final Linear layer to replace")
    path = last[0].split(".")
    parent = net
    for p in path[:-1]:
        parent = getattr(parent, p)
    attr = path[-1]
    setattr(parent, attr, nn.Identity())
    return net, last[1].in_features


def build_model(name: str, num_classes: int, width: int = 16, weights: str | None = None,
                shortcut: str = "subsample", init: str = "kaiming", head: str = "linear") -> Classifier:
    """Build a registered model.

    Parameters
    ----------
    name : a CIFAR ResNet (``resnet32``) or ``tv:<torchvision name>``.
    num_classes : C, outputs of the head.
    width : first-stage filters of CIFAR ResNets (16 in the paper).
    weights : torchvision pretrained-weights enum member name, e.g. ``IMAGENET1K_V1``.
    shortcut, init : CIFAR ResNets only: ``subsample``/``avgpool`` downsampling shortcut,
        ``kaiming``/``glorot`` initialisation (``glorot`` also draws the head's kernel
        Glorot-uniform; a ``normed`` head keeps :meth:`NormedLinear.reset_parameters`); see
        :data:`finetail.training.recipe.SHORTCUTS` and ``INITS``.
    head : ``"linear"`` or ``"normed"`` (:class:`NormedLinear`, which LDAM trains;
        :attr:`finetail.training.recipe.TrainConfig.head` picks it).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name in CIFAR_RESNETS:
        if weights:
            raise ValueError(f"{name} has no pretrained weights; pretrain it in the pipeline")
        bb = CifarResNetBackbone(CIFAR_RESNETS[name], width, shortcut, init)
        model = Classifier(bb, bb.out_dim, num_classes, head)
        if init == "glorot" and head == "linear":  # a cosine head keeps its unit-norm class vectors
            nn.init.xavier_uniform_(model.head.weight)
        return model
    if (shortcut, init) != ("subsample", "kaiming"):
        raise ValueError(f"shortcut and init choose among CIFAR ResNets' variants; {name!r} has its own")
    if name.startswith("tv:"):
        bb, dim = _torchvision_backbone(name[3:], weights)
        return Classifier(bb, dim, num_classes, head)
    raise ValueError(f"unknown model {name!r}: use one of {sorted(CIFAR_RESNETS)} or 'tv:<torchvision name>'")


def init_head_bias(model: Classifier, loss_type: str) -> None:
    """Sigmoid and focal heads start at :func:`finetail.losses.head_bias_prior` (``-log(C - 1)``,
    prior 1/C); softmax heads (and single-class heads) at 0; a bias-free head has nothing to set."""
    if model.head.bias is None:
        return
    c = model.head.out_features
    with torch.no_grad():
        if loss_type in ("sigmoid", "focal") and c > 1:
            model.head.bias.fill_(head_bias_prior(c))
        else:
            model.head.bias.zero_()


def param_groups(model: Classifier, weight_decay: float, decay_head_bias: bool) -> list[dict]:
    """Optimizer groups: everything decays except the head bias when ``decay_head_bias`` is False
    (a bias-free head: everything decays)."""
    no_decay = [] if decay_head_bias or model.head.bias is None else [model.head.bias]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay and no_decay[0].requires_grad:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
