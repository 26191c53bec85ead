"""Evaluation: k-NN against a brute-force reference, linear probe, few-shot draws, feature
extraction (in-process and Ray Data batch inference), the cache, the eval CLI, online k-NN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from massl_ray.method.checkpoint import save_checkpoint
from massl_ray.cli import main as cli_main
from massl_ray.evaluate.jobs import EvalSettings, evaluate_checkpoint
from massl_ray.evaluate.online import OnlineKnn
from massl_ray.evaluate.features import (FeatureCache, TeacherFeatures, cache_key, extract_in_process,
                                load_teacher)
from massl_ray.evaluate.knn import knn_accuracy
from massl_ray.method.learner import Learner, normalize
from massl_ray.evaluate.probe import few_shot, few_shot_indices, linear_probe
from massl_ray.data.sources import open_source

from conftest import make_crops, make_tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"
QUICK_TEST = ROOT / "jobs" / "data" / "cifar10-quick" / "test.parquet"


# ---- k-NN ----------------------------------------------------------------------------------

def brute_force_knn(bank, bank_labels, queries, query_labels, k, num_classes, t=0.07):
    """Independent reference: float64, Python loops, explicit sorts. Returns (top1, top5) %."""
    bank = np.asarray(bank, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c1 = c5 = 0
    for q, y in zip(queries, query_labels):
        sims = [(float(q @ b), j) for j, b in enumerate(bank)]
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * num_classes
        for sim, j in sims[:min(k, len(bank))]:
            scores[int(bank_labels[j])] += math.exp(sim / t)
        ranked = sorted(range(num_classes), key=lambda c: (-scores[c], c))  # ties: lower class
        c1 += ranked[0] == int(y)
        c5 += int(y) in ranked[:5]
    n = len(query_labels)
    return 100.0 * c1 / n, 100.0 * c5 / n


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_bank,n_query,dim,classes", [(300, 57, 16, 10), (40, 23, 8, 6)])
def test_knn_matches_brute_force(n_bank, n_query, dim, classes):
    g = torch.Generator().manual_seed(n_bank)
    bank = torch.randn(n_bank, dim, generator=g)
    bl = torch.randint(0, classes, (n_bank,), generator=g)
    q = torch.randn(n_query, dim, generator=g)
    ql = torch.randint(0, classes, (n_query,), generator=g)
    ks = (1, 10, 20, 100, 200)
    # Small chunks exercise the running top-k merge across bank chunks.
    got = knn_accuracy(bank, bl, q, ql, ks=ks, num_classes=classes, chunk=7, bank_chunk=13)
    default = knn_accuracy(bank, bl, q, ql, ks=ks, num_classes=classes)
    assert got == default
    for k in ks:
        top1, top5 = brute_force_knn(bank, bl, q, ql, k, classes)
        assert got[f"knn_top1_k{k}"] == pytest.approx(top1, abs=1e-9), k
        assert got[f"knn_top5_k{k}"] == pytest.approx(top5, abs=1e-9), k


@pytest.mark.timeout(30)
def test_knn_votes_are_weighted_by_similarity():
    # One very close neighbour of class 1 outweighs two distant ones of class 0 (exp(sim/0.07));
    # an unweighted majority vote would say 0.
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.99, math.sqrt(1 - 0.99**2)], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    labels = torch.tensor([1, 0, 0])
    assert knn_accuracy(bank, labels, q, torch.tensor([1]), ks=(3,))["knn_top1_k3"] == 100.0
    # With a very high temperature the weights are nearly equal: the majority (0) wins.
    assert knn_accuracy(bank, labels, q, torch.tensor([0]), ks=(3,), temperature=1e3)["knn_top1_k3"] == 100.0
    top1, _ = brute_force_knn(bank, labels, q, [1], 3, 2)
    assert top1 == 100.0


@pytest.mark.timeout(30)
def test_knn_score_ties_go_to_the_lower_class():
    # Two identical bank vectors with labels 4 and 2: equal scores; class 2 must win.
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([4, 2, 7])
    q = torch.tensor([[1.0, 0.1]])
    res = knn_accuracy(bank, labels, q, torch.tensor([2]), ks=(2,), num_classes=8)
    assert res["knn_top1_k2"] == 100.0
    assert brute_force_knn(bank, labels, q, [2], 2, 8)[0] == 100.0
    # Top-5 ranks the tied classes first, then zero-score classes by index: 2, 4, 0, 1, 3.
    assert knn_accuracy(bank, labels, q, torch.tensor([3]), ks=(2,), num_classes=8)["knn_top5_k2"] == 100.0
    assert knn_accuracy(bank, labels, q, torch.tensor([5]), ks=(2,), num_classes=8)["knn_top5_k2"] == 0.0


# ---- linear probe and few-shot -------------------------------------------------------------

def separable(n: int, dim: int = 32, classes: int = 10, seed: int = 0):
    """Gaussian clusters around well-separated centres: linearly separable with a margin."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + 0.5 * torch.randn(n, dim, generator=g), y


@pytest.mark.timeout(60)
def test_linear_probe_near_perfect_on_separable_data():
    x, y = separable(2000, seed=0)
    xt, yt = separable(1000, seed=1)
    res = linear_probe(x, y, xt, yt, epochs=20)
    assert res["linear_top1"] >= 99.5
    assert res["linear_train_top1"] >= 99.5
    assert set(res["linear_per_lr"]) == {str(float(lr)) for lr in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)}
    assert res["linear_top1"] == max(res["linear_per_lr"].values())


@pytest.mark.timeout(60)
def test_linear_probe_is_not_fooled_by_shuffled_labels():
    x, y = separable(1000, seed=2)
    xt, yt = separable(500, seed=3)
    yt_shuffled = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(x, y, xt, yt_shuffled, epochs=5)["linear_top1"] < 30


@pytest.mark.timeout(60)
def test_few_shot_draws_are_reproducible_from_the_seed():
    labels = np.repeat(np.arange(5), 20)
    a = few_shot_indices(labels, 3, draw=0, seed=7)
    assert np.array_equal(a, few_shot_indices(labels, 3, draw=0, seed=7))
    assert not np.array_equal(a, few_shot_indices(labels, 3, draw=1, seed=7))
    assert not np.array_equal(a, few_shot_indices(labels, 3, draw=0, seed=8))
    assert len(a) == 15 and len(set(a.tolist())) == 15
    assert np.bincount(labels[a]).tolist() == [3] * 5
    with pytest.raises(ValueError, match="class 4 has 2 train rows"):
        few_shot_indices(np.array([0, 0, 0, 4, 4]), 3, 0)

    x, y = separable(400, seed=4)
    xt, yt = separable(200, seed=5)
    r1 = few_shot(x, y, xt, yt, shots=(1, 5), draws=3, seed=11)
    r2 = few_shot(x, y, xt, yt, shots=(1, 5), draws=3, seed=11)
    assert r1 == r2
    assert len(r1["1"]["runs"]) == 3
    assert r1["5"]["mean"] >= 95.0
    assert r1["1"]["std"] == pytest.approx(float(np.std(r1["1"]["runs"], ddof=1)), abs=1e-3)
    # A shot count larger than a class is skipped, not fatal.
    r3 = few_shot(x[:30], y[:30], xt, yt, shots=(1, 50), draws=2)
    assert r3["50"]["mean"] is None and "only" in r3["50"]["skipped"] and r3["1"]["mean"] is not None


# ---- features, cache, the eval job ---------------------------------------------------------

@torch.no_grad()
def teacher_cls(learner: Learner, imgs: torch.Tensor) -> torch.Tensor:
    """The learner's teacher backbone output on uint8 images: the k-NN feature, by hand."""
    return learner.teacher.backbone.eval()(normalize(imgs, learner.mean, learner.std))

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real training state after two steps of the tiny config (ViT-micro, 32 px, patch 4)."""
    cfg = make_tiny_config("run.seed=3")
    learner = Learner(cfg)
    for s in range(2):
        learner.step(*make_crops(cfg, seed=s))
    d = tmp_path_factory.mktemp("run") / "checkpoint_000000002"
    save_checkpoint(learner.state_dict(), d)
    return d


@pytest.mark.timeout(120)
def test_teacher_features_equal_the_learners(tiny_checkpoint):
    teacher = load_teacher(tiny_checkpoint.parent)  # a run directory resolves to its newest checkpoint
    assert teacher.checkpoint == tiny_checkpoint.absolute() and teacher.global_step == 2
    from massl_ray.method.checkpoint import load_checkpoint

    learner = Learner(make_tiny_config("run.seed=3"))
    learner.load_state_dict(load_checkpoint(tiny_checkpoint))
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    embed = TeacherFeatures(teacher.backbone, teacher.cfg.crops.mean, teacher.cfg.crops.std, blocks=4)
    f = embed(imgs)
    assert f.shape == (5, 4, 192)
    torch.testing.assert_close(f[:, -1], teacher_cls(learner, imgs), rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_eval_local_writes_json_and_markdown_and_reuses_the_cache(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--checkpoint", str(tiny_checkpoint), "--train-data", str(QUICK_TRAIN),
                   "--test-data", str(QUICK_TEST), "--out", str(out), "--local",
                   "--limit-train", "300", "--limit-test", "100", "--linear-epochs", "5",
                   "--few-shot", "1,2", "--few-shot-draws", "2", "--threads", "1"])
    assert rc == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["train"]["rows"] == 300 and r["test"]["rows"] == 100 and r["num_classes"] == 10
    assert set(r["knn"]) == {f"knn_top{t}_k{k}" for t in (1, 5) for k in (10, 20, 100, 200)}
    assert 0 <= r["knn_top1"] <= 100 and r["knn_top1"] == r["knn"]["knn_top1_k20"]
    assert 0 <= r["linear_top1"] <= 100 and r["linear"]["linear_feature_dim"] == 4 * 192
    assert set(r["few_shot"]) == {"1", "2"}
    assert not r["timings"]["features_train"]["cached"]
    md = (out / "eval.md").read_text()
    assert "k-NN" in md and "Linear probe" in md and "Few-shot" in md
    # k-NN from the cached features equals k-NN from features computed now.
    cache = FeatureCache(out / "features")
    teacher = load_teacher(tiny_checkpoint)
    src = open_source(str(QUICK_TRAIN), require_labels=True)
    cached = cache.load("train", cache_key(teacher.sha256, src, 300, 32, 4))
    fresh = extract_in_process(TeacherFeatures(teacher.backbone, teacher.cfg.crops.mean,
                                               teacher.cfg.crops.std, 4), src, 32, 300)
    torch.testing.assert_close(cached.features, fresh.features, rtol=0, atol=0)
    assert torch.equal(cached.labels, fresh.labels)
    # A second evaluation reuses the cache: same numbers, features not recomputed.
    s = EvalSettings.from_dict({"train_data": str(QUICK_TRAIN), "test_data": str(QUICK_TEST),
                                "limit_train": 300, "limit_test": 100, "local": True,
                                "linear_epochs": 5, "few_shot": [1, 2], "few_shot_draws": 2})
    r2 = evaluate_checkpoint(tiny_checkpoint, s, out)
    assert r2["timings"]["features_train"]["cached"] and r2["timings"]["features_test"]["cached"]
    assert r2["knn"] == r["knn"] and r2["linear_top1"] == r["linear_top1"]


def image_folder(root: Path, n: int = 64) -> Path:
    """The first n test images as class sub-folders ("00_c", "01_c", ...: sorted = label order)."""
    import pyarrow.parquet as pq

    t = pq.read_table(QUICK_TEST, columns=["image", "label"]).slice(0, n)
    for i, (img, lab) in enumerate(zip(t.column("image").to_pylist(), t.column("label").to_pylist())):
        d = root / f"{lab:02d}_c"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.jpg").write_bytes(img)
    return root


@pytest.mark.timeout(120)
def test_class_folder_source_gives_the_same_features_and_labels(tiny_checkpoint, tmp_path):
    teacher = load_teacher(tiny_checkpoint)
    embed = TeacherFeatures(teacher.backbone, teacher.cfg.crops.mean, teacher.cfg.crops.std, 2)
    folder = open_source(str(image_folder(tmp_path / "imgs", 40)), require_labels=True)
    parquet = open_source(str(QUICK_TEST), require_labels=True)
    a = extract_in_process(embed, folder, 32)
    b = extract_in_process(embed, parquet, 32, limit=40)
    # Folder order is by class then file name: compare as sets of (label, feature) rows.
    oa, ob = torch.argsort(a.labels, stable=True), torch.argsort(b.labels, stable=True)
    assert torch.equal(a.labels[oa], b.labels[ob])
    torch.testing.assert_close(a.features[oa], b.features[ob], rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_eval_refuses_bad_input(tiny_checkpoint, tmp_path, capsys):
    rc = cli_main(["eval", "--checkpoint", str(tmp_path / "nope"), "--train-data", str(QUICK_TRAIN),
                   "--test-data", str(QUICK_TEST), "--local"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli_main(["eval", "--checkpoint", str(tiny_checkpoint), "--train-data",
                   str(tmp_path / "missing.parquet"), "--test-data", str(QUICK_TEST), "--local"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli_main(["eval", "--checkpoint", str(tiny_checkpoint), "--train-data", str(QUICK_TRAIN),
                   "--test-data", str(QUICK_TEST), "--local", "--ks", "0,20"])
    assert rc == 2 and "ks" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_online_knn_monitor():
    cfg = make_tiny_config(f"data.eval_train={QUICK_TRAIN}", f"data.eval_test={QUICK_TEST}")
    learner = Learner(cfg)
    tr = open_source(str(QUICK_TRAIN), require_labels=True)
    te = open_source(str(QUICK_TEST), require_labels=True)
    mon = OnlineKnn.from_sources(tr, te, 32, every=3, train_rows=200, test_rows=50, k=20)
    assert len(mon.bank_labels) == 200 and len(mon.query_labels) == 50
    first = mon(learner)
    assert set(first) == {"online_knn_top1", "online_knn_step", "online_knn_s"}
    assert first["online_knn_step"] == 0 and 0 <= first["online_knn_top1"] <= 100
    # Equal to an offline k-NN on the same images.
    ref = knn_accuracy(teacher_cls(learner, mon.bank_views), mon.bank_labels,
                       teacher_cls(learner, mon.query_views), mon.query_labels, ks=(20,))
    assert first["online_knn_top1"] == ref["knn_top1_k20"]
    learner.step(*make_crops(cfg, seed=0))
    learner.step(*make_crops(cfg, seed=1))
    assert mon(learner) == first  # step 2: not due, the last value is carried
    learner.step(*make_crops(cfg, seed=2))
    third = mon(learner)
    assert third["online_knn_step"] == 3
    ref = knn_accuracy(teacher_cls(learner, mon.bank_views), mon.bank_labels,
                       teacher_cls(learner, mon.query_views), mon.query_labels, ks=(20,))
    assert third["online_knn_top1"] == ref["knn_top1_k20"]
    # From the config: off unless run.online_knn_every_steps > 0.
    assert OnlineKnn.from_config(cfg) is None


@pytest.mark.timeout(180)
def test_online_knn_is_reported_during_training(tmp_path):
    """run.online_knn_every_steps: the loop (local mode) logs online_knn_top1 with its metrics."""
    from massl_ray.config import load_config
    from massl_ray.train.trainer import train

    over = {
        "model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 2,
        "model.head_hidden_dim": 64, "model.head_out_dim": 32,
        "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
        "massl.memory_size": 512, "massl.block_size": 128,
        "optim.batch_size_per_worker": 16, "optim.epochs": 1,
        "data.train": str(QUICK_TRAIN), "data.limit": 96,
        "data.eval_train": str(QUICK_TRAIN), "data.eval_test": str(QUICK_TEST),
        "run.name": "online", "run.storage_path": str(tmp_path), "run.log_every_steps": 2,
        "run.checkpoint_every_steps": 6, "run.final_knn": False, "run.num_workers": 0,
        "run.online_knn_every_steps": 4, "run.online_knn_train_rows": 100,
        "run.online_knn_test_rows": 50,
    }
    res = train(load_config(None, [f"{k}={v}" for k, v in over.items()]), local=True)
    lines = [json.loads(x) for x in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6]
    # Measured at the first log step, then again once 4 steps have passed; carried in between.
    assert [m["online_knn_step"] for m in lines] == [2, 2, 6]
    assert all(0 <= m["online_knn_top1"] <= 100 for m in lines)
    assert res["metrics"]["online_knn_step"] == 6


# ---- Ray Data batch inference --------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_data_batch_inference_equals_in_process(ray_instance, tiny_checkpoint, tmp_path):
    base = {"train_data": str(QUICK_TRAIN), "test_data": str(QUICK_TEST), "limit_train": 200,
            "limit_test": 64, "linear_epochs": 3, "few_shot": [1], "few_shot_draws": 2,
            "batch_size": 64, "decode_cpus": 0.5, "concurrency": 2}
    r_ray = evaluate_checkpoint(tiny_checkpoint, EvalSettings.from_dict({**base, "local": False}),
                                tmp_path / "ray")
    r_loc = evaluate_checkpoint(tiny_checkpoint, EvalSettings.from_dict({**base, "local": True}),
                                tmp_path / "local")
    assert r_ray["timings"]["features_train"]["mode"] == "ray_data"
    assert r_loc["timings"]["features_train"]["mode"] == "in_process"
    for split in ("train", "test"):
        a = np.load(next((tmp_path / "ray" / "features").glob(f"{split}-*.npz")))
        b = np.load(next((tmp_path / "local" / "features").glob(f"{split}-*.npz")))
        np.testing.assert_array_equal(a["labels"], b["labels"])  # row order preserved
        np.testing.assert_allclose(a["features"], b["features"], rtol=0, atol=1e-5)
    assert r_ray["knn"] == r_loc["knn"]
    # A class-folder test set goes through Ray Data's binary-file reader (a second pipeline).
    folder = str(image_folder(tmp_path / "imgs", 48))
    r_f = evaluate_checkpoint(tiny_checkpoint, EvalSettings.from_dict(
        {**base, "test_data": folder, "limit_test": None, "local": False}), tmp_path / "ray")
    assert r_f["timings"]["features_train"]["cached"] and r_f["test"]["rows"] == 48
    r_fl = evaluate_checkpoint(tiny_checkpoint, EvalSettings.from_dict(
        {**base, "test_data": folder, "limit_test": None, "local": True}), tmp_path / "local")
    assert r_f["knn"] == r_fl["knn"]


# ---- low-shot, retrieval and revisited selected in eval ------------------------------------

@pytest.mark.timeout(30)
def test_eval_settings_parse_the_new_evaluations():
    s = EvalSettings.from_dict({"train_data": "a", "test_data": "b", "low_shot": "true",
                                "low_shot_shots": "1,2", "low_shot_fractions": 0.05,
                                "retrieval": True, "retrieval_ks": [1, 3],
                                "revisited": "x/roxford5k,y/rparis6k", "revisited_scales": "1,0.5"})
    assert s.low_shot and s.low_shot_shots == (1, 2) and s.low_shot_fractions == (0.05,)
    assert s.retrieval_ks == (1, 3) and s.revisited == ("x/roxford5k", "y/rparis6k")
    assert s.revisited_scales == (1.0, 0.5)
    assert EvalSettings.from_dict(s.to_dict()).to_dict() == s.to_dict()  # round trip (sweeps)
    from massl_ray.config import ConfigError

    with pytest.raises(ConfigError, match="low_shot_fractions"):
        EvalSettings.from_dict({"low_shot": True, "low_shot_fractions": [1.5]})
    with pytest.raises(ConfigError, match="retrieval_ks"):
        EvalSettings.from_dict({"retrieval": True, "retrieval_ks": [0]})
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate_checkpoint("unused", EvalSettings())


@pytest.mark.timeout(180)
def test_eval_runs_low_shot_retrieval_and_revisited(tiny_checkpoint, tmp_path):
    from test_retrieval import EASY_A, HARD_A, MEDIUM_A, write_synthetic_revisited

    from massl_ray.evaluate.lowshot import low_shot
    from massl_ray.evaluate.retrieval import class_retrieval

    rsynth = write_synthetic_revisited(tmp_path / "rsynth")
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--checkpoint", str(tiny_checkpoint), "--train-data", str(QUICK_TRAIN),
                   "--test-data", str(QUICK_TEST), "--out", str(out), "--local",
                   "--limit-train", "300", "--limit-test", "80", "--no-linear", "--few-shot", "",
                   "--low-shot", "--low-shot-shots", "1,2", "--low-shot-fractions", "0.1",
                   "--low-shot-draws", "2", "--retrieval", "--retrieval-ks", "1,10",
                   "--revisited", str(rsynth), "--revisited-imsize", "64"])
    assert rc == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["linear"] is None and r["few_shot"] is None
    # The numbers are those of the metric functions on the evaluation's own (cached) features.
    cache = FeatureCache(out / "features")
    teacher = load_teacher(tiny_checkpoint)
    ftr = cache.load("train", cache_key(teacher.sha256, open_source(str(QUICK_TRAIN), require_labels=True), 300, 32, 4))
    fte = cache.load("test", cache_key(teacher.sha256, open_source(str(QUICK_TEST), require_labels=True), 80, 32, 4))
    assert r["retrieval"] == json.loads(json.dumps(
        class_retrieval(fte.cls, fte.labels, ftr.cls, ftr.labels, ks=(1, 10))))
    ls = low_shot(ftr.cls, ftr.labels, fte.cls, fte.labels, (1, 2), (0.1,), 2, 0, 1.0, 10)
    assert r["low_shot"] == json.loads(json.dumps(ls))
    assert r["low_shot"]["10%"]["train_rows"] == sum(max(1, round(0.1 * n))
                                                     for n in np.bincount(ftr.labels.numpy()))
    # The synthetic revisited set: mAP known by construction, whatever the backbone.
    rv = r["revisited"]["rsynth"]
    assert rv["medium"]["map"] == pytest.approx(100 * (MEDIUM_A + 1) / 2, abs=1e-6)
    assert rv["hard"]["map"] == pytest.approx(100 * (HARD_A + 1) / 2, abs=1e-6)
    assert rv["easy"]["map"] == pytest.approx(100 * EASY_A, abs=1e-6)
    assert not rv["features_cached"]
    md = (out / "eval.md").read_text()
    assert "Low-shot" in md and "Class-level retrieval" in md and "Revisited rsynth" in md
    # Revisited alone (no classification data); its features come from the cache now.
    rc = cli_main(["eval", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--local",
                   "--revisited", str(rsynth), "--revisited-imsize", "64"])
    r2 = json.loads((out / "eval.json").read_text())
    assert rc == 0 and r2["knn"] is None and r2["revisited"]["rsynth"]["features_cached"]
    for setting in ("easy", "medium", "hard"):
        assert r2["revisited"]["rsynth"][setting]["ap_per_query"] == rv[setting]["ap_per_query"]
    assert set(r2["revisited"]["rsynth"]["medium"]["mp_at"]) == {"1", "5", "10"}  # default ks
