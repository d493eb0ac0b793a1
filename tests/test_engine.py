"""The training engine: learns, schedules, augments, and resumes to identical weights."""

import json

import pytest
import torch

from finetail.manifest import load_array_split
from finetail.training.batches import augment_batch
from finetail.training.checkpoint import load_checkpoint
from finetail.training.loop import train
from finetail.training.recipe import TrainConfig, lr_at

from conftest import assert_same_weights

FAST = dict(model="resnet8", width=8, batch_size=16, lr=0.05, warmup_epochs=1, milestones=[6], lr_factors=[0.1],
            eval_every=2, crop_pad=2, deterministic=True)


def _data(manifest):
    tr, te = load_array_split(manifest, "train"), load_array_split(manifest, "test")
    return tr.images, tr.labels, te.images, te.labels


def test_lr_schedule_warmup_then_steps():
    cfg = TrainConfig(lr=0.1, warmup_epochs=2, milestones=[3, 5], lr_factors=[0.1, 0.01])
    assert lr_at(cfg, 0, 0, 10) == pytest.approx(0.1 / 20)
    assert lr_at(cfg, 1, 9, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 2, 0, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 3, 0, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 6, 0, 10) == pytest.approx(0.001)


def test_augment_crops_windows_of_the_padded_image_and_flips():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).reshape(2, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, gen, pad=2, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.equal(out[b], w) for w in windows)
    # no padding, no flip: identity
    assert torch.equal(augment_batch(x, gen, pad=0, flip=False), x)


def test_engine_learns_a_toy_problem(toy_manifest, tmp_path):
    torch.set_num_threads(1)
    cfg = TrainConfig(**FAST, epochs=8)
    res = train(cfg, *_data(toy_manifest), 3, tmp_path / "ck.pt", device="cpu", log=lambda m: None)
    assert res.metrics["top1_acc"] >= 0.9  # chance is 1/3
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert load_checkpoint(tmp_path / "ck.pt")["epoch"] == 7


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("loss,beta,gamma", [("softmax", 0.0, 0.0), ("focal", 0.99, 0.5)])
def test_killed_run_resumes_to_the_same_weights(toy_manifest, tmp_path, loss, beta, gamma):
    torch.set_num_threads(1)
    cfg = TrainConfig(**FAST, epochs=6, loss=loss, beta=beta, gamma=gamma)
    data = _data(toy_manifest)
    full = train(cfg, *data, 3, tmp_path / "a.pt", device="cpu", log=lambda m: None)

    def crash_at_3(epoch, metrics):
        if epoch == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", on_epoch=crash_at_3, log=lambda m: None)
    # the crash came while reporting epoch 3, before its checkpoint: epoch 3 is replayed
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 2
    logs = []
    resumed = train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", log=logs.append)
    assert any("resuming from checkpoint" in m and "at epoch 3 " in m for m in logs)
    assert len(resumed.history) == 6
    assert_same_weights(full.model, resumed.model)
    assert resumed.metrics == full.metrics


def test_checkpoint_for_other_settings_is_not_resumed(toy_manifest, tmp_path):
    data = _data(toy_manifest)
    train(TrainConfig(**FAST, epochs=2), *data, 3, tmp_path / "c.pt", device="cpu", log=lambda m: None)
    logs = []
    train(TrainConfig(**{**FAST, "lr": 0.01}, epochs=2), *data, 3, tmp_path / "c.pt", device="cpu", log=logs.append)
    assert any("starting afresh" in m for m in logs)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="lr_factors"):
        TrainConfig.from_dict({"milestones": [1], "lr_factors": []})


def test_image_budget_rescales_the_schedule():
    cfg = TrainConfig(epochs=10, milestones=[6, 8], lr_factors=[0.1, 0.01], warmup_epochs=1, eval_every=5,
                      budget_images=10_000)
    small = cfg.for_train_size(500)  # 20 epochs of 500 images
    assert (small.epochs, small.milestones, small.warmup_epochs, small.eval_every) == (20, [12, 16], 2.0, 10)
    big = cfg.for_train_size(5000)  # 2 epochs
    assert (big.epochs, big.milestones, big.eval_every) == (2, [1, 2], 1)
    assert TrainConfig(epochs=3).for_train_size(10).epochs == 3  # no budget: unchanged


def test_evaluate_reports_top5_error(toy_manifest, tmp_path):
    cfg = TrainConfig(**FAST, epochs=1)
    res = train(cfg, *_data(toy_manifest), 3, tmp_path / "ck.pt", device="cpu", log=lambda m: None)
    assert res.metrics["top5_error"] is None  # fewer than 5 classes
    xtr, ytr, xte, yte = _data(toy_manifest)
    res = train(cfg, xtr, ytr, xte, yte, 6, tmp_path / "ck6.pt", device="cpu", log=lambda m: None)
    assert 0.0 <= res.metrics["top5_error"] <= res.metrics["top1_error"]


def test_sigterm_checkpoints_mid_epoch_and_resumes_bit_for_bit(toy_manifest, tmp_path, monkeypatch):
    import os
    import signal

    from finetail.training import batches
    from finetail.training.loop import Preempted

    torch.set_num_threads(1)
    cfg = TrainConfig(**{**FAST, "batch_size": 8}, epochs=4)  # 9 iterations an epoch
    data = _data(toy_manifest)
    full = train(cfg, *data, 3, tmp_path / "a.pt", device="cpu", log=lambda m: None)

    calls = {"n": 0}
    real_augment = batches.augment_batch

    def augment_then_term(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9 * 2 + 2:  # epoch 3 (index 2), second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(batches, "augment_batch", augment_then_term)
    logs = []
    with pytest.raises(Preempted):
        train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", log=logs.append)
    monkeypatch.setattr(batches, "augment_batch", real_augment)
    state = load_checkpoint(tmp_path / "b.pt")
    assert state["epoch"] == 1 and state["mid_iter"] == 2
    assert any("SIGTERM received: checkpointed epoch 3 at iteration 2 of 9" in m for m in logs)
    logs = []
    resumed = train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", log=logs.append)
    assert any("at epoch 2, iteration 2" in m for m in logs)
    assert_same_weights(full.model, resumed.model)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])


@pytest.mark.slow
def test_compiled_training_matches_eager_and_shares_checkpoints(toy_manifest, tmp_path):
    """torch.compile (inductor on the CPU) trains the same function: the loss curve matches
    eager up to the rounding of fused kernels, and its checkpoint (no ``_orig_mod.`` keys)
    resumes in eager mode."""
    torch.set_num_threads(1)
    data = _data(toy_manifest)
    eager = train(TrainConfig(**FAST, epochs=4), *data, 3, tmp_path / "e.pt", device="cpu", log=lambda m: None)

    def crash_at_2(epoch, metrics):
        if epoch == 2:
            raise _Crash

    compiled_cfg = TrainConfig(**FAST, epochs=4, compile=True)
    with pytest.raises(_Crash):
        train(compiled_cfg, *data, 3, tmp_path / "c.pt", device="cpu", on_epoch=crash_at_2, log=lambda m: None)
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 1
    assert not any("_orig_mod" in k for k in state["model"])
    compiled_losses = [h["train_loss"] for h in json.loads(state["history"])]
    # Two epochs of 5 steps each: fused kernels reorder float sums (about 1e-7 relative per
    # operation), which SGD carries along without amplifying much this early (measured: 3e-6 relative).
    assert compiled_losses == pytest.approx([h["train_loss"] for h in eager.history[:2]], rel=1e-3)

    logs = []
    resumed = train(TrainConfig(**FAST, epochs=4), *data, 3, tmp_path / "c.pt", device="cpu", log=logs.append)
    assert any("resuming from checkpoint" in m and "at epoch 2 " in m for m in logs)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in eager.history], rel=1e-3)


def test_cuda_graphs_need_compile():
    with pytest.raises(ValueError, match="cuda_graphs needs compile"):
        TrainConfig(cuda_graphs=True).validate()


@pytest.mark.slow
def test_sgd_is_torchs_sgd_without_the_compiler_stack():
    """finetail.training.optim.SGD updates and saves exactly as torch.optim.SGD, and a few
    steps (with zero_grad, state_dict, load_state_dict) do not import torch._dynamo."""
    import subprocess
    import sys

    code = """
import sys, torch
from finetail.training.optim import SGD, sgd

def run(make):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    opt = make([{"params": list(m.parameters())[:-1], "weight_decay": 2e-4}, {"params": [m[2].bias], "weight_decay": 0.0}])
    for i in range(4):
        for g in opt.param_groups:
            g["lr"] = 0.1 * (i + 1)
        opt.zero_grad(set_to_none=True)
        m(torch.randn(8, 5)).pow(2).mean().backward()
        opt.step()
    opt.load_state_dict(opt.state_dict())
    return m.state_dict(), opt.state_dict()

ours, ours_opt = run(lambda g: sgd(g, lr=0.1, momentum=0.9, nesterov=True))
assert "torch._dynamo" not in sys.modules
theirs, theirs_opt = run(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True))
assert type(sgd([{"params": [torch.zeros(1, requires_grad=True)]}], 0.1, 0.9, False)) is SGD
assert all(torch.equal(ours[k], theirs[k]) for k in ours)
assert ours_opt["param_groups"] == theirs_opt["param_groups"]
assert all(torch.equal(ours_opt["state"][k]["momentum_buffer"], theirs_opt["state"][k]["momentum_buffer"]) for k in ours_opt["state"])
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
