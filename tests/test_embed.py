"""embed: sharded Parquet embeddings bit-equal to the evaluations' features (in-process and
Ray Data); ids, labels, undecodable rows; exported safetensors (ours and a foreign timm ViT
with a classifier head and a sidecar) accepted by embed and eval."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from safetensors.torch import save_file

from massl_ray.cli import main as cli_main
from massl_ray.evaluate.features import TeacherFeatures, extract_in_process, load_teacher
from massl_ray.evaluate.jobs import EvalSettings, embed_source, evaluate_checkpoint
from massl_ray.data.sources import open_source
from massl_ray.method.checkpoint import save_checkpoint
from massl_ray.method.learner import Learner, normalize

from conftest import make_crops, make_tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"
QUICK_TEST = ROOT / "jobs" / "data" / "cifar10-quick" / "test.parquet"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = make_tiny_config("model.depth=2", "run.seed=7")
    learner = Learner(cfg)
    learner.step(*make_crops(cfg, seed=0))
    d = tmp_path_factory.mktemp("run") / "checkpoint_000000001"
    save_checkpoint(learner.state_dict(), d)
    return d


def read_embeddings(out_dir) -> dict:
    """All shards of an embed output directory as numpy arrays (``row``, ``id``, ``label``,
    ``embedding``), in order."""
    files = sorted(Path(out_dir).glob("part-*.parquet"))
    assert files, f"{out_dir} holds no part-*.parquet"
    tables = [pq.read_table(f) for f in files]
    out: dict = {}
    for name in tables[0].column_names:
        if name == "embedding":
            out[name] = np.concatenate([np.stack(t.column(name).to_numpy(zero_copy_only=False))
                                        if t.num_rows else np.zeros((0, 0), np.float32)
                                        for t in tables]).astype(np.float32)
        elif name == "id":
            out[name] = sum((t.column(name).to_pylist() for t in tables), [])
        else:
            out[name] = np.concatenate([t.column(name).to_numpy() for t in tables])
    return out


def eval_features(model_path, src, limit, batch):
    t = load_teacher(model_path)
    return extract_in_process(TeacherFeatures(t.backbone, t.mean, t.std, 4, batch_size=batch),
                              src, 32, limit, batch_rows=batch)


@pytest.mark.timeout(120)
def test_embed_local_is_bit_equal_to_the_evaluation_features(ckpt, tmp_path, capsys):
    out = tmp_path / "emb"
    rc = cli_main(["embed", "--checkpoint", str(ckpt), "--data", str(QUICK_TEST), "--out", str(out),
                   "--local", "--limit", "100", "--rows-per-shard", "40", "--batch-size", "32"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "embed: 100/100 rows (100%)" in err
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert [pq.read_metadata(out / f"part-0000{i}.parquet").num_rows for i in range(3)] == [40, 40, 20]
    e = read_embeddings(out)
    fs = eval_features(ckpt, open_source(str(QUICK_TEST), require_labels=True), 100, 32)
    np.testing.assert_array_equal(e["embedding"], fs.cls.numpy())  # bit-equal
    np.testing.assert_array_equal(e["label"], fs.labels.numpy())
    np.testing.assert_array_equal(e["row"], np.arange(100))
    images = pq.read_table(QUICK_TEST, columns=["image"]).column("image").to_pylist()[:100]
    assert e["id"] == ["sha1:" + hashlib.sha1(b).hexdigest()[:16] for b in images]
    m = json.loads((out / "_embed.json").read_text())
    assert m["rows"] == 100 and m["dim"] == 192 and m["skipped"] == 0 and m["mode"] == "in_process"
    # --blocks 2: the linear-probe feature of the last two blocks.
    rc = cli_main(["embed", "--checkpoint", str(ckpt), "--data", str(QUICK_TEST), "--out",
                   str(tmp_path / "emb2"), "--local", "--limit", "50", "--blocks", "2",
                   "--batch-size", "32"])
    fs50 = eval_features(ckpt, open_source(str(QUICK_TEST), require_labels=True), 50, 32)
    np.testing.assert_array_equal(read_embeddings(tmp_path / "emb2")["embedding"], fs50.concat(2).numpy())
    # An output directory that already holds shards is refused.
    assert cli_main(["embed", "--checkpoint", str(ckpt), "--data", str(QUICK_TEST), "--out",
                     str(out), "--local", "--limit", "10"]) == 2
    assert "already holds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already holds"):
        embed_source(ckpt, str(QUICK_TEST), out, EvalSettings(local=True), limit=10)


@pytest.mark.timeout(120)
def test_embed_unlabeled_folder_with_a_bad_file(ckpt, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    images = pq.read_table(QUICK_TEST, columns=["image"]).column("image").to_pylist()[:6]
    for i, b in enumerate(images):
        (folder / f"{i}.jpg").write_bytes(b)
    (folder / "3.jpg").write_bytes(b"not an image")
    m = embed_source(ckpt, str(folder), tmp_path / "out", EvalSettings(local=True, batch_size=4),
                     progress=None)
    e = read_embeddings(tmp_path / "out")
    assert m["rows"] == 5 and m["skipped"] == 1 and not m["labeled"] and "label" not in e
    assert e["id"] == [str(folder / f"{i}.jpg") for i in (0, 1, 2, 4, 5)]
    np.testing.assert_array_equal(e["row"], [0, 1, 2, 4, 5])
    t = load_teacher(ckpt)
    from massl_ray.data.multicrop import eval_transform
    from massl_ray.data.images import decode_image

    views = eval_transform([decode_image(images[i]) for i in (0, 1, 2, 4, 5)], 32)
    with torch.no_grad():
        ref = t.backbone(normalize(views, torch.tensor(t.mean), torch.tensor(t.std)))
    np.testing.assert_allclose(e["embedding"], ref.numpy(), rtol=0, atol=1e-5)


@pytest.mark.timeout(180)
def test_exported_backbones_are_accepted_by_embed_and_eval(ckpt, tmp_path, capsys):
    exported = tmp_path / "teacher.safetensors"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(exported)]) == 0
    t_ckpt, t_exp = load_teacher(ckpt), load_teacher(exported)
    assert t_exp.kind == "exported" and t_exp.global_step == 1 and t_exp.image_size == 32
    assert t_exp.mean == t_ckpt.mean and t_exp.sha256 != t_ckpt.sha256
    s = EvalSettings(local=True, batch_size=32)
    a = embed_source(ckpt, str(QUICK_TEST), tmp_path / "a", s, limit=64, progress=None)
    b = embed_source(exported, str(QUICK_TEST), tmp_path / "b", s, limit=64, progress=None)
    assert b["kind"] == "exported" and a["rows"] == b["rows"] == 64
    np.testing.assert_array_equal(read_embeddings(tmp_path / "a")["embedding"],
                                  read_embeddings(tmp_path / "b")["embedding"])
    base = {"train_data": str(QUICK_TRAIN), "test_data": str(QUICK_TEST), "limit_train": 200,
            "limit_test": 50, "local": True, "linear": False, "few_shot": [1], "few_shot_draws": 1,
            "retrieval": True}
    r1 = evaluate_checkpoint(ckpt, EvalSettings.from_dict(base), tmp_path / "e1")
    rc = cli_main(["eval", "--checkpoint", str(exported), "--train-data", str(QUICK_TRAIN),
                   "--test-data", str(QUICK_TEST), "--limit-train", "200", "--limit-test", "50",
                   "--local", "--no-linear", "--few-shot", "1", "--few-shot-draws", "1",
                   "--retrieval", "--out", str(tmp_path / "e2")])
    assert rc == 0
    r2 = json.loads((tmp_path / "e2" / "eval.json").read_text())
    assert r2["kind"] == "exported" and r2["knn"] == r1["knn"] and r2["retrieval"] == r1["retrieval"]

    # A foreign timm ViT: its own weights with a 10-class head, a sidecar naming it.
    torch.manual_seed(0)
    kwargs = {"patch_size": 8, "img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 3}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs).eval()
    foreign = tmp_path / "foreign" / "vit.safetensors"
    foreign.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(foreign))
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    foreign.with_suffix(".json").write_text(json.dumps(
        {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs, "mean": mean, "std": std}))
    t_f = load_teacher(foreign)
    assert t_f.image_size == 32 and t_f.global_step is None
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = normalize(imgs, torch.tensor(mean), torch.tensor(std))
    with torch.no_grad():  # the pre-logits [CLS] of the original model (head dropped)
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
    got = TeacherFeatures(t_f.backbone, t_f.mean, t_f.std, 1)(imgs)[:, -1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    m = embed_source(foreign, str(QUICK_TEST), tmp_path / "f", EvalSettings(local=True),
                     limit=8, progress=None)
    assert m["dim"] == 48 and m["kind"] == "exported"
    # Weights that do not fit the named model are refused with the reason.
    foreign.with_suffix(".json").write_text(json.dumps(
        {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {**kwargs, "depth": 3}}))
    rc = cli_main(["embed", "--checkpoint", str(foreign), "--data", str(QUICK_TEST), "--out",
                   str(tmp_path / "g"), "--local"])
    assert rc == 2 and "do not fit" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_embed_ray_data_equals_local(ray_instance, ckpt, tmp_path):
    s = {"batch_size": 32, "decode_cpus": 0.5, "concurrency": 1}
    loc = embed_source(ckpt, str(QUICK_TEST), tmp_path / "loc", EvalSettings.from_dict({**s, "local": True}),
                       limit=100, rows_per_shard=48, progress=None)
    ray_ = embed_source(ckpt, str(QUICK_TEST), tmp_path / "ray", EvalSettings.from_dict({**s, "local": False}),
                        limit=100, rows_per_shard=48, progress=None)
    assert ray_["mode"] == "ray_data" and ray_["shards"] == loc["shards"] and ray_["rows"] == 100
    assert len(ray_["shards"]) == 3
    a, b = read_embeddings(tmp_path / "loc"), read_embeddings(tmp_path / "ray")
    assert a["id"] == b["id"]
    np.testing.assert_array_equal(a["row"], b["row"])
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["embedding"], b["embedding"])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_revisited_through_ray_data_equals_in_process(ray_instance, ckpt, tmp_path):
    """Revisited features by Ray Data (in this module to share its Ray instance)."""
    from test_retrieval import MEDIUM_A, write_synthetic_revisited

    root = write_synthetic_revisited(tmp_path / "rsynth")
    base = {"revisited": [str(root)], "revisited_imsize": 64, "concurrency": 1}
    r_ray = evaluate_checkpoint(ckpt, EvalSettings.from_dict({**base, "local": False}), tmp_path / "ray")
    r_loc = evaluate_checkpoint(ckpt, EvalSettings.from_dict({**base, "local": True}), tmp_path / "loc")
    a = np.load(next((tmp_path / "ray" / "features").glob("revisited-rsynth-*.npz")))
    b = np.load(next((tmp_path / "loc" / "features").glob("revisited-rsynth-*.npz")))
    for k in ("database", "queries"):
        np.testing.assert_array_equal(a[k], b[k])  # same images in the same order, bit for bit
    rv = r_ray["revisited"]["rsynth"]
    assert rv["medium"]["map"] == pytest.approx(100 * (MEDIUM_A + 1) / 2, abs=1e-6)
    assert rv["hard"] == r_loc["revisited"]["rsynth"]["hard"]
