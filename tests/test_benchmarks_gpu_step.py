"""benchmarks/gpu_step.py runs (tiny, CPU) and its two steps agree; benchmarks/cost_model.py
predicts the checkpoint size and the step's FLOPs of what massl_ray actually builds and runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_crops
from massl_ray.method.checkpoint import save_checkpoint
from massl_ray.method.learner import Learner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import cost_model  # noqa: E402


@pytest.mark.timeout(300)
def test_gpu_step_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--device", "cpu",
         "--warmup", "1", "--steps", "2", "--windows", "1", "--out", str(out)],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())

    assert res["setting"]["tiny"] is True and res["device"] == "cpu"
    assert set(res["paths"]) == {"reference", "massl_ray"}
    for name, r in res["paths"].items():
        assert "error" not in r, (name, r)
        assert r["time_per_step_s"] > 0 and len(r["window_times_s"]) == 1
        assert r["images_per_s"] == pytest.approx(res["setting"]["batch"] / r["time_per_step_s"])
        assert r["peak_mem_bytes"] > 0
        assert 0 < r["mfu"] < 10  # vs a measured matmul rate on CPU
    check = res["check"]
    assert check["losses_match"] is True, check
    lo, lr_ = check["losses_step0"]["massl_ray"], check["losses_step0"]["reference"]
    assert abs(lo - lr_) <= 1e-4 * abs(lr_)
    assert lo > 0
    # the analytic FLOP model vs FlopCounterMode on the same step
    fc = res["flop_check"]
    assert fc["flop_counter_per_step"] > 0
    assert abs(fc["rel_diff"]) <= 0.10
    assert res["flops"]["total"] == fc["analytic_per_step"]


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


def test_cost_model_checkpoint_size_within_5_percent(tiny_config, tmp_path):
    cfg = tiny_config()
    learner = Learner(cfg)
    learner.step(*make_crops(cfg, seed=0))  # AdamW states exist after one step
    save_checkpoint(learner.state_dict(), tmp_path / "ckpt")
    actual = (tmp_path / "ckpt" / "state.pt").stat().st_size
    predicted = cost_model.checkpoint_bytes(cost_model.workload_from_config(cfg))["total"]
    assert abs(predicted - actual) <= 0.05 * actual, (predicted, actual)


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
