"""Retrieval: class-level mAP / precision@k against hand-built rankings and a brute-force
reference; the revisited Oxford/Paris protocol (Easy/Medium/Hard, junk removed, trapezoid AP,
mP@k) on hand-computed cases and on a synthetic data set in the gnd_*.pkl format whose mAP is
known by construction; DINO's multi-scale descriptor against a direct computation."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from massl_ray.evaluate.retrieval import (MultiScaleFeatures, class_retrieval, evaluate_revisited,
                                          load_revisited, prepare_image,
                                          revisited_features, revisited_metrics)
from massl_ray.method.model import build_backbone

from conftest import make_tiny_config


def fan(n: int) -> torch.Tensor:
    """n unit vectors at angles 0, 5, 10, ... degrees: similarity to [1, 0] falls with the index."""
    a = torch.arange(n, dtype=torch.float64) * math.radians(5)
    return torch.stack([a.cos(), a.sin()], 1).float()


# ---- class-level ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_class_retrieval_hand_built_rankings():
    db = fan(6)
    # Query 0 = [1, 0] ranks the database 0..5; relevance (label 1) 1 0 1 0 0 1.
    # Query 1 = the 6th vector mirrored ranks it 5..0; label 2 at db 4 only -> rank 2.
    db_labels = torch.tensor([1, 0, 1, 0, 2, 1])
    q = torch.stack([torch.tensor([1.0, 0.0]), db[5] * 1.0])
    ql = torch.tensor([1, 2])
    r = class_retrieval(q, ql, db, db_labels, ks=(1, 2, 5))
    ap0 = (1 / 1 + 2 / 3 + 3 / 6) / 3
    ap1 = 1 / 2
    assert r["map"] == pytest.approx(100 * (ap0 + ap1) / 2, abs=1e-9)
    assert r["precision_at"]["1"] == pytest.approx(100 * (1 + 0) / 2)
    assert r["precision_at"]["2"] == pytest.approx(100 * (1 / 2 + 1 / 2) / 2)
    assert r["precision_at"]["5"] == pytest.approx(100 * (2 / 5 + 1 / 5) / 2)
    assert r["queries"] == 2 and r["no_positive"] == 0
    # A query of a class absent from the database is left out and counted.
    r2 = class_retrieval(torch.cat([q, q[:1]]), torch.tensor([1, 2, 9]), db, db_labels, ks=(1,))
    assert r2["queries"] == 2 and r2["no_positive"] == 1 and r2["map"] == pytest.approx(r["map"])
    # Ties (equal similarities) rank by database index: two identical vectors, the relevant
    # one second -> AP 1/2; the relevant one first -> AP 1.
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert class_retrieval(same[:1], torch.tensor([1]), same, torch.tensor([0, 1]))["map"] == 50.0
    assert class_retrieval(same[:1], torch.tensor([1]), same, torch.tensor([1, 0]))["map"] == 100.0


def reference_map(q, ql, db, dl, ks, exclude_self=False):
    """Independent: float64 numpy, Python lists and an explicit sort per query."""
    q = np.asarray(q, np.float64)
    db = np.asarray(db, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    aps, precs = [], {k: [] for k in ks}
    for i in range(len(q)):
        cand = [(-(q[i] @ db[j]), j) for j in range(len(db)) if not (exclude_self and j == i)]
        cand.sort()
        rel = [int(dl[j]) == int(ql[i]) for _, j in cand]
        if not any(rel):
            continue
        hits, s = 0, 0.0
        for r, x in enumerate(rel, 1):
            if x:
                hits += 1
                s += hits / r
        aps.append(s / sum(rel))
        for k in ks:
            precs[k].append(sum(rel[:k]) / k)
    return 100 * np.mean(aps), {str(k): 100 * np.mean(v) for k, v in precs.items()}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_class_retrieval_matches_a_brute_force_reference(exclude_self):
    g = torch.Generator().manual_seed(8)
    db = torch.randn(60, 6, generator=g)
    dl = torch.randint(0, 5, (60,), generator=g)
    q, ql = (db, dl) if exclude_self else (torch.randn(31, 6, generator=g),
                                           torch.randint(0, 5, (31,), generator=g))
    # No two similarities of a query closer than 1e-5: float32 and float64 rank alike.
    qn, dn = F.normalize(q.double(), dim=1), F.normalize(db.double(), dim=1)
    assert min(float(np.diff(np.sort(r)).min()) for r in (qn @ dn.T).numpy()) > 1e-5
    ks = (1, 5, 10)
    got = class_retrieval(q, ql, db, dl, ks=ks, exclude_self=exclude_self, chunk=7)
    m, p = reference_map(q.numpy(), ql.numpy(), db.numpy(), dl.numpy(), ks, exclude_self)
    assert got["map"] == pytest.approx(m, abs=1e-6)
    for k in ks:
        assert got["precision_at"][str(k)] == pytest.approx(p[str(k)], abs=1e-6)
    # Including itself, every query finds itself first: mAP can only go up.
    if exclude_self:
        assert class_retrieval(q, ql, db, dl)["precision_at"]["1"] == 100.0


# ---- revisited protocol: metrics -----------------------------------------------------------

# Query a's ranking in the synthetic set below: A's copies 0 2 4 5 7 (ties by index), then the
# B and C copies 1 3 6 8 (any order: all negatives for a). 0 negative, 2 hard, 4 easy, 5 junk,
# 7 hard.
GND_A = {"easy": [4], "hard": [2, 7], "junk": [5], "bbx": None}
ORDER_A = np.array([0, 2, 4, 5, 7, 1, 3, 6, 8])
# Trapezoid AP by hand: sum over positives of (p_before + p_at) / 2, over n_pos.
MEDIUM_A = ((0 / 1 + 1 / 2) + (1 / 2 + 2 / 3) + (2 / 3 + 3 / 4)) / (2 * 3)  # 5 removed: ranks 1 2 3
HARD_A = ((0 / 1 + 1 / 2) + (1 / 2 + 2 / 3)) / (2 * 2)  # 4 and 5 removed: 2 -> rank 1, 7 -> 2
EASY_A = (0 / 1 + 1 / 2) / 2  # 2 5 7 removed: 4 -> rank 1


@pytest.mark.timeout(30)
def test_revisited_metrics_by_hand():
    # Query b: its copies 1 (junk) and 6 (hard) first; no easy positive.
    gnd_b = {"easy": [], "hard": [6], "junk": [1]}
    order = np.stack([ORDER_A, np.array([1, 6, 0, 2, 3, 4, 5, 7, 8])])
    r = revisited_metrics(order, [GND_A, gnd_b], ks=(1, 5, 10))
    assert r["medium"]["ap_per_query"] == pytest.approx([100 * MEDIUM_A, 100.0], abs=1e-4)
    assert r["medium"]["map"] == pytest.approx(100 * (MEDIUM_A + 1) / 2, abs=1e-9)
    assert r["hard"]["map"] == pytest.approx(100 * (HARD_A + 1) / 2, abs=1e-9)
    # Easy: query b has no easy positive -> left out.
    assert r["easy"]["map"] == pytest.approx(100 * EASY_A, abs=1e-9)
    assert r["easy"]["queries"] == 1 and r["easy"]["no_positive"] == 1
    # mP@k, the protocol's definition: precision at min(k, 1-based rank of the last positive).
    # Medium a: 1-based ranks 2 3 4 -> @1: 0/1, @5: 3/4 (cut at 4), @10: 3/4; b: rank 1 -> 1.
    assert r["medium"]["mp_at"]["1"] == pytest.approx(100 * (0 + 1) / 2)
    assert r["medium"]["mp_at"]["5"] == pytest.approx(100 * (3 / 4 + 1) / 2)
    assert r["medium"]["mp_at"]["10"] == pytest.approx(100 * (3 / 4 + 1) / 2)
    # Hard a: ranks 2 3 -> @5: min(3, 5) = 3: 2/3.
    assert r["hard"]["mp_at"]["5"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    # Perfect ranking: positives first, in any order among themselves -> 100.
    perfect = np.array([[4, 2, 7, 0, 1, 3, 5, 6, 8]])
    assert revisited_metrics(perfect, [GND_A])["medium"]["map"] == pytest.approx(100.0)
    # Junk is ignored wherever it is: moving junk 5 to the front changes nothing.
    moved = np.array([[5, 0, 2, 4, 7, 1, 3, 6, 8]])
    assert revisited_metrics(moved, [GND_A])["medium"]["map"] == pytest.approx(100 * MEDIUM_A)


# ---- revisited protocol: a synthetic data set ----------------------------------------------

def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")  # lossless: a crop equals the copy exactly
    return b.getvalue()


def write_synthetic_revisited(root: Path) -> Path:
    """Three distinct 40x40 images A, B, C; the database holds exact copies of them, so every
    query's copies rank first (similarity 1, ties by index) whatever the backbone. Query a is A
    inside a larger canvas, cropped back to A by its bbx; query b is B (full-image box).

    The images are PNG bytes in ``jpg/<name>.jpg`` (the protocol's file names; the decoder
    reads the content)."""
    rng = np.random.default_rng(0)
    A = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:40, 0:40]
    B = np.stack([yy * 6, xx * 6, (yy + xx) * 3], -1).astype(np.uint8)
    C = (((yy // 5 + xx // 5) % 2) * 255)[..., None].repeat(3, -1).astype(np.uint8)
    canvas = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
    canvas[4:44, 8:48] = A
    groups = "ABACAABAC"  # database 0..8: A at 0 2 4 5 7, B at 1 6, C at 3 8
    imgs = {"A": A, "B": B, "C": C}
    (root / "jpg").mkdir(parents=True)
    imlist = []
    for i, g in enumerate(groups):
        name = f"db_{i}_{g}"
        (root / "jpg" / f"{name}.jpg").write_bytes(png(imgs[g]))
        imlist.append(name)
    (root / "jpg" / "q_a.jpg").write_bytes(png(canvas))
    (root / "jpg" / "q_b.jpg").write_bytes(png(B))
    gnd = [{"bbx": [8, 4, 48, 44], "easy": [4], "hard": [2, 7], "junk": [5]},  # 0 is a negative
           {"bbx": [0, 0, 40, 40], "easy": [], "hard": [6], "junk": [1]}]
    with open(root / "gnd_rsynth.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": ["q_a", "q_b"], "gnd": gnd}, f)
    return root


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    cfg = make_tiny_config()
    return build_backbone(cfg.model, 32, 0.0).eval(), cfg


@pytest.mark.timeout(60)
def test_synthetic_revisited_data_set_has_the_constructed_map(backbone, tmp_path):
    bb, cfg = backbone
    ds = load_revisited(write_synthetic_revisited(tmp_path / "rsynth"))
    assert ds.name == "rsynth" and len(ds.imlist) == 9 and len(ds.qimlist) == 2
    embed = MultiScaleFeatures(bb, cfg.crops.mean, cfg.crops.std)
    r = evaluate_revisited(ds, revisited_features(embed, ds, 64), ks=(1, 5, 10))
    # Query a ranks A's copies 0 2 4 5 7 first (the GND_A pattern on them, 0 negative), then
    # B and C copies (all negatives): exactly the hand-computed case above. Query b ranks its
    # copies 1 (junk) and 6 (hard) first: AP 1 in Medium and Hard, no Easy positive.
    assert r["medium"]["ap_per_query"] == pytest.approx([100 * MEDIUM_A, 100.0], abs=1e-4)
    assert r["medium"]["map"] == pytest.approx(100 * (MEDIUM_A + 1) / 2, abs=1e-6)
    assert r["hard"]["map"] == pytest.approx(100 * (HARD_A + 1) / 2, abs=1e-6)
    assert r["easy"]["map"] == pytest.approx(100 * EASY_A, abs=1e-6)
    assert r["medium"]["mp_at"]["1"] == pytest.approx(50.0)
    # The bbx crop matters: without it query a is the canvas, not a copy of A.
    uncropped = embed(prepare_image(ds.image_path("q_a").read_bytes(), 64))
    cropped = embed(prepare_image(ds.image_path("q_a").read_bytes(), 64, ds.gnd[0]["bbx"]))
    a_copy = embed(prepare_image(ds.image_path("db_0_A").read_bytes(), 64))
    assert torch.equal(cropped, a_copy)
    assert float(uncropped @ a_copy) < 0.9999
    # A broken data set is refused with its reason.
    (tmp_path / "rsynth" / "jpg" / "db_3_C.jpg").unlink()
    with pytest.raises(ValueError, match="1 image"):
        load_revisited(tmp_path / "rsynth")


@pytest.mark.timeout(60)
def test_multiscale_descriptor_equals_a_direct_computation(backbone):
    bb, cfg = backbone
    mean, std = torch.tensor(cfg.crops.mean).view(3, 1, 1), torch.tensor(cfg.crops.std).view(3, 1, 1)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = MultiScaleFeatures(bb, cfg.crops.mean, cfg.crops.std)(img)
    # 40 px at scales 1, 1/sqrt 2, 1/2: 40, 28, 20 (multiples of the 4-px patch): no cropping.
    x = ((img.float() / 255 - mean) / std)[None]
    with torch.no_grad():
        v = bb(x) + bb(F.interpolate(x, scale_factor=2 ** -0.5, mode="bilinear", align_corners=False)) \
            + bb(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))
    ref = F.normalize(v[0] / 3, dim=0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert got.norm().item() == pytest.approx(1.0, abs=1e-6)
    # A single scale is the plain normalised [CLS] feature.
    one = MultiScaleFeatures(bb, cfg.crops.mean, cfg.crops.std, scales=(1.0,))(img)
    with torch.no_grad():
        torch.testing.assert_close(one, F.normalize(bb(x)[0], dim=0), rtol=0, atol=1e-6)
    # 42 px: sizes 42, 29, 21 are cut to 40, 28, 20 (what a strided patch convolution keeps).
    img42 = torch.randint(0, 256, (3, 42, 42), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x42 = ((img42.float() / 255 - mean) / std)[None]
    with torch.no_grad():
        v = sum(bb((x42 if s == 1 else F.interpolate(x42, scale_factor=s, mode="bilinear",
                                                    align_corners=False))[..., :n, :n])
                for s, n in ((1.0, 40), (2 ** -0.5, 28), (0.5, 20)))
    torch.testing.assert_close(MultiScaleFeatures(bb, cfg.crops.mean, cfg.crops.std)(img42),
                               F.normalize(v[0] / 3, dim=0), rtol=0, atol=1e-6)

