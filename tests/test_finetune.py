"""Fine-tuning transfer: layer-wise lr scales and weight-decay groups by parameter name, the
warmup + cosine schedule at known points, and learning on images whose class is their colour."""

from __future__ import annotations

import math

import pytest
import torch

from massl_ray.evaluate.finetune import fine_tune, lr_at, param_groups
from massl_ray.method.model import build_backbone

from conftest import make_tiny_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = make_tiny_config("model.depth=2")
    return build_backbone(cfg.model, 32, 0.0).eval(), cfg


@pytest.mark.timeout(30)
def test_layer_wise_lr_decay_and_weight_decay_groups(tiny):
    bb, _ = tiny
    head = torch.nn.Linear(bb.embed_dim, 3)
    groups = param_groups(bb, head, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scales = {name: g["lr_scale"] for g in groups for name in g["names"]}
    # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5^1, final norm and head 1.
    expect = {"patch_embed.proj.weight": 0.125, "cls_token": 0.125, "pos_embed": 0.125,
              "blocks.0.attn.qkv.weight": 0.25, "blocks.0.norm1.weight": 0.25,
              "blocks.1.mlp.fc2.bias": 0.5, "norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for name, v in expect.items():
        assert scales[name] == v, name
    assert set(scales) == {n for n, _ in bb.named_parameters()} | {"head.weight", "head.bias"}
    wd = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["head.weight"] == 0.05
    for name in ("blocks.0.attn.qkv.bias", "norm.weight", "cls_token", "pos_embed", "head.bias"):
        assert wd[name] == 0.0, name
    assert all(g["lr"] == g["lr_scale"] for g in groups)  # lr 1.0


@pytest.mark.timeout(30)
def test_warmup_then_cosine():
    assert lr_at(0, 110, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 110, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 110, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(60, 110, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(85, 110, 10, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(110, 110, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 50, 0, 2.0) == pytest.approx(2.0)  # no warmup


def coloured(n: int, seed: int):
    """Images of 4 classes, each a flat colour plus noise: the class is readable from any pixel."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])
    y = torch.randint(0, 4, (n,), generator=g)
    noise = torch.randint(-20, 21, (n, 3, 32, 32), generator=g)
    return (colours[y][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8), y


@pytest.mark.timeout(120)
def test_fine_tune_learns_and_leaves_the_backbone_untouched(tiny):
    bb, cfg = tiny
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    xs, ys = coloured(96, 0)
    xt, yt = coloured(64, 1)
    r = fine_tune(bb, xs, ys, xt, yt, cfg.crops.mean, cfg.crops.std, num_classes=4, epochs=3,
                  batch_size=32, lr=2e-3, warmup_epochs=1.0)
    assert r["finetune_top1"] == 100.0
    assert len(r["finetune_top1_per_epoch"]) == 3 and r["finetune_train_rows"] == 96
    losses = r["finetune_train_loss_per_epoch"]
    assert losses[0] < math.log(4) + 1e-6 and losses[-1] < losses[0]  # zero head: log 4 at start
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    # Seeded: the same run gives the same numbers.
    r2 = fine_tune(bb, xs, ys, xt, yt, cfg.crops.mean, cfg.crops.std, num_classes=4, epochs=3,
                   batch_size=32, lr=2e-3, warmup_epochs=1.0)
    assert r2["finetune_train_loss_per_epoch"] == losses
    with pytest.raises(ValueError, match="layer_decay"):
        fine_tune(bb, xs, ys, xt, yt, cfg.crops.mean, cfg.crops.std, layer_decay=1.5)


@pytest.mark.timeout(120)
def test_eval_finetune_flag(tmp_path):
    import json
    from pathlib import Path

    from massl_ray.cli import main as cli_main
    from massl_ray.method.checkpoint import save_checkpoint
    from massl_ray.method.learner import Learner

    quick = Path(__file__).resolve().parents[1] / "jobs" / "data" / "cifar10-quick"
    d = tmp_path / "run" / "checkpoint_000000000"
    save_checkpoint(Learner(make_tiny_config("model.depth=2")).state_dict(), d)
    rc = cli_main(["eval", "--checkpoint", str(d), "--train-data", str(quick / "train.parquet"),
                   "--test-data", str(quick / "test.parquet"), "--local", "--limit-train", "64",
                   "--limit-test", "32", "--no-linear", "--few-shot", "", "--finetune",
                   "--finetune-epochs", "2", "--finetune-batch-size", "32", "--out", str(tmp_path / "e")])
    assert rc == 0
    r = json.loads((tmp_path / "e" / "eval.json").read_text())
    ft = r["finetune"]
    assert ft["finetune_epochs"] == 2 and ft["finetune_train_rows"] == 64
    assert len(ft["finetune_top1_per_epoch"]) == 2 and 0 <= ft["finetune_top1"] <= 100
    assert ft["finetune_top1"] * 32 / 100 == pytest.approx(round(ft["finetune_top1"] * 32 / 100))
    assert "Fine-tuning" in (tmp_path / "e" / "eval.md").read_text()
