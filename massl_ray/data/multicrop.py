"""DINO multi-crop augmentation on uint8 tensors, vectorised over the batch.

:class:`MultiCrop` turns a list of decoded images (uint8 ``[3, H, W]`` of any sizes) into
``global_crops`` uint8 ``[N, 2, 3, Gs, Gs]`` and ``local_crops`` uint8 ``[N, L, 3, Ls, Ls]``
following the recipe of ``docs/method.md`` §3 (DINO's multi-crop):

1. ``RandomResizedCrop`` (torchvision's sampling: 10 attempts, then the centre-crop fallback;
   ratio (3/4, 4/3); bicubic with antialias) — done image by image with torch's uint8 resize
   kernel, which is the only per-crop Python work;
2. horizontal flip (p = ``flip_p``), folded into the per-crop copy;
3. ``ColorJitter(brightness, contrast, saturation, hue)`` with p = ``jitter_p``, the four ops in a
   random order per crop (as torchvision's ``ColorJitter`` does);
4. ``RandomGrayscale`` (p = ``grayscale_p``, 3 channels kept);
5. Gaussian blur, sigma ~ U[``blur_sigma``], p = ``blur_p[0]`` for global crop 1,
   ``blur_p[1]`` for global crop 2, ``blur_p[2]`` for the local crops;
6. solarisation (pixels ``>= solarize_threshold`` on the 0..255 scale are inverted), p =
   ``solarize_p[0/1/2]`` per crop family like the blur.

Steps 3–6 run on float32 ``[0, 1]`` chunks of crops with *per-sample* parameters (factor tensors
and sample subsets), so every image and every crop gets its own independent random draw — unlike
``torchvision.transforms.v2`` applied to a batch, which shares one parameter set. Each op matches
the float semantics of ``torchvision.transforms.v2.functional`` (``adjust_brightness``,
``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale`` with weights
0.2989/0.587/0.114, ``gaussian_blur`` with reflect padding, ``solarize``); the internal
``_adjust_*`` functions are exposed for tests. Values are rounded back to uint8 once, at the end.

Random order of the jitter ops: the crops of a family are *sorted by their permutation* (crops
without jitter first), so each of the <= 24 orders is a contiguous run of crops on which the four
ops run in place in that order; each crop is written back to its own slot at the end. This costs
one pass per op per crop, unlike 4x4 masked gathers. Runs are processed in chunks of about
``MultiCrop.chunk_bytes`` (2 MiB) of float32 so that intermediate tensors stay in cache and no
large temporary is allocated (fresh large allocations are expensive: page faults).

Solarisation inverts a pixel when its value *rounded to uint8* is ``>= solarize_threshold``
(float threshold ``(threshold - 0.5) / 255``): identical to PIL/torchvision on uint8 images.

Blur kernel size: torchvision's ``GaussianBlur`` takes an explicit odd kernel size; the
SimCLR/BYOL/DINO-torchvision convention is about 10 % of the crop side (23 at 224 px). Here
``blur_kernel_size(size) = int(0.1 * size)`` rounded *up* to odd, at least 3 and at most
``2 * size - 1`` (reflect padding needs ``pad < size``): 224 -> 23, 96 -> 9, 32 -> 3, 16 -> 3.
Kernel taps follow torchvision (``exp(-x^2 / (2 sigma^2))`` on ``x = -(k-1)/2 .. (k-1)/2``,
normalised). Kernels of 7+ taps run as batched products with small banded matrices, shorter ones
as grouped convolutions; both agree with ``torchvision...gaussian_blur`` to ~1e-6.

Reduced decodes (:meth:`MultiCrop.decode`, training's): an image may come as ``(pixels, (H,
W))``, its pixels reduced from the full size ``(H, W)`` by :meth:`MultiCrop.reduction` (JPEGs
decoded at 1/2, 1/4 or 1/8 in the DCT domain). Its crop boxes are drawn on the full size, with the
same random numbers, and scaled to the pixels (edges rounded): the boxes are those of
``RandomResizedCrop`` on the full image. The reduction is the largest with which every box that
can be drawn still spans at least the crop's output size in the reduced pixels (so a crop is
never enlarged more than on the full image); below it (ImageNet-sized images) the crops are
unchanged bit for bit.

All random numbers are drawn from the ``torch.Generator`` passed to ``__call__`` (a fixed number
of uniforms per crop, in a fixed order), so a seed reproduces the output exactly.

Output is not normalised: :func:`normalize` converts uint8 crops to normalised floats on any
device (typically on the training GPU).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from massl_ray.config import CropConfig
from massl_ray.data.images import TRAIN_MAX_PIXELS, ImageDecodeError, decode_reduced

__all__ = ["MultiCrop", "normalize", "eval_transform", "blur_kernel_size", "sample_crop_boxes",
           "decode_task_memory"]

_GRAY_W = (0.2989, 0.587, 0.114)
# HSV -> RGB closed form: channel value = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6
# with n = 5, 3, 1 for R, G, B.
_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10

# Layout of the per-crop uniforms (one row of ``_NUM_U`` numbers per crop).
_U_CROP = 0  # 4 * _ATTEMPTS: (scale, log-ratio, top, left) per attempt
_U_FLIP = 4 * _ATTEMPTS
_U_JIT = _U_FLIP + 1
_U_PERM = _U_JIT + 1  # 4 numbers -> argsort gives the op order
_U_FACT = _U_PERM + 4  # brightness, contrast, saturation, hue
_U_GRAY = _U_FACT + 4
_U_BLUR = _U_GRAY + 1
_U_SIGMA = _U_BLUR + 1
_U_SOL = _U_SIGMA + 1
_NUM_U = _U_SOL + 1

_OP_BRIGHTNESS, _OP_CONTRAST, _OP_SATURATION, _OP_HUE = range(4)


# ---------------------------------------------------------------------------------------------
# Per-sample vectorised ops on float32 [n, 3, H, W] in [0, 1] (``*_`` versions work in place)
# ---------------------------------------------------------------------------------------------

def _col(f: torch.Tensor) -> torch.Tensor:
    return f.reshape(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale (float): [n, 3, H, W] -> [n, 1, H, W]."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(_GRAY_W[0]).add_(g, alpha=_GRAY_W[1]).add_(b, alpha=_GRAY_W[2]).unsqueeze(-3)


def _adjust_brightness_(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return x.mul_(_col(factors)).clamp_(0.0, 1.0)


def _adjust_contrast_(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    f = _col(factors)
    w = torch.tensor(_GRAY_W, dtype=x.dtype, device=x.device)
    # mean of the grayscale image == weighted sum of the channel means
    mean = (x.mean(dim=(-2, -1)) * w).sum(dim=-1).reshape(-1, 1, 1, 1)
    return x.mul_(f).add_(mean * (1.0 - f)).clamp_(0.0, 1.0)


def _adjust_saturation_(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    f = _col(factors)
    g = _gray(x).mul_(1.0 - f)
    return x.mul_(f).add_(g).clamp_(0.0, 1.0)


def _is_max(c: torch.Tensor, maxc: torch.Tensor) -> torch.Tensor:
    """1.0 where ``c == maxc`` else 0.0 (``c <= maxc``), by float arithmetic: comparisons and
    ``torch.where`` are many times slower than arithmetic on CPU."""
    return torch.sub(c, maxc).sign_().add_(1.0)


def _adjust_hue_(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift (``factors`` in [-0.5, 0.5]) with torchvision's HSV semantics.

    RGB -> (hue, max, range) -> RGB with the closed-form HSV -> RGB
    ``c = v - v*s*clamp(min(k, 4 - k), 0, 1)``, ``k = (n_c + 6h) mod 6``; saturation and value
    are unchanged by a hue shift (``v*s == max - min``), so only the hue is computed. The hue
    sector is selected like torchvision (red if it is the max, else green, else blue) with 0/1
    float masks.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)  # (aminmax over dim -3 is slow on CPU)
    rng = maxc - torch.minimum(torch.minimum(r, g), b)
    m_r = _is_max(r, maxc)
    m_g = _is_max(g, maxc).mul_(1.0 - m_r)
    m_b = (1.0 - m_r).sub_(m_g)
    # hue in sixths (not yet wrapped): r: (g-b)/R, g: (b-r)/R + 2, b: (r-g)/R + 4
    h = (g - b).mul_(m_r)
    h.add_((b - r).add_(rng, alpha=2.0).mul_(m_g))
    h.add_((r - g).add_(rng, alpha=4.0).mul_(m_b))
    # R == 0 (grey): numerator is 0 and the output is maxc whatever the hue
    h.div_(rng.clamp_min(1e-12))
    h.add_(factors.reshape(-1, 1, 1).to(x.dtype) * 6.0)
    h.sub_(torch.floor(h * (1.0 / 6.0)), alpha=6.0)  # wrap into [0, 6) (remainder is slow)
    k = torch.add(h.unsqueeze(-3), _HSV_OFFSETS.to(device=x.device, dtype=x.dtype), out=x)
    # k in [1, 11): k mod 6 = k - 6 * floor(k / 6)
    k.sub_(torch.mul(k, 1.0 / 6.0).floor_(), alpha=6.0)
    torch.minimum(k, torch.rsub(k, 4.0), out=k).clamp_(0.0, 1.0)
    return k.mul_(rng.unsqueeze(-3)).neg_().add_(maxc.unsqueeze(-3))


def _grayscale_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(_gray(x).expand_as(x))


def _solarize_(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert values ``>= threshold`` (threshold on the float [0, 1] scale)."""
    # mask = 1 where x >= threshold: sign(threshold - x) is 1 below the threshold, else <= 0
    mask = torch.rsub(x, threshold).sign_().clamp_(0.0, 1.0).neg_().add_(1.0)
    # x + mask * (1 - 2x)
    return x.add_(mask.mul_(x.mul(-2.0).add_(1.0)))


def _gaussian_kernels(sigmas: torch.Tensor, ksize: int) -> torch.Tensor:
    """[n] sigmas -> [n, ksize] normalised 1-D Gaussian kernels (torchvision's formula).

    Weights below 1e-12 are set to 0: they are invisible in the result, and as float32
    denormals they would slow the convolution down by an order of magnitude.
    """
    half = (ksize - 1) / 2.0
    t = torch.linspace(-half, half, ksize, dtype=torch.float64, device=sigmas.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigmas.view(-1, 1).double()) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    k = k * (k >= 1e-12)
    return k.float()


def _gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor, ksize: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding (torchvision's
    ``gaussian_blur``): [n, c, H, W] -> new [n, c, H, W] tensor."""
    n = x.shape[0]
    if n == 0 or ksize <= 1:
        return x.clone()
    if ksize >= 7:
        return _gaussian_blur_banded(x, sigmas, ksize)
    return _gaussian_blur_conv(x, sigmas, ksize)


def _gaussian_blur_conv(x: torch.Tensor, sigmas: torch.Tensor, ksize: int) -> torch.Tensor:
    """Blur as two depthwise convolutions (fast for small kernels / many samples)."""
    n, c, h, w = x.shape
    pad = ksize // 2
    kern = _gaussian_kernels(sigmas, ksize).repeat_interleave(c, dim=0)  # [n*c, k]
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    y = F.conv2d(y, kern.view(n * c, 1, 1, ksize).to(x.dtype), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, ksize, 1).to(x.dtype), groups=n * c)
    return y.view(n, c, h, w)


def _gaussian_blur_banded(x: torch.Tensor, sigmas: torch.Tensor, ksize: int) -> torch.Tensor:
    """Blur as batched matrix products with small banded (Toeplitz) blocks.

    Each pass cuts the padded axis into blocks of ``B`` outputs; a block is the product of a
    ``(B + 2*pad)``-long window of the input with one ``[B + 2*pad, B]`` banded matrix (the same
    for every block of a sample, so the windows are overlapping strided *views*, not copies).
    This is several times faster on CPU than grouped convolutions with per-sample kernels, whose
    per-call cost is high for few samples and long 1-D kernels.
    """
    n, c, h, w = x.shape
    pad = ksize // 2
    bs = max(16, 1 << max(0, (pad - 1).bit_length()))
    kk = bs + 2 * pad
    kern = _gaussian_kernels(sigmas, ksize).to(x.dtype)  # [n, k]
    band = torch.zeros(n, kk, bs, dtype=x.dtype)
    rows = torch.arange(ksize).view(-1, 1) + torch.arange(bs).view(1, -1)  # [k, bs]
    cols = torch.arange(bs).view(1, -1).expand(ksize, bs)
    band[:, rows, cols] = kern.view(n, ksize, 1).expand(n, ksize, bs)
    band_t = band.transpose(1, 2)  # [n, bs, kk]
    nbh, nbw = -(-h // bs), -(-w // bs)
    hp, wp = nbh * bs + 2 * pad, nbw * bs + 2 * pad
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    if hp != h + 2 * pad or wp != w + 2 * pad:  # round up to whole blocks (zeros, cropped)
        xp = F.pad(xp, (0, wp - (w + 2 * pad), 0, hp - (h + 2 * pad)))
    xp = xp.contiguous()
    # vertical pass: rows [i*bs, (i+1)*bs) = band^T @ xp[i*bs : i*bs + kk, :]
    yv = torch.empty((n, c, nbh * bs, wp), dtype=x.dtype)
    for s in range(n):
        a = band_t[s].unsqueeze(0).expand(nbh, bs, kk)
        for ch in range(c):
            src = xp[s, ch].as_strided((nbh, kk, wp), (bs * wp, wp, 1))
            torch.bmm(a, src, out=yv[s, ch].view(nbh, bs, wp))
    # horizontal pass over all rows of a sample at once: columns blocks = window @ band
    out = torch.empty((n, c, h, w), dtype=x.dtype)
    nrows = c * nbh * bs
    for s in range(n):
        src = yv[s].as_strided((nbw, nrows, kk), (bs, wp, 1))
        res = torch.bmm(src, band[s].unsqueeze(0).expand(nbw, kk, bs))  # [nbw, rows, bs]
        out[s].copy_(res.permute(1, 0, 2).reshape(c, nbh * bs, nbw * bs)[:, :h, :w])
    return out


def _out_of_place(fn):
    def wrapped(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return fn(x.clone(), torch.as_tensor(factors, dtype=x.dtype).reshape(-1))

    wrapped.__name__ = fn.__name__.rstrip("_")
    wrapped.__doc__ = f"Out-of-place version of ``{fn.__name__}`` (per-sample factors)."
    return wrapped


_adjust_brightness = _out_of_place(_adjust_brightness_)
_adjust_contrast = _out_of_place(_adjust_contrast_)
_adjust_saturation = _out_of_place(_adjust_saturation_)
_adjust_hue = _out_of_place(_adjust_hue_)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return _grayscale_(x.clone())


def _solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return _solarize_(x.clone(), threshold)


_JITTER_OPS = {
    _OP_BRIGHTNESS: _adjust_brightness_,
    _OP_CONTRAST: _adjust_contrast_,
    _OP_SATURATION: _adjust_saturation_,
    _OP_HUE: _adjust_hue_,
}


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel size for a crop side (~10 %, >= 3, <= 2*size-1): 224 -> 23."""
    k = int(0.1 * size)
    if k % 2 == 0:
        k += 1
    k = max(k, 3)
    return max(1, min(k, 2 * size - 1))


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    u: torch.Tensor,
    scale: Sequence[float],
    ratio: Sequence[float] = _RATIO,
) -> torch.Tensor:
    """torchvision ``RandomResizedCrop.get_params`` for many crops at once.

    Args:
        heights, widths: [M] source sizes (int64).
        u: [M, 4 * 10] uniforms in [0, 1): per attempt (scale, log-ratio, top, left).
    Returns:
        [M, 4] int64 boxes (top, left, h, w).
    """
    m = heights.shape[0]
    hh = heights.to(torch.float64).view(m, 1)
    ww = widths.to(torch.float64).view(m, 1)
    uu = u.to(torch.float64).view(m, _ATTEMPTS, 4)
    area = hh * ww
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * uu[..., 0])
    ar = torch.exp(lo + (hi - lo) * uu[..., 1])
    cw = torch.round(torch.sqrt(target * ar))
    ch = torch.round(torch.sqrt(target / ar))
    ok = (cw > 0) & (cw <= ww) & (ch > 0) & (ch <= hh)
    any_ok = ok.any(dim=1)
    first = ok.to(torch.int8).argmax(dim=1)
    idx = first.view(m, 1)
    ch_s = ch.gather(1, idx).squeeze(1)
    cw_s = cw.gather(1, idx).squeeze(1)
    u_top = uu[..., 2].gather(1, idx).squeeze(1)
    u_left = uu[..., 3].gather(1, idx).squeeze(1)
    hs, ws = hh.squeeze(1), ww.squeeze(1)
    top = torch.minimum(torch.floor(u_top * (hs - ch_s + 1)), hs - ch_s)
    left = torch.minimum(torch.floor(u_left * (ws - cw_s + 1)), ws - cw_s)
    # centre-crop fallback (torchvision): clamp the aspect ratio into ``ratio``
    in_ratio = ws / hs
    fb_w = torch.where(in_ratio < ratio[0], ws,
                       torch.where(in_ratio > ratio[1], torch.round(hs * ratio[1]), ws))
    fb_h = torch.where(in_ratio < ratio[0], torch.round(ws / ratio[0]),
                       torch.where(in_ratio > ratio[1], hs, hs))
    fb_top = torch.div(hs - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(ws - fb_w, 2, rounding_mode="floor")
    box = torch.stack([
        torch.where(any_ok, top, fb_top),
        torch.where(any_ok, left, fb_left),
        torch.where(any_ok, ch_s, fb_h),
        torch.where(any_ok, cw_s, fb_w),
    ], dim=1)
    return box.to(torch.int64)


def _scale_boxes(boxes: torch.Tensor, full: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """[M, 4] (top, left, h, w) boxes on full sizes [M, 2] -> the same boxes on the reduced
    sizes ``actual`` [M, 2] (edges rounded; at least 1 pixel)."""
    if torch.equal(full, actual):
        return boxes
    s = actual.to(torch.float64) / full.to(torch.float64)
    lo = torch.round(boxes[:, :2] * s)
    hi = torch.round((boxes[:, :2] + boxes[:, 2:]) * s)
    size = torch.maximum(hi - lo, torch.ones_like(lo))
    lo = torch.minimum(lo, actual - size)
    return torch.cat([lo, size], dim=1).to(torch.int64)


def _as_batch_image(img: torch.Tensor) -> torch.Tensor:
    """uint8 [3|1, H, W] -> [1, 3, H, W] in channels-last memory (fast uint8 resize path)."""
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3:
        raise ValueError(
            f"MultiCrop expects uint8 [3, H, W] tensors, got "
            f"{getattr(img, 'dtype', type(img).__name__)} {tuple(getattr(img, 'shape', ()))}"
        )
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] != 3:
        raise ValueError(f"MultiCrop expects 3 (or 1) channels, got shape {tuple(img.shape)}")
    if img.shape[1] == 0 or img.shape[2] == 0:
        raise ValueError(f"empty image of shape {tuple(img.shape)}")
    if img.device.type != "cpu":
        img = img.cpu()
    x = img.unsqueeze(0)
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _resize_into(dst: torch.Tensor, src: torch.Tensor, size: int, flip: bool) -> None:
    """Resize [1, 3, h, w] uint8 to ``size`` x ``size`` (bicubic, antialias) into dst [3, S, S]."""
    if src.shape[-2] != size or src.shape[-1] != size:
        src = F.interpolate(src, size=(size, size), mode="bicubic", antialias=True,
                            align_corners=False)
    src = src[0]
    if flip:
        src = src.flip(-1)
    dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------

class MultiCrop:
    """DINO multi-crop on uint8 images with independent per-image, per-crop randomness.

    ``MultiCrop(cfg)(images, generator) -> (global_crops, local_crops)`` with
    ``global_crops`` uint8 [N, 2, 3, Gs, Gs] and ``local_crops`` uint8 [N, L, 3, Ls, Ls].
    """

    #: Crops are processed in chunks of about this many bytes of float32 (cache-sized).
    chunk_bytes = 1 << 21

    def __init__(self, cfg: CropConfig, ratio: tuple[float, float] = _RATIO):
        self.cfg = cfg
        self.ratio = (float(ratio[0]), float(ratio[1]))
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.global_size = int(cfg.global_size)
        self.local_size = int(cfg.local_size)
        self.num_local = int(cfg.num_local_crops)
        c = cfg
        self._ranges = []  # (op, lo, hi) for ops that are active
        for op, v, center in ((_OP_BRIGHTNESS, c.brightness, 1.0), (_OP_CONTRAST, c.contrast, 1.0),
                              (_OP_SATURATION, c.saturation, 1.0)):
            if v > 0:
                self._ranges.append((op, max(0.0, center - v), center + v))
        if c.hue > 0:
            self._ranges.append((_OP_HUE, -float(c.hue), float(c.hue)))

    def __repr__(self) -> str:
        c = self.cfg
        return (f"MultiCrop(global={c.global_size}, local={c.local_size}x{c.num_local_crops}, "
                f"global_scale={c.global_scale}, local_scale={c.local_scale})")

    # -- public ---------------------------------------------------------------------------
    def reduction(self, w: int, h: int) -> int:
        """The largest f of 8, 4, 2, 1 with which every box drawable on a ``w`` x ``h`` image
        (at least ``sqrt(scale[0] * w * h * min(ratio[0], 1 / ratio[1]))`` on a side, or the
        short side for the centre-crop fallback) spans ``size + 1`` pixels at ``1/f``."""
        k = min(self.ratio[0], 1.0 / self.ratio[1])
        fams = [(self.global_size, self.cfg.global_scale[0])]
        fams += [(self.local_size, self.cfg.local_scale[0])] if self.num_local else []
        g = min(min(w, h, math.sqrt(s0 * w * h * k) - 0.5) / (size + 1) for size, s0 in fams)
        return next((f for f in (8, 4, 2) if f <= g), 1)

    def held_pixels(self) -> int:
        """A bound on the pixels a row holds after :meth:`decode` for images up to
        TRAIN_MAX_PIXELS and 6:1 (more elongated ones may hold more): ``f == 8`` holds ~1/64,
        a smaller f is > g/2 (``g``: the reduction the area or the short side allows), which
        holds < 4 ``(size + 1)**2 / (scale[0] * k)`` or 4 ``(size + 1)**2 * long / short``;
        25 % for the rounding (tests check it)."""
        k = min(self.ratio[0], 1.0 / self.ratio[1])
        fams = [(self.global_size, self.cfg.global_scale[0])]
        fams += [(self.local_size, self.cfg.local_scale[0])] if self.num_local else []
        need = max(4 * (size + 1) ** 2 / (s0 * k) for size, s0 in fams)
        return int(1.25 * max(TRAIN_MAX_PIXELS / 64, need))

    def decode(self, data: bytes) -> tuple[Optional[tuple], Optional[str]]:
        """Training's decode: ``((pixels, (H, W)), None)``, pixels reduced by
        :meth:`reduction`, or ``(None, reason)`` (over TRAIN_MAX_PIXELS included)."""
        try:
            return decode_reduced(data, self.reduction, TRAIN_MAX_PIXELS), None
        except ImageDecodeError as e:
            return None, e.reason

    def __call__(self, images: list, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: uint8 [3, H, W] tensors, or (reduced pixels, full (H, W)) pairs."""
        c = self.cfg
        n = len(images)
        gs, ls, nl = self.global_size, self.local_size, self.num_local
        pairs = [im if isinstance(im, tuple) else (im, None) for im in images]
        srcs = [_as_batch_image(im) for im, _ in pairs]
        actual = torch.tensor([tuple(s.shape[-2:]) for s in srcs], dtype=torch.int64).view(n, 2)
        full = torch.tensor([tuple(hw) if hw else tuple(s.shape[-2:])
                             for (_, hw), s in zip(pairs, srcs)], dtype=torch.int64).view(n, 2)
        hs, ws = full[:, 0], full[:, 1]

        # draw all uniforms up front: globals (n*2 rows) then locals (n*nl rows)
        ug = torch.rand(n * 2, _NUM_U, generator=generator, dtype=torch.float64)
        ul = torch.rand(n * nl, _NUM_U, generator=generator, dtype=torch.float64)

        crop_id = torch.arange(2).repeat(n)  # 0, 1, 0, 1, ... (global crop 1 / 2)
        blur_p_g = torch.tensor(c.blur_p[:2], dtype=torch.float64)[crop_id]
        sol_p_g = torch.tensor(c.solarize_p[:2], dtype=torch.float64)[crop_id]
        g = self._family(srcs, hs.repeat_interleave(2), ws.repeat_interleave(2),
                         torch.arange(n).repeat_interleave(2), ug, gs, c.global_scale,
                         blur_p_g, sol_p_g, actual.repeat_interleave(2, dim=0))
        g = g.view(n, 2, 3, gs, gs)

        if nl > 0:
            blur_p_l = torch.full((n * nl,), float(c.blur_p[2]), dtype=torch.float64)
            sol_p_l = torch.full((n * nl,), float(c.solarize_p[2]), dtype=torch.float64)
            loc = self._family(srcs, hs.repeat_interleave(nl), ws.repeat_interleave(nl),
                               torch.arange(n).repeat_interleave(nl), ul, ls, c.local_scale,
                               blur_p_l, sol_p_l, actual.repeat_interleave(nl, dim=0))
            loc = loc.view(n, nl, 3, ls, ls)
        else:
            loc = torch.empty((n, 0, 3, ls, ls), dtype=torch.uint8)
        return g, loc

    # -- one crop family (same output size) -----------------------------------------------
    def _family(self, srcs, hs, ws, img_idx, u, size, scale, blur_p, sol_p, actual
                ) -> torch.Tensor:
        c = self.cfg
        m = u.shape[0]
        if m == 0:
            return torch.empty((0, 3, size, size), dtype=torch.uint8)

        boxes = sample_crop_boxes(hs, ws, u[:, _U_CROP:_U_CROP + 4 * _ATTEMPTS], scale,
                                  self.ratio)
        boxes = _scale_boxes(boxes, torch.stack([hs, ws], dim=1), actual)
        flip = u[:, _U_FLIP] < c.flip_p
        jit = (u[:, _U_JIT] < c.jitter_p) if self._ranges else torch.zeros(m, dtype=torch.bool)
        perm = torch.argsort(u[:, _U_PERM:_U_PERM + 4], dim=1)  # op order per crop
        gray = u[:, _U_GRAY] < c.grayscale_p
        blur = u[:, _U_BLUR] < blur_p
        lo_s, hi_s = c.blur_sigma
        sigma = (lo_s + (hi_s - lo_s) * u[:, _U_SIGMA]).to(torch.float32)
        sol = u[:, _U_SOL] < sol_p
        factors = torch.zeros(m, 4, dtype=torch.float64)
        for op, lo, hi in self._ranges:
            factors[:, op] = lo + (hi - lo) * u[:, _U_FACT + op]
        factors = factors.to(torch.float32)

        # Sort crops by (jitter?, op order): every order is a contiguous run of the sorted crops,
        # processed in cache-sized chunks that never mix two orders.
        code = (perm[:, 0] * 64 + perm[:, 1] * 16 + perm[:, 2] * 4 + perm[:, 3])
        code = torch.where(jit, code, torch.full_like(code, -1))
        order = torch.argsort(code, stable=True)
        vals, counts = torch.unique_consecutive(code[order], return_counts=True)
        factors, gray, blur, sigma, sol = (factors[order], gray[order], blur[order],
                                           sigma[order], sol[order])
        gray_l, blur_l, sol_l = gray.tolist(), blur.tolist(), sol.tolist()

        boxes_l, flip_l, img_l = boxes.tolist(), flip.tolist(), img_idx.tolist()
        order_l = order.tolist()
        out = torch.empty((m, 3, size, size), dtype=torch.uint8)
        cs = max(1, min(m, self.chunk_bytes // (3 * size * size * 4)))
        ubuf = torch.empty((cs, 3, size, size), dtype=torch.uint8)
        fbuf = torch.empty((cs, 3, size, size), dtype=torch.float32)
        ibuf = torch.empty((cs, 3, size, size), dtype=torch.int16)
        active = [op for op, _, _ in self._ranges]
        ksize = blur_kernel_size(size)
        # half a level below: a pixel is inverted when its uint8 value would be >= threshold
        # (exactly PIL/torchvision on uint8 images; robust to float rounding of v / 255)
        thr = (float(c.solarize_threshold) - 0.5) / 255.0

        start = 0
        for v, cnt in zip(vals.tolist(), counts.tolist()):
            ops = [op for op in ((v >> 6) & 3, (v >> 4) & 3, (v >> 2) & 3, v & 3) if op in active] \
                if v >= 0 else []
            for s in range(start, start + cnt, cs):
                e = min(s + cs, start + cnt)
                n = e - s
                ids = order_l[s:e]
                g_sel = [j for j in range(n) if gray_l[s + j]]
                b_sel = [j for j in range(n) if blur_l[s + j]]
                s_sel = [j for j in range(n) if sol_l[s + j]]
                if not (ops or g_sel or b_sel or s_sel):
                    # 1-2. crop + resize (+ flip) straight into the output
                    for cid in ids:
                        t, l, h, w = boxes_l[cid]
                        _resize_into(out[cid], srcs[img_l[cid]][:, :, t:t + h, l:l + w], size,
                                     flip_l[cid])
                    continue
                ub = ubuf[:n]
                for j, cid in enumerate(ids):
                    t, l, h, w = boxes_l[cid]
                    _resize_into(ub[j], srcs[img_l[cid]][:, :, t:t + h, l:l + w], size,
                                 flip_l[cid])
                x = fbuf[:n]
                x.copy_(ub).mul_(1.0 / 255.0)
                # 3. colour jitter in this run's op order
                for op in ops:
                    _JITTER_OPS[op](x, factors[s:e, op])
                # 4. grayscale
                if g_sel:
                    _apply_subset(x, g_sel, _grayscale_)
                # 5. gaussian blur
                if b_sel:
                    sg = sigma[s:e]
                    _apply_subset(x, b_sel, lambda y, idx: _gaussian_blur(y, sg[idx], ksize),
                                  pass_index=True)
                # 6. solarise
                if s_sel:
                    _apply_subset(x, s_sel, lambda y: _solarize_(y, thr))
                # float -> int16 -> uint8, truncating x * 255 + 0.5 (round half up); the direct
                # float -> uint8 conversion is ~10x slower on CPU
                ib = ibuf[:n].copy_(x.mul_(255.0).add_(0.5).clamp_(0.0, 255.0))
                for j, cid in enumerate(ids):
                    out[cid].copy_(ib[j])
            start += cnt
        return out


def decode_task_memory(crops: CropConfig, task) -> int:
    """Bytes a decode task (:class:`massl_ray.data.plan.DecodeTask`) holds, its Ray
    ``memory=``: its largest unit's decoded rows (:meth:`MultiCrop.held_pixels` x 3 each), one
    full decode in flight (12 B per pixel of TRAIN_MAX_PIXELS: a PNG's Pillow image, its RGB
    copy and the reduced one; measured 8-10.5), and the crops of all its rows. Not counted: the
    encoded rows it is handed and the worker process itself."""
    unit = max(hi - lo for _, _, lo, hi in task.units)
    crop = 3 * (2 * crops.global_size ** 2 + crops.num_local_crops * crops.local_size ** 2)
    return (unit * 3 * MultiCrop(crops).held_pixels() + 12 * TRAIN_MAX_PIXELS
            + (task.stop - task.start) * crop)


def _apply_subset(x: torch.Tensor, sel: list[int], fn, pass_index: bool = False) -> None:
    """Apply ``fn`` to the samples ``sel`` of x (in place when all are selected)."""
    n = x.shape[0]
    if len(sel) == n:
        y = fn(x, torch.arange(n)) if pass_index else fn(x)
        if y is not x:
            x.copy_(y)
        return
    # row copies: index_select / index_copy_ are far slower than torch.stack + copy_ on CPU
    sub = torch.stack([x[j] for j in sel])
    y = fn(sub, torch.tensor(sel, dtype=torch.int64)) if pass_index else fn(sub)
    for i, j in enumerate(sel):
        x[j].copy_(y[i])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (any device) -> ``(x / 255 - mean) / std`` as ``dtype``."""
    if x.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize: {x.shape[-3]} channels vs mean {mean} / std {std}")
    dev = x.device
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(-1, 1, 1)
    scale = 1.0 / (255.0 * s)
    out = torch.addcmul(-m / s, x.to(torch.float32), scale)
    return out if dtype == torch.float32 else out.to(dtype)


def eval_transform(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Standard evaluation view: resize the short side to ``round(size * 256 / 224)`` (bicubic,
    antialias), centre-crop ``size`` x ``size``. Returns uint8 [N, 3, size, size]."""
    resize_to = int(round(size * 256 / 224))
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for k, img in enumerate(images):
        x = _as_batch_image(img)
        h, w = x.shape[-2:]
        # torchvision Resize(int): short side -> resize_to, long side -> int(resize_to*long/short)
        if h <= w:
            nh, nw = resize_to, int(resize_to * w / h)
        else:
            nh, nw = int(resize_to * h / w), resize_to
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True,
                              align_corners=False)
        top = int(round((nh - size) / 2.0))
        left = int(round((nw - size) / 2.0))
        out[k].copy_(x[0, :, top:top + size, left:left + size])
    return out
