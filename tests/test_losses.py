"""Class-balanced weights and losses against small hand-computed cases (DESIGN.md formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetail.losses import ClassBalancedLoss, class_balanced_weights, effective_number, head_bias_prior
from finetail.models import build_model, init_head_bias, param_groups

from conftest import toy_images


def test_effective_number_by_hand():
    # E_n = (1 - beta^n) / (1 - beta): beta=0.5 -> E_1 = 1, E_3 = 0.875 / 0.5 = 1.75
    assert effective_number([1, 3], 0.5).tolist() == pytest.approx([1.0, 1.75])
    assert effective_number([1, 3], 0.0).tolist() == [1.0, 1.0]
    # beta close to 1 approaches n (no cancellation for small n)
    assert effective_number([5], 1 - 1e-9).item() == pytest.approx(5.0, rel=1e-6)


def test_weights_by_hand_and_normalised_to_num_classes():
    w = class_balanced_weights([1, 3], 0.5)
    raw = [1 / 1.0, 1 / 1.75]
    expect = [r / sum(raw) * 2 for r in raw]  # [1.2727..., 0.7272...]
    assert w.tolist() == pytest.approx(expect, rel=1e-6)
    assert float(w.sum()) == pytest.approx(2.0)
    assert class_balanced_weights([5000, 50, 1], 0.0).tolist() == [1.0, 1.0, 1.0]
    # rarer classes weigh more
    w = class_balanced_weights([5000, 500, 50, 5], 0.999)
    assert torch.all(w[1:] > w[:-1])


def test_weights_reject_bad_counts():
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        class_balanced_weights([3, 0, 2], 0.9)
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([3, 2], 1.0)


LOGITS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, -1.0]])
TARGETS = torch.tensor([0, 1, 0])
COUNTS = [1, 3]
BETA = 0.5
W = [1.2727272727, 0.7272727273]


def _sp(x):  # softplus, by hand
    return math.log1p(math.exp(x))


def test_softmax_cb_divides_by_batch_size_not_weight_sum():
    ce = [math.log(2), math.log(1 + math.e), _sp(-3.0)]  # -log softmax of the true class
    expect = (W[0] * ce[0] + W[1] * ce[1] + W[0] * ce[2]) / 3
    got = ClassBalancedLoss(COUNTS, "softmax", BETA)(LOGITS, TARGETS)
    assert float(got) == pytest.approx(expect, rel=1e-6)


def test_sigmoid_cb_sums_over_classes_and_divides_by_batch():
    # BCE(z, y) = softplus(z) - y z
    total = 0.0
    for (z0, z1), y in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        ys = [1.0 if j == y else 0.0 for j in range(2)]
        bce = [_sp(z) - t * z for z, t in zip((z0, z1), ys, strict=True)]
        total += W[y] * sum(bce)
    got = ClassBalancedLoss(COUNTS, "sigmoid", BETA)(LOGITS, TARGETS)
    assert float(got) == pytest.approx(total / 3, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_cb_is_one_minus_pt_to_gamma_times_bce(gamma):
    total = 0.0
    for zs, y in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        for j, z in enumerate(zs):
            t = 1.0 if j == y else 0.0
            p = 1 / (1 + math.exp(-z))
            pt = p if t else 1 - p
            total += W[y] * (1 - pt) ** gamma * (_sp(z) - t * z)
    got = ClassBalancedLoss(COUNTS, "focal", BETA, gamma)(LOGITS, TARGETS)
    assert float(got) == pytest.approx(total / 3, rel=1e-5)


def test_beta_zero_is_the_plain_loss():
    torch.manual_seed(0)
    z, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    counts = [100, 50, 10, 5, 1]
    assert float(ClassBalancedLoss(counts, "softmax", 0.0)(z, y)) == pytest.approx(float(F.cross_entropy(z, y)))
    onehot = F.one_hot(y, 5).float()
    plain = F.binary_cross_entropy_with_logits(z, onehot, reduction="sum") / 16
    assert float(ClassBalancedLoss(counts, "sigmoid", 0.0)(z, y)) == pytest.approx(float(plain), rel=1e-6)
    # focal with gamma 0 is the sigmoid loss
    assert float(ClassBalancedLoss(counts, "focal", 0.0, 0.0)(z, y)) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.parametrize("loss_type,gamma", [("softmax", 0.0), ("sigmoid", 0.0), ("focal", 0.5), ("focal", 2.0)])
def test_stable_at_large_logits_and_one_image_classes(loss_type, gamma):
    counts = [5000, 1, 1]  # classes with one image
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3e3], [0.0, 0.0, -5e3]], requires_grad=True)
    y = torch.tensor([1, 2, 2])
    loss = ClassBalancedLoss(counts, loss_type, 0.9999, gamma)(z, y)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.all(torch.isfinite(z.grad))


def test_loss_argument_errors():
    with pytest.raises(ValueError, match="loss_type"):
        ClassBalancedLoss([1, 2], "hinge")
    with pytest.raises(ValueError, match="focal"):
        ClassBalancedLoss([1, 2], "softmax", gamma=1.0)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        ClassBalancedLoss([1, 2])(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))


def test_head_bias_prior_and_no_weight_decay():
    assert head_bias_prior(10) == pytest.approx(-math.log(9))
    model = build_model("resnet8", 10)
    init_head_bias(model, "focal")
    assert torch.allclose(model.head.bias, torch.full((10,), -math.log(9)))
    groups = param_groups(model, 2e-4, decay_head_bias=False)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(no_decay) == 1 and no_decay[0]["params"] == [model.head.bias]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))
    # the network's sigmoid outputs on real images start near the prior 1/C = 0.1 (about 1/2 without)
    torch.manual_seed(0)
    net = build_model("resnet8", 10)
    x = torch.from_numpy(toy_images(4, num_classes=10, size=16)[0]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        before = torch.sigmoid(net(x)).mean().item()
        init_head_bias(net, "focal")
        after = torch.sigmoid(net(x)).mean().item()
    assert abs(before - 0.5) < 0.1 and abs(after - 0.1) < 0.05, (before, after)
    init_head_bias(model, "softmax")
    assert torch.all(model.head.bias == 0)
