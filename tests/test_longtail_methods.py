"""The later long-tail methods: LDAM(-DRW), balanced softmax, logit-adjusted loss, the
class-resampling samplers, the cosine head, and the recipe and resume key around them.

Every loss is checked against numbers worked out by hand in float64 (math, not torch)."""

import math

import numpy as np
import pytest
import torch

from finetail.losses import (
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    ReweightedCrossEntropy,
    build_loss,
    class_balanced_weights,
    drw_weights,
    ldam_margins,
)
from finetail.models import NormedLinear, build_model, init_head_bias, param_groups
from finetail.training.checkpoint import resume_key
from finetail.training.recipe import SPEED_ONLY, TrainConfig, key_settings
from finetail.training.sampling import class_probabilities, class_quotas, epoch_order, holdout_mask

from conftest import assert_same_weights, toy_images


def _ce(row, y):
    """Softmax cross-entropy of one row of logits, by hand."""
    return math.log(sum(math.exp(v) for v in row)) - row[y]


# --------------------------------------------------------------------------- LDAM
def test_ldam_margins_by_hand():
    # n^(-1/4) of 81, 16, 1 is 1/3, 1/2, 1; scaled so the largest is 0.5
    assert ldam_margins([81, 16, 1], 0.5).tolist() == pytest.approx([1 / 6, 1 / 4, 1 / 2], rel=1e-12)
    assert ldam_margins([5, 5], 0.3).tolist() == pytest.approx([0.3, 0.3])


Z = [[0.2, -0.1, 0.4], [0.0, 0.5, -0.3], [0.9, 0.1, -0.2]]
Y = [0, 2, 1]
M = [1 / 6, 1 / 4, 1 / 2]  # margins of counts 81, 16, 1


def _ldam_by_hand(scale):
    ces = []
    for row, y in zip(Z, Y, strict=True):
        shifted = [scale * (v - (M[y] if j == y else 0.0)) for j, v in enumerate(row)]
        ces.append(_ce(shifted, y))
    return ces


def test_ldam_loss_is_the_mean_ce_of_scaled_margin_shifted_logits():
    ces = _ldam_by_hand(2.0)
    got = LDAMLoss([81, 16, 1], max_margin=0.5, scale=2.0)(torch.tensor(Z), torch.tensor(Y))
    assert float(got) == pytest.approx(sum(ces) / 3, rel=1e-6)


def test_ldam_weighted_is_pytorchs_weighted_mean():
    ces, w = _ldam_by_hand(2.0), [1.0, 2.0, 3.0]
    expect = sum(w[y] * c for y, c in zip(Y, ces, strict=True)) / sum(w[y] for y in Y)  # (1 CE0 + 3 CE1 + 2 CE2) / 6
    loss = LDAMLoss([81, 16, 1], max_margin=0.5, scale=2.0, weight=torch.tensor(w))
    assert float(loss(torch.tensor(Z), torch.tensor(Y))) == pytest.approx(expect, rel=1e-6)
    later = LDAMLoss([81, 16, 1], max_margin=0.5, scale=2.0)
    later.weight = torch.tensor(w)  # settable after construction (DRW)
    assert float(later(torch.tensor(Z), torch.tensor(Y))) == pytest.approx(expect, rel=1e-6)
    later.set_weight(None)
    assert float(later(torch.tensor(Z), torch.tensor(Y))) == pytest.approx(sum(ces) / 3, rel=1e-6)


# --------------------------------------------------------------------------- prior-shifted losses
LOGITS = [[0.0, 0.0], [1.0, 0.0], [2.0, -1.0]]
TARGETS = [0, 1, 0]


def test_balanced_softmax_adds_log_counts():
    shift = [math.log(3), math.log(1)]
    expect = sum(_ce([v + s for v, s in zip(row, shift, strict=True)], y) for row, y in zip(LOGITS, TARGETS, strict=True)) / 3
    got = BalancedSoftmaxLoss([3, 1])(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert float(got) == pytest.approx(expect, rel=1e-6)


def test_logit_adjusted_adds_tau_log_prior():
    shift = [0.5 * math.log(3 / 4), 0.5 * math.log(1 / 4)]  # tau = 0.5, pi = (3/4, 1/4)
    expect = sum(_ce([v + s for v, s in zip(row, shift, strict=True)], y) for row, y in zip(LOGITS, TARGETS, strict=True)) / 3
    got = LogitAdjustedLoss([3, 1], tau=0.5)(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert float(got) == pytest.approx(expect, rel=1e-6)
    # tau = 1 is balanced softmax (the shifts differ by a constant), tau = 0 plain softmax
    z, y = torch.tensor(LOGITS), torch.tensor(TARGETS)
    assert float(LogitAdjustedLoss([3, 1], 1.0)(z, y)) == pytest.approx(float(BalancedSoftmaxLoss([3, 1])(z, y)), rel=1e-6)
    assert float(LogitAdjustedLoss([3, 1], 0.0)(z, y)) == pytest.approx(sum(map(_ce, LOGITS, TARGETS)) / 3, rel=1e-6)


LOSSES = [
    lambda c: LDAMLoss(c),
    lambda c: LDAMLoss(c, weight=class_balanced_weights(c, 0.9999)),
    lambda c: BalancedSoftmaxLoss(c),
    lambda c: LogitAdjustedLoss(c, 1.5),
    lambda c: ReweightedCrossEntropy(class_balanced_weights(c, 0.9999)),
]


@pytest.mark.parametrize("make", LOSSES)
def test_extreme_logits_and_one_image_classes_stay_finite(make):
    counts = [5000, 1, 1]
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, -1e4, -1e4]], requires_grad=True)
    y = torch.tensor([1, 0, 2])  # the true class far below: the loss is huge, but a number
    loss = make(counts)(z, y)
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 1e3
    assert torch.isfinite(z.grad).all()
    # bf16 logits (autocast) are computed in float32
    assert make(counts)(z.detach().bfloat16(), y).dtype == torch.float32


@pytest.mark.parametrize("cls", [LDAMLoss, BalancedSoftmaxLoss, LogitAdjustedLoss])
def test_a_class_without_images_is_refused_not_inf(cls):
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        cls([3, 0, 2])
    loss = cls(np.maximum([3, 0, 2], 1))  # what the engine passes
    assert torch.isfinite(loss(torch.zeros(2, 3), torch.tensor([1, 0])))


# --------------------------------------------------------------------------- DRW
def test_drw_weights_are_off_before_drw_epoch_and_class_balanced_from_it():
    counts = [50, 10, 1]
    assert all(drw_weights(counts, e, drw_epoch=3) is None for e in range(3))
    for e in (3, 4, 100):
        assert torch.equal(drw_weights(counts, e, drw_epoch=3), class_balanced_weights(counts, 0.9999))
    assert torch.equal(drw_weights(counts, 3, 3, beta=0.9), class_balanced_weights(counts, 0.9))
    assert drw_weights(counts, 10**6, drw_epoch=None) is None


def test_build_loss_picks_each_losss_module():
    counts = [9, 3, 1]
    assert isinstance(build_loss(TrainConfig(loss="ldam"), counts), LDAMLoss)
    assert isinstance(build_loss(TrainConfig(loss="ldam", drw_epoch=1, beta=0.9999), counts), LDAMLoss)
    assert isinstance(build_loss(TrainConfig(loss="balanced_softmax"), counts), BalancedSoftmaxLoss)
    assert build_loss(TrainConfig(loss="logit_adjusted", tau=0.7), counts).tau == 0.7
    assert isinstance(build_loss(TrainConfig(loss="softmax", drw_epoch=2, beta=0.99), counts), ReweightedCrossEntropy)
    assert isinstance(build_loss(TrainConfig(loss="softmax"), counts), ClassBalancedLoss)


# --------------------------------------------------------------------------- the recipe
def test_loss_settings_map_onto_the_recipe():
    cfg = TrainConfig.from_spec({"loss": {"type": "ldam", "max_margin": 0.4, "scale": 16, "drw_epoch": 160}})
    assert (cfg.loss, cfg.max_margin, cfg.scale, cfg.drw_epoch, cfg.beta, cfg.head) == ("ldam", 0.4, 16, 160, 0.9999, "normed")
    cfg = TrainConfig.from_spec({"loss": {"type": "softmax", "drw_epoch": 5, "beta": 0.999}})
    assert (cfg.drw_epoch, cfg.beta, cfg.head) == (5, 0.999, "linear")
    assert TrainConfig.from_spec({"loss": {"type": "logit_adjusted", "tau": 2.0}}).tau == 2.0
    # the schema's beta and gamma defaults (0) go with every type
    assert TrainConfig.from_spec({"loss": {"type": "balanced_softmax", "beta": 0.0, "gamma": 0.0}}).loss == "balanced_softmax"


@pytest.mark.parametrize("loss,match", [
    ({"type": "balanced_softmax", "beta": 0.9}, "takes no 'beta'"),
    ({"type": "ldam", "gamma": 1.0}, "takes no 'gamma'"),
    ({"type": "focal", "tau": 1.0}, "takes no 'tau'"),
    ({"type": "sigmoid", "drw_epoch": 3}, "takes no 'drw_epoch'"),
    ({"type": "ldam", "drw_epoch": 3, "beta": 0.0}, "re-weights nothing"),
    ({"type": "ldam", "beta": 0.99}, "give drw_epoch too"),
    ({"type": "ldam", "max_margin": 0.0}, "max_margin > 0"),
    ({"type": "ldam", "drw_epoch": -1}, "drw_epoch must be >= 0"),
    ({"type": "hinge"}, "loss type must be one of"),
])
def test_bad_loss_settings_fail_naming_the_setting(loss, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_spec({"loss": loss})


def test_settings_that_do_not_apply_to_a_loss_are_errors_in_the_recipe_too():
    with pytest.raises(ValueError, match="tau applies to the logit_adjusted loss only"):
        TrainConfig(loss="softmax", tau=2.0).validate()
    with pytest.raises(ValueError, match="sampler must be one of"):
        TrainConfig(sampler="uniform").validate()
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(holdout=1.0).validate()


OLD_FIELDS = ['model', 'width', 'shortcut', 'init', 'input_norm', 'weights', 'epochs', 'batch_size', 'lr', 'momentum',
              'nesterov', 'weight_decay', 'warmup_epochs', 'milestones', 'lr_factors', 'crop_pad', 'flip', 'eval_every',
              'budget_images', 'linear_probe', 'loss', 'beta', 'gamma', 'many_shot', 'few_shot', 'seed', 'deterministic',
              'amp', 'channels_last', 'image_size', 'num_workers', 'compile', 'cuda_graphs']  # TrainConfig before these methods


@pytest.mark.parametrize("loss", [{"type": "softmax", "beta": 0.0, "gamma": 0.0}, {"type": "sigmoid", "beta": 0.999},
                                  {"type": "focal", "beta": 0.99, "gamma": 0.5}])
def test_earlier_settings_keep_their_recipe_and_resume_key(loss):
    spec = {"recipe": {"model": "resnet8", "epochs": 3, "lr": 0.05}, "loss": loss, "shots": {"many": 50, "few": 5}}
    cfg = TrainConfig.from_spec(spec)
    # what finetail train's spec mapping was before the new loss types
    old = TrainConfig(**spec["recipe"], loss=loss["type"], beta=loss.get("beta", 0.0), gamma=loss.get("gamma", 0.0),
                      many_shot=50, few_shot=5)
    assert cfg == old
    before = {k: v for k, v in vars(cfg).items() if k in OLD_FIELDS and k not in SPEED_ONLY}
    assert key_settings(cfg) == before  # the key holds exactly what it held
    new = TrainConfig.from_spec({**spec, "recipe": {**spec["recipe"], "sampler": "sqrt"}})
    assert resume_key(new, np.array([3, 1]), None, "d") != resume_key(cfg, np.array([3, 1]), None, "d")


def test_image_budget_rescales_drw_epoch_with_the_schedule():
    cfg = TrainConfig(epochs=10, milestones=[8], lr_factors=[0.1], loss="ldam", drw_epoch=8, beta=0.9999,
                      budget_images=10_000)
    assert cfg.for_train_size(500).drw_epoch == 16  # 20 epochs
    assert TrainConfig(epochs=10, budget_images=1000).for_train_size(500).drw_epoch is None


# --------------------------------------------------------------------------- the cosine head
def test_normed_head_gives_cosines_and_has_no_bias():
    head = NormedLinear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    out = head(torch.tensor([[0.0, 5.0], [3.0, 0.0]]))
    assert out.flatten().tolist() == pytest.approx([0.0, math.sqrt(0.5), 1.0, math.sqrt(0.5)], abs=1e-6)
    model = build_model("resnet8", 3, 4, head="normed")
    assert isinstance(model.head, NormedLinear) and "head.bias" not in model.state_dict()
    init_head_bias(model, "softmax")  # nothing to set: no error
    groups = param_groups(model, 1e-4, decay_head_bias=False)
    assert len(groups) == 1 and any(p is model.head.weight for p in groups[0]["params"])
    assert TrainConfig(loss="ldam").head == "normed" and TrainConfig(loss="softmax").head == "linear"


def test_ldam_head_starts_with_unit_norm_class_vectors_as_the_official_normedlinear():
    # Cao et al.: weight (D, C).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5) -> every class
    # column of norm 1. Ours is (C, D): every row of norm 1, and not all equal (still random).
    torch.manual_seed(0)
    head = NormedLinear(64, 10)
    norms = head.weight.norm(dim=1)
    assert head.weight.shape == (10, 64)
    assert norms.tolist() == pytest.approx([1.0] * 10, abs=1e-5)
    assert float(head.weight.abs().max()) < 1.0 and len({round(v, 6) for v in head.weight[:, 0].tolist()}) == 10
    for init in ("kaiming", "glorot"):  # the CIFAR ResNets' init choice leaves the cosine head as it is
        model = build_model("resnet32", 100, 16, init=init, head="normed")
        assert model.head.weight.norm(dim=1).tolist() == pytest.approx([1.0] * 100, abs=1e-5)


# --------------------------------------------------------------------------- the samplers
LABELS = torch.tensor([0] * 50 + [1] * 10 + [2] * 2 + [4] * 1)  # class 3 has no images; N = 63


def test_class_balanced_quotas_by_hand():
    # 4 classes with images: 63 / 4 = 15.75 each; 3 images left over go to the lowest labels
    assert class_quotas(np.bincount(LABELS), "class_balanced").tolist() == [16, 16, 16, 0, 15]
    # sqrt: 10 * (3, 1) / 4 = (7.5, 2.5): the tie goes to the lower label
    assert class_quotas(np.array([9, 1]), "sqrt").tolist() == [8, 2]
    assert class_quotas(np.array([9, 1]), "instance").tolist() == [9, 1]


@pytest.mark.parametrize("sampler", ["sqrt", "class_balanced"])
def test_a_resampled_epoch_holds_each_class_its_quota_and_cycles_its_images(sampler):
    counts = np.bincount(LABELS)
    n = len(LABELS)
    q = class_quotas(counts, sampler)
    # stratified draws: the epoch's class frequencies are N p_j rounded, exactly
    assert q.sum() == n and np.all(np.abs(q - n * class_probabilities(counts, sampler)) < 1)
    order = epoch_order(LABELS, sampler, torch.Generator().manual_seed(3))
    assert len(order) == n
    assert torch.bincount(LABELS[order], minlength=5).tolist() == q.tolist()
    per_image = torch.bincount(order, minlength=n)
    for c in np.flatnonzero(counts):
        drawn = per_image[LABELS == int(c)]
        assert set(drawn.tolist()) <= {q[c] // counts[c], -(-q[c] // counts[c])}  # floor or ceil of q/n
    # a pure function of the generator's seed; another epoch, another order
    again = epoch_order(LABELS, sampler, torch.Generator().manual_seed(3))
    assert torch.equal(order, again)
    assert not torch.equal(order, epoch_order(LABELS, sampler, torch.Generator().manual_seed(4)))


def test_instance_sampler_is_the_engines_permutation_bit_for_bit():
    a = epoch_order(LABELS, "instance", torch.Generator().manual_seed(9))
    b = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def _indexed_images(labels):
    """2x2 images whose pixels hold the image's index, so a batch names its images."""
    n = len(labels)
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 3)).copy()


@pytest.mark.parametrize("sampler", ["instance", "class_balanced"])
def test_array_batches_draw_the_sampler_epoch_and_ranks_split_it(sampler):
    from finetail.training.batches import ArrayBatches

    labels = LABELS.numpy()
    x = _indexed_images(labels)
    cfg = TrainConfig(batch_size=16, crop_pad=0, flip=False, sampler=sampler)

    def drawn(rank, world):
        src = ArrayBatches(x, labels, x[:2], labels[:2], cfg, torch.device("cpu"), rank, world)
        return [xb[:, 0, 0, 0].long() for xb, _ in src.epoch(2, torch.Generator().manual_seed(7))]

    whole = torch.cat(drawn(0, 1))
    assert torch.bincount(LABELS[whole], minlength=5).tolist() == class_quotas(np.bincount(labels), sampler).tolist()
    shards = zip(drawn(0, 2), drawn(1, 2), strict=True)
    assert torch.equal(torch.cat([torch.cat(pair) for pair in shards]), whole)  # the global batches, split by rank


def test_file_batches_draw_the_same_quotas_and_key_each_draw():
    from finetail.loader import _GlobalBatches

    labels = LABELS.numpy()
    sampler = _GlobalBatches(labels, 16, seed=1, rank=0, world=1, sampler="sqrt")
    sampler.set_epoch(4)
    keys = [k for batch in sampler for k in batch]
    idx = torch.tensor([k[0] for k in keys])
    assert torch.bincount(LABELS[idx], minlength=5).tolist() == class_quotas(np.bincount(labels), "sqrt").tolist()
    assert [k[2] for k in keys] == list(range(len(labels)))  # a recurring image is augmented anew at each draw
    instance = _GlobalBatches(labels, 16, seed=1, rank=0, world=1)
    assert all(len(k) == 2 for batch in instance for k in batch)  # instance keys as before


def test_holdout_is_class_stratified_and_keeps_every_class():
    labels = np.array([0] * 20 + [1] * 5 + [2] * 2 + [3] * 1)
    held = holdout_mask(labels, 0.2, seed=0)
    # round(0.2 n), at most n - 1: 4, 1, 0 (0.4 rounds down), 0
    assert [int(held[labels == c].sum()) for c in range(4)] == [4, 1, 0, 0]
    assert np.array_equal(held, holdout_mask(labels, 0.2, seed=0))
    assert not np.array_equal(held, holdout_mask(labels, 0.2, seed=1))
    assert not holdout_mask(labels, 0.0, seed=0).any()


# --------------------------------------------------------------------------- the engine
FAST = dict(model="resnet8", width=8, batch_size=16, lr=0.05, warmup_epochs=1, milestones=[6], lr_factors=[0.1],
            eval_every=3, crop_pad=2, deterministic=True)


def _longtail_data(counts=(24, 8, 3)):
    x, y = toy_images(max(counts), len(counts), seed=0)
    keep = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in enumerate(counts)])
    xt, yt = toy_images(6, len(counts), seed=1)
    return x[keep], y[keep], xt, yt


class _Crash(RuntimeError):
    pass


def test_ldam_drw_weights_switch_on_at_drw_epoch_and_resume_exactly(tmp_path, monkeypatch):
    from finetail.training import loop
    from finetail.training.loop import train

    torch.set_num_threads(1)
    data = _longtail_data()
    counts = np.bincount(data[1])
    cfg = TrainConfig(**FAST, epochs=3, loss="ldam", drw_epoch=1, beta=0.9)
    seen = []
    real = loop.drw_weights

    def record(c, epoch, drw_epoch, beta):
        w = real(c, epoch, drw_epoch, beta)
        seen.append((epoch, w))
        return w

    monkeypatch.setattr(loop, "drw_weights", record)
    full = train(cfg, *data, 3, tmp_path / "a.pt", device="cpu", log=lambda m: None)
    assert [e for e, _ in seen] == [0, 1, 2] and seen[0][1] is None
    assert all(torch.equal(w, class_balanced_weights(counts, 0.9)) for _, w in seen[1:])
    assert isinstance(full.model.head, NormedLinear)

    def crash_at_1(epoch, metrics):
        if epoch == 1:
            raise _Crash

    with pytest.raises(_Crash):
        train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", on_epoch=crash_at_1, log=lambda m: None)
    seen.clear()
    resumed = train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", log=lambda m: None)
    assert [e for e, _ in seen] == [1, 2]  # resumed at epoch 1: weighted, as the uninterrupted run was
    assert_same_weights(full.model, resumed.model)
    # before drw_epoch LDAM-DRW is plain LDAM; from it on, it trains otherwise
    plain = train(TrainConfig(**FAST, epochs=3, loss="ldam"), *data, 3, tmp_path / "c.pt", device="cpu",
                  log=lambda m: None)
    assert plain.history[0]["train_loss"] == full.history[0]["train_loss"]
    assert plain.history[1]["train_loss"] != full.history[1]["train_loss"]


@pytest.mark.parametrize("loss", [{"loss": "balanced_softmax"}, {"loss": "logit_adjusted", "tau": 1.5},
                                  {"loss": "softmax", "drw_epoch": 1, "beta": 0.99}])
def test_engine_trains_the_prior_losses_with_a_resampling_sampler(tmp_path, loss):
    from finetail.training.loop import train

    torch.set_num_threads(1)
    res = train(TrainConfig(**FAST, epochs=2, sampler="sqrt", **loss), *_longtail_data(), 3, tmp_path / "a.pt",
                device="cpu", log=lambda m: None)
    assert all(math.isfinite(h["train_loss"]) for h in res.history)
    assert 0.0 <= res.metrics["ece"] <= 1.0


def test_ldam_confidence_is_the_softmax_of_scaled_cosines(tmp_path):
    from finetail.training.batches import batch_source
    from finetail.training.loop import predict, train

    torch.set_num_threads(1)
    data = _longtail_data()
    cfg = TrainConfig(**FAST, epochs=1, loss="ldam", scale=10.0)
    res = train(cfg, *data, 3, tmp_path / "a.pt", device="cpu", log=lambda m: None)
    src = batch_source(*data, cfg, torch.device("cpu"), 0, 1)
    mean, std = (torch.tensor(res.normalisation[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    _, conf = predict(res.model, src, mean, std, cfg)
    with torch.no_grad():
        x = torch.from_numpy(data[2]).permute(0, 3, 1, 2).float()
        cos = res.model((x - mean) / std).double()
    assert cos.abs().max() <= 1 + 1e-6
    assert conf == pytest.approx(torch.softmax(10.0 * cos, dim=1).max(1).values.numpy(), rel=1e-5)

