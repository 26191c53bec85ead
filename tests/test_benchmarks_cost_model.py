"""benchmarks/cost_model.py predicts what massl_ray builds and runs: parameter counts of the
built models, the step's FLOPs (FlopCounterMode), the bytes of the memory and the collectives,
its tables and ``show``, and (``validate --quick``) the state.pt bytes of a checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import make_crops
from massl_ray.method.learner import Learner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import cost_model  # noqa: E402


def test_cost_model_params_match_the_built_models():
    from massl_ray.config import load_config
    from massl_ray.method.model import ProjectionHead, build_backbone

    for arch, extra in (("vit_micro", ["model.patch_size=4", "crops.global_size=32",
                                       "crops.local_size=16"]),
                        ("vit_small", []),
                        ("vit_micro", ["model.embed_dim=64", "model.depth=2", "model.num_heads=2"])):
        cfg = load_config(None, [f"model.arch={arch}", "optim.steps_per_epoch=1",
                                 "run.num_workers=1"] + extra)
        bb = build_backbone(cfg.model, cfg.crops.global_size, 0.0)
        head = ProjectionHead(bb.embed_dim, cfg.model.head_hidden_dim, cfg.model.head_out_dim)
        w = cost_model.workload_from_config(cfg)
        assert cost_model.model_params(w) == (sum(p.numel() for p in bb.parameters())
                                              + sum(p.numel() for p in head.parameters())), arch
        assert cost_model.model_tensors(w) == len(list(bb.parameters())) + len(list(head.parameters()))


def test_cost_model_flops_within_10_percent_of_flop_counter(tiny_config):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny_config()
    learner = Learner(cfg)
    crops = make_crops(cfg, seed=0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        learner.step(*crops)
    counted = fc.get_total_flops()
    f = cost_model.step_flops(cost_model.workload_from_config(cfg))
    assert abs(f["total"] - counted) <= 0.10 * counted, (f["total"], counted)
    # the parts add up, and the memory-logit part is what massl_loss computes
    assert f["total"] == f["backbone"] + f["head"] + f["memory_logits"]
    v, b, k, d = cfg.num_views, cfg.optim.batch_size_per_worker, cfg.massl.memory_size, cfg.model.head_out_dim
    assert f["memory_logits"] == (v + 2) * b * k * d * 2 + v * b * k * d * 2


def test_cost_model_bytes():
    ag = cost_model.allgather_bytes(workers=4, batch=64, d=256)
    assert ag["keys_per_worker"] == 64 * 256 * 4  # float32 keys (.float() before the gather)
    assert ag["gathered_tensor"] == 4 * 64 * 256 * 4
    assert ag["wire_per_worker_ring"] == 3 * 64 * 256 * 4
    assert cost_model.memory_bank_bytes(131072, 256) == 131072 * 256 * 4 + 8
    w, gpus, epochs = cost_model.recipe("vit_s16_800ep")
    assert (w.batch, gpus, epochs, w.memory_size, w.num_local) == (64, 2, 800, 131072, 10)
    e = cost_model.epoch_time(w, gpus, cost_model.IMAGENET_TRAIN_IMAGES, gpu_images_per_s=1000.0)
    assert e["steps"] == cost_model.IMAGENET_TRAIN_IMAGES // 128
    assert e["epoch_s"] == pytest.approx(e["steps"] * 64 / 1000.0)


def test_cost_model_tables_and_show(capsys):
    assert cost_model.main(["tables"]) == 0
    tables = capsys.readouterr().out
    for head in ("### FLOPs per training step", "### Communication per step and worker",
                 "### Checkpoint (state.pt)", "### Predicted time per epoch"):
        assert head in tables
    assert "| ViT-S/16, B=64, 2x224+10x96, K=2^17 | " in tables
    assert cost_model.main(["show", "--config", str(REPO / "jobs" / "quickstart.yaml")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["flops"]["total"] > 0 and shown["checkpoint"]["total"] > 0


def test_cost_model_validate_quick_predicts_the_checkpoint_massl_ray_writes(tmp_path, capsys):
    out = tmp_path / "validation.json"
    assert cost_model.main(["validate", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] is True and len(res["rows"]) == 1
    ck = res["rows"][0]
    assert (ck["quantity"], ck["setting"]) == ("checkpoint state.pt bytes", "tiny")
    assert ck["measured"] > 0 and abs(ck["predicted"] - ck["measured"]) <= 0.05 * ck["measured"]
    assert ck["error"] == pytest.approx((ck["predicted"] - ck["measured"]) / ck["measured"])
    assert "| checkpoint state.pt bytes | tiny |" in capsys.readouterr().out
