"""Tests of massl_ray.data.multicrop (Ray-free, CPU, fast)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from massl_ray.data import multicrop as M
from massl_ray.config import CropConfig
from massl_ray.data.multicrop import MultiCrop, blur_kernel_size, eval_transform, normalize


def _img(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A textured uint8 [3, h, w] image (smooth gradients + noise, so crops differ)."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, h).view(h, 1)
    xx = torch.linspace(0, 1, w).view(1, w)
    base = torch.stack([yy * 200 + xx * 50, (1 - yy) * 120 + xx * 100, xx * 230 + 10 * yy])
    noise = torch.rand(3, h, w, generator=g) * 40
    return (base + noise).clamp(0, 255).to(torch.uint8)


def _cfg(**kw) -> CropConfig:
    base = dict(global_size=32, local_size=16, num_local_crops=3)
    base.update(kw)
    return CropConfig(**base)


def _no_aug(**kw) -> CropConfig:
    """Every random op off; crops cover the whole (square) image."""
    base = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                solarize_p=(0.0, 0.0, 0.0), global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    base.update(kw)
    return _cfg(**base)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(img.unsqueeze(0), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False)[0]


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0 + 0.5).clamp(0, 255).to(torch.int16).to(torch.uint8)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.to(torch.int16) - b.to(torch.int16)).abs().max())


# --------------------------------------------------------------------------------------------
# shapes, dtypes, reproducibility, independence
# --------------------------------------------------------------------------------------------

MIXED = [(8, 8), (1, 1), (3, 200), (200, 3), (64, 48), (37, 91), (120, 120)]


@pytest.mark.parametrize("num_local", [3, 0])
def test_shapes_mixed_sizes(num_local):
    imgs = [_img(h, w, i) for i, (h, w) in enumerate(MIXED)]
    g, loc = MultiCrop(_cfg(num_local_crops=num_local))(imgs, _gen())
    assert g.shape == (len(imgs), 2, 3, 32, 32) and g.dtype == torch.uint8
    assert loc.shape == (len(imgs), num_local, 3, 16, 16) and loc.dtype == torch.uint8
    assert g.is_contiguous() and loc.is_contiguous()


def test_default_config_sizes_and_input_layouts():
    # the published sizes; a contiguous CHW image, a HWC-backed one and a 1-channel one
    imgs = [_img(250, 300, 1), _img(200, 180, 2).permute(1, 2, 0).contiguous().permute(2, 0, 1),
            _img(100, 90, 3)[:1]]
    g, loc = MultiCrop(CropConfig())(imgs, _gen())
    assert g.shape == (3, 2, 3, 224, 224)
    assert loc.shape == (3, 10, 3, 96, 96)


def test_empty_batch():
    g, loc = MultiCrop(_cfg())([], _gen())
    assert g.shape == (0, 2, 3, 32, 32) and loc.shape == (0, 3, 3, 16, 16)


def test_bad_input_rejected():
    mc = MultiCrop(_cfg())
    with pytest.raises(ValueError):
        mc([torch.rand(3, 10, 10)], _gen())
    with pytest.raises(ValueError):
        mc([torch.zeros(4, 10, 10, dtype=torch.uint8)], _gen())
    with pytest.raises(ValueError):
        mc([torch.zeros(10, 10, dtype=torch.uint8)], _gen())


def test_same_seed_same_output_different_seed_different():
    imgs = [_img(h, w, i) for i, (h, w) in enumerate(MIXED)]
    mc = MultiCrop(_cfg())
    a = mc(imgs, _gen(123))
    b = mc(imgs, _gen(123))
    c = mc(imgs, _gen(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_per_image_and_per_crop_independence():
    img = _img(80, 100, 7)
    n = 8
    g, loc = MultiCrop(_cfg(num_local_crops=4))([img] * n, _gen(5))
    flat_g = g.reshape(n * 2, -1)
    flat_l = loc.reshape(n * 4, -1)
    for flat in (flat_g, flat_l):
        for i in range(flat.shape[0]):
            for j in range(i + 1, flat.shape[0]):
                assert not torch.equal(flat[i], flat[j]), (i, j)


# --------------------------------------------------------------------------------------------
# per-op semantics vs torchvision.transforms.v2.functional (float, per sample)
# --------------------------------------------------------------------------------------------

def _float_batch(n=6, h=29, w=35, seed=0):
    g = _gen(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[0, :, :6, :6] = 0.5  # grey pixels (zero saturation)
    x[1, 1] = x[1, 0]  # ties between channels (r == g)
    x[2, 2] = x[2, 0]  # r == b
    x[3, :, :3] = 0.0  # black
    x[3, :, 3:6] = 1.0  # white
    return x


@pytest.mark.parametrize("name,ours,theirs,lo,hi", [
    ("brightness", M._adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
    ("contrast", M._adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
    ("saturation", M._adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    ("hue", M._adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_color_ops_match_torchvision(name, ours, theirs, lo, hi):
    x = _float_batch()
    factors = torch.linspace(lo, hi, x.shape[0])
    y = ours(x, factors)
    ref = torch.stack([theirs(x[i], float(factors[i])) for i in range(x.shape[0])])
    assert y.shape == x.shape
    assert (y - ref).abs().max() <= 1.0 / 255.0, name
    assert (y - ref).abs().mean() < 1e-5, name


def test_hue_identity_and_full_turn():
    x = _float_batch()
    assert (M._adjust_hue(x, torch.zeros(x.shape[0])) - x).abs().max() < 1e-5
    # +0.5 then +0.5 again is a full turn
    y = M._adjust_hue(M._adjust_hue(x, torch.full((x.shape[0],), 0.5)),
                      torch.full((x.shape[0],), 0.5))
    assert (y - x).abs().max() < 1e-4


def test_grayscale_solarize_blur_match_torchvision():
    x = _float_batch()
    assert (M._grayscale(x) - TF.rgb_to_grayscale(x, num_output_channels=3)).abs().max() < 1e-6
    u8 = (x * 255).round().to(torch.uint8)
    ours = M._solarize(u8.float() / 255.0, 127.5 / 255.0)
    assert torch.equal(_to_u8(ours), TF.solarize(u8, 128))
    sig = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.77])
    for k in (3, 9, 23):
        y = M._gaussian_blur(x, sig, k)
        ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sig[i])] * 2)
                           for i in range(x.shape[0])])
        assert (y - ref).abs().max() < 1e-5, k


def test_blur_kernel_size_rule():
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(16) == 3
    assert blur_kernel_size(1) == 1
    for s in range(1, 600):
        k = blur_kernel_size(s)
        assert k % 2 == 1 and k // 2 < s


# --------------------------------------------------------------------------------------------
# RandomResizedCrop sampling vs a transcription of torchvision's get_params
# --------------------------------------------------------------------------------------------

def _ref_get_params(height, width, u, scale, ratio):
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for a in range(10):
        us, ur, ut, ul = (float(v) for v in u[4 * a:4 * a + 4])
        target_area = area * (scale[0] + (scale[1] - scale[0]) * us)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ur)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(ut * (height - h + 1))
            j = int(ul * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32), (1.0, 1.0), (0.9, 1.0)])
def test_crop_boxes_match_torchvision_algorithm(scale):
    g = _gen(3)
    sizes = [(1, 1), (8, 8), (2, 300), (300, 2), (7, 9), (224, 224), (480, 640), (37, 29)]
    hs = torch.tensor([h for h, _ in sizes] * 20)
    ws = torch.tensor([w for _, w in sizes] * 20)
    u = torch.rand(hs.shape[0], 40, generator=g, dtype=torch.float64)
    boxes = M.sample_crop_boxes(hs, ws, u, scale, (3 / 4, 4 / 3))
    for k in range(hs.shape[0]):
        H, W = int(hs[k]), int(ws[k])
        ref = _ref_get_params(H, W, u[k], scale, (3 / 4, 4 / 3))
        assert tuple(boxes[k].tolist()) == ref, (H, W, k)
        t, l, h, w = ref
        assert 0 <= t and t + h <= H and 0 <= l and l + w <= W and h > 0 and w > 0


# --------------------------------------------------------------------------------------------
# probabilities and the whole pipeline
# --------------------------------------------------------------------------------------------

def _square_imgs(n=4, side=50):
    return [_img(side, side, i) for i in range(n)]


def test_all_ops_off_is_plain_resize():
    imgs = _square_imgs() + [_img(32, 32, 9)]  # the last one needs no resize at all
    mc = MultiCrop(_no_aug(), ratio=(1.0, 1.0))
    g, loc = mc(imgs, _gen())
    for i, im in enumerate(imgs):
        assert torch.equal(g[i, 0], _resize(im, 32))
        assert torch.equal(g[i, 1], _resize(im, 32))
        for k in range(loc.shape[1]):
            assert torch.equal(loc[i, k], _resize(im, 16))


def test_flip_p_one_flips():
    imgs = _square_imgs()
    g, loc = MultiCrop(_no_aug(flip_p=1.0), ratio=(1.0, 1.0))(imgs, _gen())
    for i, im in enumerate(imgs):
        assert torch.equal(g[i, 0], _resize(im, 32).flip(-1))
        assert torch.equal(loc[i, 0], _resize(im, 16).flip(-1))


def test_blur_probability_per_family():
    imgs = _square_imgs()
    g, loc = MultiCrop(_no_aug(blur_p=(1.0, 0.0, 0.0), blur_sigma=(1.0, 2.0)),
                       ratio=(1.0, 1.0))(imgs, _gen())
    for i, im in enumerate(imgs):
        plain = _resize(im, 32)
        assert not torch.equal(g[i, 0], plain)  # crop 1 always blurred
        assert torch.equal(g[i, 1], plain)  # crop 2 never
        assert torch.equal(loc[i, 0], _resize(im, 16))  # locals never
    g, loc = MultiCrop(_no_aug(blur_p=(0.0, 0.0, 1.0), blur_sigma=(1.0, 2.0)),
                       ratio=(1.0, 1.0))(imgs, _gen())
    for i, im in enumerate(imgs):
        assert torch.equal(g[i, 0], _resize(im, 32))
        for k in range(loc.shape[1]):
            assert not torch.equal(loc[i, k], _resize(im, 16))


def test_blur_sigma_end_to_end():
    """Blurred crops equal torchvision's gaussian_blur with the sigma drawn for that crop."""
    imgs = _square_imgs()
    cfg = _no_aug(blur_p=(1.0, 1.0, 1.0))
    g, _ = MultiCrop(cfg, ratio=(1.0, 1.0))(imgs, _gen(11))
    u = torch.rand(len(imgs) * 2, M._NUM_U, generator=_gen(11), dtype=torch.float64)
    sig = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, M._U_SIGMA]
    k = blur_kernel_size(32)
    for i, im in enumerate(imgs):
        for c in range(2):
            s = float(sig[2 * i + c])
            ref = TF.gaussian_blur(_resize(im, 32).float() / 255, [k, k], [s, s])
            assert _maxdiff(g[i, c], _to_u8(ref)) <= 1


def test_solarize_probability_per_family():
    imgs = _square_imgs()
    g, loc = MultiCrop(_no_aug(solarize_p=(0.0, 1.0, 0.0)), ratio=(1.0, 1.0))(imgs, _gen())
    for i, im in enumerate(imgs):
        plain = _resize(im, 32)
        assert torch.equal(g[i, 0], plain)
        assert torch.equal(g[i, 1], TF.solarize(plain, 128))
        assert torch.equal(loc[i, 0], _resize(im, 16))
    g, _ = MultiCrop(_no_aug(solarize_p=(1.0, 1.0, 1.0), solarize_threshold=200),
                     ratio=(1.0, 1.0))(imgs, _gen())
    assert torch.equal(g[0, 0], TF.solarize(_resize(imgs[0], 32), 200))


def test_grayscale_probability():
    imgs = _square_imgs()
    g, loc = MultiCrop(_no_aug(grayscale_p=1.0), ratio=(1.0, 1.0))(imgs, _gen())
    for i, im in enumerate(imgs):
        ref = TF.rgb_to_grayscale(_resize(im, 32).float() / 255, num_output_channels=3)
        assert _maxdiff(g[i, 0], _to_u8(ref)) <= 1
        assert torch.equal(g[i, 0, 0], g[i, 0, 1]) and torch.equal(g[i, 0, 0], g[i, 0, 2])
        assert torch.equal(loc[i, 0, 0], loc[i, 0, 2])


_TV_OPS = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def test_color_jitter_random_order_end_to_end():
    """Each crop equals torchvision's ops applied in *that crop's* drawn order with its factors;
    the order matters for some crops (so a fixed order would fail this test)."""
    n = 12
    imgs = [_img(32, 32, i) for i in range(n)]  # 32 px: no resize, exact inputs
    cfg = _no_aug(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.6, hue=0.3)
    g, _ = MultiCrop(cfg, ratio=(1.0, 1.0))(imgs, _gen(21))
    u = torch.rand(n * 2, M._NUM_U, generator=_gen(21), dtype=torch.float64)
    ranges = [(0.6, 1.4), (0.6, 1.4), (0.4, 1.6), (-0.3, 0.3)]
    order_mattered = 0
    for i in range(n):
        for c in range(2):
            row = u[2 * i + c]
            perm = torch.argsort(row[M._U_PERM:M._U_PERM + 4]).tolist()
            fac = [lo + (hi - lo) * float(row[M._U_FACT + op]) for op, (lo, hi) in
                   enumerate(ranges)]
            x = imgs[i].float() / 255
            ref = x
            for op in perm:
                ref = _TV_OPS[op](ref, fac[op])
            assert _maxdiff(g[i, c], _to_u8(ref)) <= 1, (i, c, perm)
            fixed = x
            for op in range(4):
                fixed = _TV_OPS[op](fixed, fac[op])
            if _maxdiff(_to_u8(fixed), _to_u8(ref)) > 2:
                order_mattered += 1
    assert order_mattered > 0


def test_jitter_probability_zero_and_one():
    imgs = _square_imgs()
    cfg = _no_aug(jitter_p=1.0)
    g, _ = MultiCrop(cfg, ratio=(1.0, 1.0))(imgs, _gen())
    assert all(not torch.equal(g[i, 0], _resize(im, 32)) for i, im in enumerate(imgs))


def test_tiny_images_all_ops_on():
    cfg = _cfg(blur_p=(1.0, 1.0, 1.0), solarize_p=(1.0, 1.0, 1.0), grayscale_p=0.5,
               jitter_p=1.0, num_local_crops=2, global_size=8, local_size=4)
    imgs = [_img(1, 1), _img(2, 9), _img(8, 8)]
    g, loc = MultiCrop(cfg)(imgs, _gen())
    assert g.shape == (3, 2, 3, 8, 8) and loc.shape == (3, 2, 3, 4, 4)


def test_chunking_does_not_change_results():
    imgs = [_img(h, w, i) for i, (h, w) in enumerate(MIXED)]
    cfg = _cfg(num_local_crops=4)
    a = MultiCrop(cfg)(imgs, _gen(9))
    mc = MultiCrop(cfg)
    mc.chunk_bytes = 1  # one crop per chunk
    b = mc(imgs, _gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_statistics_of_probabilities():
    """Flip / grayscale / solarise frequencies follow the configured probabilities."""
    img = _img(40, 40, 3)
    n = 200
    cfg = _no_aug(flip_p=0.5, grayscale_p=0.2, num_local_crops=0)
    g, _ = MultiCrop(cfg, ratio=(1.0, 1.0))([img] * n, _gen(1))
    plain = _resize(img, 32)
    flipped = (g.reshape(-1, 3, 32, 32) != plain).any(dim=(1, 2, 3)).float().mean()
    assert 0.4 < float(flipped) < 0.6
    cfg = _no_aug(grayscale_p=0.2, num_local_crops=0)
    g, _ = MultiCrop(cfg, ratio=(1.0, 1.0))([img] * n, _gen(2))
    gray = (g[:, :, 0] == g[:, :, 2]).all(dim=(2, 3)).float().mean()
    assert 0.12 < float(gray) < 0.28


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def test_normalize_matches_formula():
    x = torch.randint(0, 256, (2, 3, 3, 5, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = normalize(x, mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y - ref).abs().max() < 1e-5
    assert normalize(x, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16
    if torch.cuda.is_available():
        yc = normalize(x.cuda(), mean, std)
        assert yc.is_cuda and (yc.cpu() - ref).abs().max() < 1e-5


def test_eval_transform():
    imgs = [_img(50, 80, 1), _img(90, 40, 2), _img(37, 37, 3), _img(4, 6, 4)]
    out = eval_transform(imgs, 32)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    for i, im in enumerate(imgs):
        ref = TF.center_crop(TF.resize(im, [37], interpolation=InterpolationMode.BICUBIC,
                                       antialias=True), [32, 32])
        assert _maxdiff(out[i], ref) <= 2


def test_config_is_not_mutated():
    cfg = _cfg()
    before = dataclasses.asdict(cfg)
    MultiCrop(cfg)([_img(20, 20)], _gen())
    assert dataclasses.asdict(cfg) == before


# --------------------------------------------------------------------------------------------
# reduced decodes (training: JPEG draft, others Image.reduce): boxes on the full image
# --------------------------------------------------------------------------------------------

def _jpeg(h: int, w: int, seed: int = 0, **kw) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(_img(h, w, seed).permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_reduced_decode_draws_the_full_image_boxes_and_gives_close_crops(monkeypatch):
    """A 640x480 JPEG is decoded at 1/4 (160x120) for 32/16 px crops; the boxes are drawn on
    640x480 with the same random numbers as for its full decode; in a batch, the crops of the
    images below the threshold are bitwise those of the full-decode path (the old path), and
    the reduced image's crops differ from its full-resolution crops by a small measured amount
    (all colour ops off: geometry only; measured mean 0.42, max 2 levels of 255)."""
    from massl_ray.data.images import decode_image
    cfg = _no_aug(global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), num_local_crops=6)
    mc = MultiCrop(cfg)
    files = [_jpeg(40, 30, 1), _jpeg(480, 640, 2), _jpeg(64, 64, 3)]
    assert [mc.reduction(w, h) for h, w in ((40, 30), (480, 640), (64, 64))] == [1, 4, 1]
    new = [mc.decode(d)[0] for d in files]
    old = [decode_image(d) for d in files]
    assert tuple(new[1][0].shape) == (3, 120, 160) and new[1][1] == (480, 640)
    assert all(torch.equal(new[i][0], old[i]) and new[i][1] == (old[i].shape[1], old[i].shape[2])
               for i in (0, 2))
    drawn = []
    real = M.sample_crop_boxes
    monkeypatch.setattr(M, "sample_crop_boxes",
                        lambda hs, ws, *a: drawn.append((hs, ws, real(hs, ws, *a))) or drawn[-1][2])
    g_old, l_old = mc(old, _gen(5))
    g_new, l_new = mc(new, _gen(5))
    assert len(drawn) == 4
    for (h0, w0, b0), (h1, w1, b1) in zip(drawn[:2], drawn[2:]):
        assert torch.equal(h0, h1) and torch.equal(w0, w1) and torch.equal(b0, b1)
    for i in (0, 2):
        assert torch.equal(g_new[i], g_old[i]) and torch.equal(l_new[i], l_old[i])
    d = torch.cat([(g_new[1] - g_old[1].to(torch.int16)).flatten(),
                   (l_new[1] - l_old[1].to(torch.int16)).flatten()]).abs().float()
    assert d.mean() < 1.0 and d.max() <= 8, (float(d.mean()), float(d.max()))


def test_reduction_keeps_every_box_at_least_the_crop_size_and_rows_within_held_pixels():
    """For sizes up to 6:1 and up to TRAIN_MAX_PIXELS: with a reduction, every box drawn
    (4,000 draws each) spans at least the output size in the reduced pixels (a crop is never
    enlarged); the reduced image holds at most MultiCrop.held_pixels()."""
    from massl_ray.data.images import TRAIN_MAX_PIXELS
    for cfg in (CropConfig(), _cfg()):
        mc = MultiCrop(cfg)
        fams = ((cfg.global_size, cfg.global_scale), (cfg.local_size, cfg.local_scale))
        g = _gen(7)
        rnd = np.random.default_rng(0)
        for _ in range(1000):  # the bound on random sizes up to the cap and 6:1
            a, px = rnd.uniform(1, 6), rnd.uniform(1e3, TRAIN_MAX_PIXELS)
            w, h = int((px * a) ** 0.5), int((px / a) ** 0.5)
            f = mc.reduction(w, h)
            assert -(-h // f) * -(-w // f) <= mc.held_pixels(), (w, h, f)
        for w, h in ((500, 375), (640, 480), (1200, 900), (2000, 1500), (4032, 3024), (4800, 800),
                     (8000, 6000), (9000, 7400), (18000, 3000), (500, 3000), (430, 2580)):
            assert w * h <= TRAIN_MAX_PIXELS
            f = mc.reduction(w, h)
            rh, rw = -(-h // f), -(-w // f)
            assert rh * rw <= mc.held_pixels(), (w, h, f)
            for size, scale in fams:
                u = torch.rand(4000, 40, generator=g, dtype=torch.float64)
                full = torch.tensor([[h, w]] * 4000)
                boxes = M.sample_crop_boxes(full[:, 0], full[:, 1], u, scale)
                red = M._scale_boxes(boxes, full, torch.tensor([[rh, rw]] * 4000))
                assert f == 1 or int(red[:, 2:].min()) >= size, (w, h, f, size)
                assert bool(((red[:, :2] >= 0) & (red[:, :2] + red[:, 2:] <= torch.tensor(
                    [rh, rw]))).all())
        assert [mc.reduction(w, h) for w, h in ((500, 375), (4032, 3024), (8000, 6000))] == (
            [1, 4, 8] if cfg.global_size == 224 else [4, 8, 8])


def test_reduced_decode_of_other_formats_and_exif_rotation():
    """A PNG is box-reduced after decoding (same factor); a JPEG with EXIF orientation 6 is
    drafted and its full size is the displayed one."""
    import io

    from PIL import Image
    mc = MultiCrop(_cfg())
    im = Image.fromarray(_img(480, 640, 4).permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    (px, full), why = mc.decode(buf.getvalue())
    assert why is None and tuple(px.shape) == (3, 120, 160) and full == (480, 640)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    (px, full), why = mc.decode(_jpeg(480, 640, 4, exif=exif.tobytes()))
    assert why is None and tuple(px.shape) == (3, 160, 120) and full == (640, 480)
    g, loc = mc([(px, full)], _gen())
    assert tuple(g.shape) == (1, 2, 3, 32, 32) and tuple(loc.shape) == (1, 3, 3, 16, 16)


def test_decode_task_memory_counts_the_largest_unit_one_full_decode_and_the_crops():
    from massl_ray.data.images import TRAIN_MAX_PIXELS
    from massl_ray.data.plan import DecodeTask
    cfg = CropConfig()
    t = DecodeTask(0, 256, ((0, 0, 0, 128), (1, 0, 128, 200), (1, 1, 200, 256)), ())
    crop = 3 * (2 * 224 ** 2 + 10 * 96 ** 2)
    held = MultiCrop(cfg).held_pixels()
    assert M.decode_task_memory(cfg, t) == 128 * 3 * held + 12 * TRAIN_MAX_PIXELS + 256 * crop
    assert 1.2e6 < held < 1.4e6  # ~3.9 MB a row, vs 36 MB for a 12 Mpx photo decoded in full


def test_training_views_use_the_reduced_decode_and_the_training_cap():
    """make_views (the decode tasks' and the local feed's decode) goes through MultiCrop.decode:
    a large JPEG's crops are those of its reduced decode, not of its full one, and an image over
    TRAIN_MAX_PIXELS is skipped with the cap named."""
    from test_images import _png_header_only

    from massl_ray.data.images import TRAIN_MAX_PIXELS, decode_image
    from massl_ray.data.views import make_views
    mc = MultiCrop(_cfg())
    big = _jpeg(480, 640, 2)
    out, bad = make_views([big, _png_header_only(8192, 8193)], ["big", "huge"], mc, _gen(3))
    assert [b[0] for b in bad] == ["huge"] and f"max_pixels={TRAIN_MAX_PIXELS}" in bad[0][1]
    g, loc = mc([mc.decode(big)[0]], _gen(3))
    assert torch.equal(torch.from_numpy(out["global_crops"]), g)
    assert torch.equal(torch.from_numpy(out["local_crops"]), loc)
    assert not torch.equal(mc([decode_image(big)], _gen(3))[0], g)
