"""Tests of massl_ray.data.images (Ray-free, in-memory images built with Pillow)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from massl_ray.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, try_decode


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb_array(h=12, w=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(t: torch.Tensor, h: int, w: int) -> None:
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.uint8
    assert tuple(t.shape) == (3, h, w)


# --------------------------------------------------------------------------------------------
# formats and modes
# --------------------------------------------------------------------------------------------

def test_rgb_png_exact():
    a = _rgb_array()
    t = decode_image(_enc(Image.fromarray(a), "PNG"))
    _check(t, 12, 10)
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1))
    # bytearray / memoryview inputs work too
    assert torch.equal(decode_image(bytearray(_enc(Image.fromarray(a), "PNG"))), t)
    assert torch.equal(decode_image(memoryview(_enc(Image.fromarray(a), "PNG"))), t)


def test_rgb_jpeg_close():
    a = np.zeros((16, 24, 3), np.uint8)
    a[..., 0] = 200
    a[..., 1] = 100
    a[..., 2] = 50
    t = decode_image(_enc(Image.fromarray(a), "JPEG", quality=95))
    _check(t, 16, 24)
    assert (t.int() - torch.tensor([200, 100, 50]).view(3, 1, 1)).abs().max() <= 3


def test_grayscale_L():
    g = np.arange(0, 240, 2, dtype=np.uint8).reshape(10, 12)
    t = decode_image(_enc(Image.fromarray(g, mode="L"), "PNG"))
    _check(t, 10, 12)
    for c in range(3):
        assert torch.equal(t[c], torch.from_numpy(g))


def test_palette_P():
    im = Image.new("P", (5, 4))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    im.putpixel((2, 1), 1)
    t = decode_image(_enc(im, "PNG"))
    _check(t, 4, 5)
    assert t[:, 0, 0].tolist() == [10, 20, 30]
    assert t[:, 1, 2].tolist() == [200, 100, 50]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_P_with_transparency_composited_on_white(fmt):
    im = Image.new("P", (5, 4))
    im.putpalette([10, 20, 30, 0, 255, 0] + [0] * (256 * 3 - 6))
    im.putpixel((2, 1), 1)
    t = decode_image(_enc(im, fmt, transparency=0))  # index 0 is transparent
    _check(t, 4, 5)
    assert t[:, 0, 0].tolist() == [255, 255, 255]
    assert t[:, 1, 2].tolist() == [0, 255, 0]


def test_rgba_composited_on_white():
    a = np.zeros((2, 3, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    a[0, 1] = (255, 0, 0, 255)  # opaque red
    a[0, 2] = (0, 0, 255, 128)  # half transparent blue
    a[1, :] = (0, 0, 0, 0)  # transparent black -> white (not black: alpha is not dropped)
    t = decode_image(_enc(Image.fromarray(a, mode="RGBA"), "PNG"))
    _check(t, 2, 3)
    assert t[:, 0, 0].tolist() == [255, 255, 255]
    assert t[:, 0, 1].tolist() == [255, 0, 0]
    # round(255 * (255 - 128) / 255) = 127 for r, g; blue stays 255
    assert t[:, 0, 2].tolist() == [127, 127, 255]
    assert t[:, 1, 1].tolist() == [255, 255, 255]


def test_la_composited_on_white():
    im = Image.new("LA", (3, 2), (40, 255))
    im.putpixel((0, 0), (40, 0))
    im.putpixel((1, 0), (0, 51))  # black at alpha 0.2 -> 0.8 * 255 = 204
    t = decode_image(_enc(im, "PNG"))
    _check(t, 2, 3)
    assert t[:, 0, 0].tolist() == [255, 255, 255]
    assert t[:, 0, 1].tolist() == [204, 204, 204]
    assert t[:, 1, 2].tolist() == [40, 40, 40]


def test_rgba_webp():
    im = Image.new("RGBA", (4, 4), (0, 0, 255, 128))
    t = decode_image(_enc(im, "WEBP", lossless=True))
    _check(t, 4, 4)
    assert t[:, 0, 0].tolist() == [127, 127, 255]


def test_cmyk_jpeg():
    # pure cyan / magenta / yellow / black quadrants
    im = Image.new("CMYK", (32, 32), (0, 0, 0, 0))
    im.paste((255, 0, 0, 0), (0, 0, 16, 16))
    im.paste((0, 255, 0, 0), (16, 0, 32, 16))
    im.paste((0, 0, 255, 0), (0, 16, 16, 32))
    im.paste((0, 0, 0, 255), (16, 16, 32, 32))
    data = _enc(im, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    t = decode_image(data)
    _check(t, 32, 32)

    def px(y, x):
        return torch.tensor(t[:, y, x].tolist())

    for (y, x), rgb in {(4, 4): (0, 255, 255), (4, 28): (255, 0, 255),
                        (28, 4): (255, 255, 0), (28, 28): (0, 0, 0)}.items():
        assert (px(y, x) - torch.tensor(rgb)).abs().max() <= 8, ((y, x), px(y, x))


def test_16bit_png_scaled_not_clipped():
    vals = np.array([[0, 1, 128, 129, 257, 1000], [32767, 32896, 40000, 65279, 65534, 65535]],
                    dtype=np.uint16)
    im = Image.fromarray(vals)
    data = _enc(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    t = decode_image(data)
    _check(t, 2, 6)
    expected = np.rint(vals.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    # 128 -> 0, 129 -> 1 (rounding), 257 -> 1, 1000 -> 4, 32896 -> 128, 65535 -> 255
    assert expected.tolist() == [[0, 0, 0, 1, 1, 4], [127, 128, 156, 254, 255, 255]]
    for c in range(3):
        assert t[c].numpy().tolist() == expected.tolist()


def test_32bit_int_and_float_tiff():
    a = np.array([[0, 257, 1000, 65535]], dtype=np.int32)
    t = decode_image(_enc(Image.fromarray(a), "TIFF"))
    _check(t, 1, 4)
    assert t[0].tolist() == [[0, 1, 4, 255]]  # read as 16-bit data
    a = np.array([[0, 35000, 70000]], dtype=np.int32)  # beyond 16 bit: scaled by the max
    assert decode_image(_enc(Image.fromarray(a), "TIFF"))[0].tolist() == [[0, 128, 255]]
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert decode_image(_enc(Image.fromarray(f), "TIFF"))[1].tolist() == [[0, 128, 255]]


def test_1bit():
    im = Image.new("1", (9, 5), 0)
    im.putpixel((3, 2), 1)
    im.putpixel((8, 4), 1)
    t = decode_image(_enc(im, "PNG"))
    _check(t, 5, 9)
    assert set(t.unique().tolist()) == {0, 255}
    assert t[:, 2, 3].tolist() == [255, 255, 255]
    assert t[:, 4, 8].tolist() == [255, 255, 255]
    assert int((t[0] == 255).sum()) == 2


def _quadrants(h: int = 12, w: int = 20) -> np.ndarray:
    """h x w RGB, each quadrant (so each corner) its own colour; not square."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)  # top left red
    a[: h // 2, w // 2:] = (0, 255, 0)  # top right green
    a[h // 2:, : w // 2] = (0, 0, 255)  # bottom left blue
    a[h // 2:, w // 2:] = (255, 255, 0)  # bottom right yellow
    return a


# EXIF orientation (the TIFF/EXIF spec): the stored pixels -> the displayed ones, in numpy.
_DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # transposed (mirror + rotate 270 clockwise)
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise to display
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transverse
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise to display
}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation, fmt):
    """Every EXIF orientation: the decoded pixels are the stored image transposed as the tag
    says (corners of distinct colours, so a wrong rotation or a missing mirror shows); PNG
    exactly, JPEG within its compression error on flat colour blocks."""
    a = _quadrants()
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    kw = {"quality": 95} if fmt == "JPEG" else {}
    t = decode_image(_enc(im, fmt, exif=exif.tobytes(), **kw))
    want = np.ascontiguousarray(_DISPLAYED[orientation](a))
    got = t.permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    if fmt == "PNG":
        assert np.array_equal(got, want)
    else:
        for y, x in ((1, 1), (1, -2), (-2, 1), (-2, -2)):  # the four corners, inside the blocks
            assert np.abs(got[y, x].astype(int) - want[y, x]).max() < 40, (y, x, got[y, x])


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=10)
    t = decode_image(buf.getvalue())
    _check(t, 4, 6)
    assert t[:, 0, 0].tolist() == [255, 0, 0]


def test_max_side_downscales_short_side():
    a = _rgb_array(300, 200)
    t = decode_image(_enc(Image.fromarray(a), "PNG"), max_side=100)
    _check(t, 150, 100)
    # JPEG takes the draft (DCT-scaling) path first; the result is still exact in size
    big = Image.fromarray(_rgb_array(600, 800))
    t = decode_image(_enc(big, "JPEG"), max_side=100)
    _check(t, 100, 133)
    # small images are left alone
    t = decode_image(_enc(Image.fromarray(_rgb_array(50, 60)), "PNG"), max_side=100)
    _check(t, 50, 60)
    with pytest.raises(ValueError):
        decode_image(_enc(Image.fromarray(_rgb_array(5, 5)), "PNG"), max_side=0)


def test_max_side_on_16bit_and_palette():
    vals = (np.arange(200 * 300, dtype=np.uint32).reshape(200, 300) % 65536).astype(np.uint16)
    t = decode_image(_enc(Image.fromarray(vals), "PNG"), max_side=50)
    _check(t, 50, 75)
    im = Image.new("P", (300, 200))
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    t = decode_image(_enc(im, "PNG", transparency=0), max_side=50)
    _check(t, 50, 75)
    assert int(t.min()) == 255  # all transparent -> white


# --------------------------------------------------------------------------------------------
# bad inputs and limits
# --------------------------------------------------------------------------------------------

def _noisy_jpeg() -> bytes:
    return _enc(Image.fromarray(_rgb_array(128, 128, 3)), "JPEG", quality=90)


BAD = {
    "empty": b"",
    "random": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "text": b"this is a text file, not an image\n" * 20,
    "truncated_header": _noisy_jpeg()[:40],
    "truncated_jpeg": _noisy_jpeg()[: len(_noisy_jpeg()) // 2],
    "truncated_png": _enc(Image.fromarray(_rgb_array(64, 64)), "PNG")[:-300],
    "png_magic_only": b"\x89PNG\r\n\x1a\n",
    "jpeg_magic_only": b"\xff\xd8\xff\xe0" + b"\x00" * 20,
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_raise_decode_error(name):
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(BAD[name])
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value.reason, str) and ei.value.reason
    t, reason = try_decode(BAD[name])
    assert t is None and isinstance(reason, str) and reason


def test_not_bytes():
    with pytest.raises(ImageDecodeError):
        decode_image("not bytes")  # type: ignore[arg-type]
    assert try_decode(None)[0] is None  # type: ignore[arg-type]


def test_try_decode_success():
    t, reason = try_decode(_enc(Image.fromarray(_rgb_array()), "PNG"))
    assert reason is None
    _check(t, 12, 10)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def test_decompression_bomb_explicit_limit():
    data = _enc(Image.fromarray(_rgb_array(20, 30)), "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, max_pixels=599)
    _check(decode_image(data, max_pixels=600), 20, 30)
    _check(decode_image(data, max_pixels=None), 20, 30)
    # header-declared 10000 x 10000 (1e8 pixels) refused before decoding anything
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageDecodeError, match="too large"):
            decode_image(_png_header_only(10000, 10000), max_pixels=50_000_000)
        # bigger than Pillow's own hard limit: still an ImageDecodeError
        with pytest.raises(ImageDecodeError):
            decode_image(_png_header_only(60000, 60000))
    assert DEFAULT_MAX_PIXELS >= 100_000_000


def test_decode_error_reason_is_short():
    _, reason = try_decode(BAD["truncated_jpeg"])
    assert len(reason) < 300


# --------------------------------------------------------------------------------------------
# training: the pixel cap and the memory of a large in-cap decode
# --------------------------------------------------------------------------------------------

def test_training_refuses_images_over_its_pixel_cap_before_decoding():
    from massl_ray.config import CropConfig
    from massl_ray.data.images import TRAIN_MAX_PIXELS
    from massl_ray.data.multicrop import MultiCrop

    assert TRAIN_MAX_PIXELS == 8192 * 8192 < DEFAULT_MAX_PIXELS
    mc = MultiCrop(CropConfig())
    img, reason = mc.decode(_png_header_only(8192, 8193))
    assert img is None and "too large" in reason and str(TRAIN_MAX_PIXELS) in reason
    img, reason = mc.decode(_png_header_only(8192, 8192))  # in the cap: fails on its pixel data
    assert img is None and "too large" not in reason


_RSS_CHILD = r"""
import gc, io, sys
import numpy as np
from PIL import Image
from massl_ray.config import CropConfig
from massl_ray.data.images import decode_image
from massl_ray.data.multicrop import MultiCrop

w, h = 8000, 6000  # 48 Mpx, in the training cap
yy, xx = np.mgrid[0:h:16, 0:w:16]
small = np.stack([(xx * 7) % 256, (yy * 3) % 256, (xx + yy) % 256], -1).astype(np.uint8)
buf = io.BytesIO()
Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=85)
data = buf.getvalue()
del buf, small, yy, xx
mc = MultiCrop(CropConfig())

def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

for what in ("reduced", "full"):
    gc.collect()
    before = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    x = mc.decode(data)[0][0] if what == "reduced" else decode_image(data)
    print(what, x.shape[1], x.shape[2], kib("VmHWM:") - before)
    del x
"""


def test_a_large_in_cap_jpeg_decodes_for_training_within_a_measured_rss_budget():
    """An 8000x6000 JPEG decoded for training (default crops: 1/8, 1000x750) raises the peak
    RSS of a fresh process by at most 7 B per reduced pixel (Pillow's 4-byte RGB image and the
    3-byte array) + 12 MiB for libjpeg's and the allocator's working memory = 17 MiB (measured
    8.6-10.3 MiB); its full decode, the path before, measured 458-496 MiB (pixels: 137 MiB)."""
    import subprocess
    import sys
    from pathlib import Path

    p = subprocess.run([sys.executable, "-c", _RSS_CHILD], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r.split()[0]: [int(v) for v in r.split()[1:]] for r in p.stdout.splitlines()}
    h, w, peak_kib = rows["reduced"]
    assert (h, w) == (750, 1000)
    budget_kib = (7 * h * w) // 1024 + 12 * 1024
    assert peak_kib < budget_kib, (peak_kib, budget_kib)
    fh, fw, full_kib = rows["full"]
    assert (fh, fw) == (6000, 8000) and full_kib > 3 * fh * fw // 1024  # the measure sees it
