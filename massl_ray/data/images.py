"""Robust decoding of encoded image bytes into uint8 RGB tensors.

:func:`decode_image` turns the bytes of one encoded image into a ``uint8`` tensor of shape
``[3, H, W]`` with RGB channels, and raises :class:`ImageDecodeError` (a :class:`ValueError`) with
a short reason for *any* input it cannot turn into an image. :func:`try_decode` is the
non-raising variant for data pipelines that skip bad rows.

Accepted formats (:data:`FORMATS`): JPEG, PNG, GIF, WebP, BMP, TIFF and PPM/PGM/PBM, whatever the
file is named. Pillow is asked for these plugins only (``Image.open(..., formats=FORMATS)``), so
bytes in any other format Pillow knows (EPS, which Pillow renders with Ghostscript, PSD, ICO,
PCX, SGI, ...) are refused like any undecodable image (the reason names the accepted formats)
instead of reaching that format's parser.

Conventions
-----------
* **Alpha** (RGBA, LA, PA, palette images with a transparent colour, premultiplied modes) is
  *composited on white*: ``out = rgb * a + 255 * (1 - a)``. Dropping alpha instead would show the
  arbitrary colour stored under fully transparent pixels (often black) — composited images look
  like what a browser shows on a white page.
* **High bit depth**: 16-bit greyscale (``I;16*`` modes) is scaled with ``round(v * 255 / 65535)``
  (i.e. ``v / 257``), never clipped. 32-bit integer images (mode ``I``) are read as 16-bit data when
  all values fit in ``[0, 65535]`` (the usual case: 16-bit PNG/TIFF data), otherwise scaled by their
  maximum. Float images (mode ``F``) are read as ``[0, 1]`` data when their maximum is ``<= 1``, as
  ``[0, 255]`` data when it is ``<= 255``, otherwise scaled by their maximum; NaNs become 0.
* **1-bit** images map to 0 / 255. **CMYK**, **YCbCr** and other colour spaces Pillow can convert
  go through Pillow's conversion to RGB.
* **EXIF orientation** is applied (``ImageOps.exif_transpose``), so the returned shape is the
  displayed one. A malformed EXIF block is ignored rather than failing the image.
* **Multi-frame** files (animated GIF/PNG/WebP, multi-page TIFF) yield their first frame
  (page); the other frames are never decoded.
* **Decompression bombs**: the header's ``width * height`` is checked against ``max_pixels``
  *before* any pixel is decoded (explicit check, independent of Pillow's warnings). Pillow's own
  hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies on top and is reported the same way.
* **Truncated files** fail: the pixels are loaded eagerly inside :func:`decode_image`.
* **Training decode** (:func:`decode_reduced`): the header's ``(width, height)`` picks an integer
  reduction ``f`` (1, 2, 4 or 8; :meth:`massl_ray.data.multicrop.MultiCrop.reduction`); a JPEG is
  decoded at ``1/f`` in the DCT domain (``Image.draft``), any other format is decoded and then
  box-reduced (``Image.reduce``), so a row holds about ``1/f**2`` of the pixels. The full
  (displayed) size is returned with the pixels: crop boxes are drawn on it. Images over
  :data:`TRAIN_MAX_PIXELS` are refused.
* **Downscaling**: with ``max_side`` set, images whose *short* side exceeds it are reduced
  (antialiased bicubic) so that the short side equals ``max_side``; JPEGs use Pillow's DCT-domain
  draft mode first, which makes decoding large JPEGs much faster.

The returned tensor is a ``[3, H, W]`` view of ``[H, W, 3]`` memory ("channels last" strides,
like ``torchvision.transforms.functional.pil_to_tensor``). Call ``.contiguous()`` if a packed CHW
layout is needed; torch's uint8 resize kernels are fastest on this layout as it is.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageDecodeError", "decode_image", "decode_reduced", "try_decode", "open_image",
           "DEFAULT_MAX_PIXELS", "TRAIN_MAX_PIXELS", "FORMATS"]

#: Default decompression-bomb limit: images with more pixels than this are refused.
DEFAULT_MAX_PIXELS = 128 * 1024 * 1024
#: Training's limit (2**26, 67.1 Mpx): the largest photographs a dataset plausibly holds fit
#: (61 Mpx full-frame cameras, 50 and 64 Mpx phone sensors at full resolution); larger ones
#: (100+ Mpx medium format, 108/200 Mpx phone modes, scans) are skipped and named like any
#: undecodable image: ``prepare --max-side`` makes a training set of them.
TRAIN_MAX_PIXELS = 1 << 26

#: The Pillow plugins an image may be decoded by (Pillow's format ids): the formats the README
#: promises and the image-folder extensions of ``sources.py`` name. Multi-picture JPEGs (MPO)
#: come through the JPEG plugin.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")
_NOT_ACCEPTED = ("not a recognised image format (accepted: JPEG, PNG, GIF, WebP, BMP, TIFF, "
                 "PPM/PGM/PBM)")

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE_TO_RGB = {"CMYK", "YCbCr", "RGBX", "HSV", "LAB"}


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded into an RGB image. ``reason`` is a short string."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 (straight alpha) -> [H, W, 3] uint8 composited on a white background."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _gray_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel high-bit-depth array to uint8 (see the module docstring)."""
    if mode.startswith("I;16"):
        a = arr.astype(np.uint32)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "I":
        a = arr.astype(np.int64)
        a = np.clip(a, 0, None)
        hi = int(a.max()) if a.size else 0
        if hi <= 65535:
            return ((a * 255 + 32767) // 65535).astype(np.uint8)
        return np.rint(a.astype(np.float64) * (255.0 / hi)).astype(np.uint8)
    if mode == "F":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        a = np.clip(a, 0.0, None)
        hi = float(a.max()) if a.size else 0.0
        if hi <= 1.0:
            scale = 255.0
        elif hi <= 255.0:
            scale = 1.0
        else:
            scale = 255.0 / hi
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    raise ImageDecodeError(f"unsupported image mode {mode}")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> [H, W, 3] uint8 RGB array (writable)."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img)
    if mode == "L":
        g = np.array(img)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "1":
        g = np.array(img.convert("L"))
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "P":
        if "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA"):
            return _composite_on_white(np.array(img.convert("RGBA")))
        return np.array(img.convert("RGB"))
    if mode in _ALPHA_MODES:
        return _composite_on_white(np.array(img.convert("RGBA")))
    if mode in _CONVERTIBLE_TO_RGB:
        try:
            return np.array(img.convert("RGB"))
        except (ValueError, OSError) as e:
            raise ImageDecodeError(f"cannot convert mode {mode} to RGB: {e}") from None
    if mode.startswith("I;16") or mode in ("I", "F"):
        g = _gray_to_u8(np.array(img), mode)
        return np.repeat(g[..., None], 3, axis=2)
    # Any other mode: let Pillow try, else refuse.
    try:
        return np.array(img.convert("RGB"))
    except (ValueError, OSError):
        raise ImageDecodeError(f"unsupported image mode {mode}") from None


def _shrink(arr: np.ndarray, max_side: int) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] uint8 (HWC strides), short side reduced to ``max_side``."""
    h, w = arr.shape[:2]
    t = torch.from_numpy(arr).permute(2, 0, 1)
    short = min(h, w)
    if short <= max_side:
        return t
    scale = max_side / short
    if h <= w:
        nh, nw = max_side, max(1, int(round(w * scale)))
    else:
        nh, nw = max(1, int(round(h * scale))), max_side
    out = F.interpolate(t.unsqueeze(0), size=(nh, nw), mode="bicubic", antialias=True,
                        align_corners=False)
    return out[0]


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` of encoded bytes, restricted to :data:`FORMATS` (anything else raises
    ``PIL.UnidentifiedImageError``); lazy, like ``Image.open``."""
    return Image.open(io.BytesIO(data), formats=FORMATS)


def decode_image(
    data: bytes,
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    max_side: Optional[int] = None,
) -> torch.Tensor:
    """Decode encoded image bytes into a uint8 RGB tensor ``[3, H, W]``.

    Args:
        data: the encoded file (``bytes``, ``bytearray`` or ``memoryview``).
        max_pixels: refuse images whose header declares more than this many pixels
            (``width * height``); ``None`` disables the explicit check.
        max_side: if set, downscale so that the *short* side is at most this many pixels.

    Raises:
        ImageDecodeError: for every input that does not decode to an image (empty, truncated,
            not an image, unsupported mode, too many pixels), with a short reason.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive integer or None, got {max_side}")
    arr, _ = _decode(data, max_pixels, max_side, None)
    if max_side is not None:
        return _shrink(arr, max_side)
    return torch.from_numpy(arr).permute(2, 0, 1)


def decode_reduced(data: bytes, reduction: Callable[[int, int], int],
                   max_pixels: Optional[int] = TRAIN_MAX_PIXELS
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
    """The training decode: ``(pixels [3, h, w], (H, W))``, the pixels reduced by the factor
    ``reduction(width, height)`` of the header (a JPEG in the DCT domain, others by
    ``Image.reduce``), ``(H, W)`` the full displayed size. Raises like :func:`decode_image`."""
    arr, full = _decode(data, max_pixels, None, reduction)
    return torch.from_numpy(arr).permute(2, 0, 1), full


def _decode(data, max_pixels, max_side, reduction) -> tuple[np.ndarray, tuple[int, int]]:
    """[H, W, 3] uint8 pixels (reduced by ``reduction(w, h)`` if given) and the full displayed
    (H, W); raises ImageDecodeError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty input (0 bytes)")
    try:
        img = open_image(data)
    except UnidentifiedImageError:
        raise ImageDecodeError(_NOT_ACCEPTED) from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb refused by Pillow: {e}") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad input
        raise ImageDecodeError(f"cannot open image: {type(e).__name__}: {e}") from None
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError(f"invalid image size {w}x{h}")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(
                f"image too large: {w}x{h} = {w * h} pixels > max_pixels={max_pixels} "
                "(possible decompression bomb)"
            )
        f = reduction(w, h) if reduction is not None else 1
        if f > 1 and img.format == "JPEG":
            img.draft(img.mode, (w // f, h // f))  # scale min(w // (w // f), ...) is exactly f
        elif max_side is not None and img.format == "JPEG" and min(w, h) > max_side:
            scale = max_side / min(w, h)
            # draft() picks the smallest DCT scale whose size is >= the requested one.
            img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"decompression bomb refused by Pillow: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise ImageDecodeError(f"corrupt or truncated image data: {e}") from None
        stored = img.size
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - malformed EXIF: keep the stored orientation
            pass
        full = (w, h) if img.size != stored else (h, w)  # (H, W) as displayed
        if f > 1 and stored == (w, h):  # not drafted: box-reduce (modes 1, P, I;16: as RGB)
            try:
                img = img.reduce(f)
            except ValueError:
                img = Image.fromarray(_to_rgb_array(img)).reduce(f)
        arr = _to_rgb_array(img)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001 - wrap whatever Pillow raises
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    finally:
        try:
            img.close()
        except Exception:  # noqa: BLE001
            pass
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageDecodeError(f"unexpected decoded array {arr.dtype} {arr.shape}")
    return arr, full


def try_decode(
    data: bytes,
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    max_side: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """Like :func:`decode_image` but never raises for bad data: ``(tensor, None)`` or
    ``(None, reason)``."""
    try:
        return decode_image(data, max_pixels=max_pixels, max_side=max_side), None
    except ImageDecodeError as e:
        return None, e.reason
