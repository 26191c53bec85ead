"""Image retrieval with teacher features: mean average precision. Ray-free.

Two protocols:

- **Class-level retrieval** on any labeled source (:func:`class_retrieval`): every query is
  ranked against the database by cosine similarity of L2-normalised features; the database
  images of the query's class are the positives. Average precision is the non-interpolated
  one: the mean, over the positives, of the precision at each positive's rank. Reported: mAP
  and the mean precision at k (the fraction of the first k results that are positives), in
  percent. Equal similarities rank by database index (a stable sort). With ``exclude_self``
  (queries = database) each query's own row is left out of its ranking.
- **Revisited Oxford / Paris** (Radenovic et al., CVPR 2018; :func:`revisited_metrics`,
  :func:`evaluate_revisited`): the ``gnd_<name>.pkl`` ground truth (``imlist``, ``qimlist``,
  and per query ``bbx``, ``easy``, ``hard``, ``junk``: indices into ``imlist``) with the images
  in ``jpg/<name>.jpg``. Per setting, the positives and the ignored images are
  Easy: easy / junk + hard; Medium: easy + hard / junk; Hard: hard / junk + easy. The ignored
  images are removed from the ranking before the AP is computed. AP as the protocol's Oxford
  code defines it: precision interpolated linearly between consecutive recall levels
  (the trapezoid rule: each positive adds ``(p_before + p_at) / 2 / n_pos``, where
  ``p_at = (j + 1) / (r + 1)`` for the ``j``-th positive at 0-based rank ``r`` and
  ``p_before = j / r``, or 1 at rank 0). mP@k as the protocol defines it: the precision at
  ``min(k, rank of the last positive)`` (1-based ranks, ignored images removed). A query
  without positives in a setting is left out of that setting's means (and counted).
  Features are DINO's multi-scale descriptor (:class:`MultiScaleFeatures`): the final [CLS]
  token at scales 1, 1/sqrt 2 and 1/2 of the (normalised) image, bilinear, summed, divided by
  the number of scales and L2-normalised. Queries are cropped to their ``bbx`` first; every
  image is shrunk (never enlarged) so that its longer side is at most ``imsize``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from massl_ray.evaluate.features import actor_backbone, cls_tokens

DEFAULT_RETRIEVAL_KS = (1, 5, 10)
DINO_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
SETTINGS = ("easy", "medium", "hard")


# ---- class-level retrieval -----------------------------------------------------------------

@torch.no_grad()
def class_retrieval(query_feats: torch.Tensor, query_labels: torch.Tensor,
                    db_feats: torch.Tensor, db_labels: torch.Tensor,
                    ks: Sequence[int] = DEFAULT_RETRIEVAL_KS, exclude_self: bool = False,
                    chunk: int = 256) -> dict:
    """mAP and mean precision@k (percent) of class-level retrieval; see the module docstring.

    Returns ``{"map", "precision_at": {str(k): ...}, "queries", "no_positive"}``; queries whose
    class has no database image are left out (``no_positive`` counts them).
    """
    if exclude_self and query_feats.shape[0] != db_feats.shape[0]:
        raise ValueError("exclude_self needs the queries to be the database (same rows)")
    if db_feats.shape[0] == 0 or query_feats.shape[0] == 0:
        raise ValueError("retrieval needs at least one query and one database feature")
    db = F.normalize(db_feats.float(), dim=1)
    dl = db_labels.long()
    n_db = db.shape[0]
    ks = [int(k) for k in ks]
    ap_sum, prec_sum = 0.0, {k: 0.0 for k in ks}
    counted = no_pos = 0
    ranks = torch.arange(1, n_db + 1, dtype=torch.float64)
    for s in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[s:s + chunk].float(), dim=1)
        ql = query_labels[s:s + chunk].long()
        sim = q @ db.T
        if exclude_self:
            rows = torch.arange(q.shape[0])
            sim[rows, rows + s] = -math.inf  # last in the ranking and never relevant
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices
        rel = dl[order] == ql[:, None]
        if exclude_self:
            rel[:, -1] = False
        relf = rel.double()
        n_pos = relf.sum(1)
        hits = relf.cumsum(1)
        ap = (relf * hits / ranks).sum(1) / n_pos.clamp_min(1)
        ok = n_pos > 0
        no_pos += int((~ok).sum())
        counted += int(ok.sum())
        ap_sum += float(ap[ok].sum())
        for k in ks:
            kk = min(k, n_db - (1 if exclude_self else 0))
            prec_sum[k] += float((hits[ok, kk - 1] / kk).sum()) if kk > 0 else 0.0
    if counted == 0:
        raise ValueError("retrieval: no query has a positive in the database")
    return {"map": 100.0 * ap_sum / counted,
            "precision_at": {str(k): 100.0 * prec_sum[k] / counted for k in ks},
            "queries": counted, "no_positive": no_pos}


# ---- the revisited Oxford / Paris protocol -------------------------------------------------

def trapezoid_ap(pos_ranks: np.ndarray, n_pos: int) -> float:
    """AP of positives at the given 0-based ranks (sorted, ignored images already removed),
    precision interpolated linearly between recall levels."""
    ap = 0.0
    for j, r in enumerate(np.asarray(pos_ranks, dtype=np.int64)):
        p_before = 1.0 if r == 0 else j / r
        p_at = (j + 1) / (r + 1)
        ap += (p_before + p_at) / 2.0 / n_pos
    return ap


def _positive_ranks(order: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``order`` once the ignored images are taken out."""
    is_pos = np.isin(order, positives)
    is_ign = np.isin(order, ignored) & ~is_pos
    kept = ~is_ign
    rank_without = np.cumsum(kept) - 1  # rank of each kept position among the kept ones
    return rank_without[is_pos]


def setting_lists(g: dict, setting: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) of one query's ground truth in a setting."""
    e = np.asarray(g.get("easy", []), dtype=np.int64)
    h = np.asarray(g.get("hard", []), dtype=np.int64)
    j = np.asarray(g.get("junk", []), dtype=np.int64)
    if setting == "easy":
        return e, np.concatenate([j, h])
    if setting == "medium":
        return np.concatenate([e, h]), j
    if setting == "hard":
        return h, np.concatenate([j, e])
    raise ValueError(f"setting {setting!r} must be one of {SETTINGS}")


def revisited_metrics(order: np.ndarray, gnd: Sequence[dict],
                      ks: Sequence[int] = DEFAULT_RETRIEVAL_KS,
                      settings: Sequence[str] = SETTINGS) -> dict:
    """``order``: ``[n_queries, n_db]`` database indices, most similar first. Per setting:
    mAP and mP@k in percent, per-query APs, and the number of queries left out."""
    order = np.asarray(order)
    if order.shape[0] != len(gnd):
        raise ValueError(f"{order.shape[0]} rankings for {len(gnd)} queries")
    out = {}
    for setting in settings:
        aps, precs, empty = [], [], 0
        for i, g in enumerate(gnd):
            pos, ign = setting_lists(g, setting)
            if len(pos) == 0:
                empty += 1
                aps.append(None)
                continue
            r = np.sort(_positive_ranks(order[i], pos, ign))
            aps.append(trapezoid_ap(r, len(pos)))
            one_based = r + 1
            row = []
            for k in ks:
                kq = min(int(one_based.max()), int(k))
                row.append(float((one_based <= kq).sum()) / kq)
            precs.append(row)
        valid = [a for a in aps if a is not None]
        out[setting] = {
            "map": 100.0 * float(np.mean(valid)) if valid else None,
            "mp_at": ({str(k): 100.0 * float(np.mean([p[j] for p in precs]))
                       for j, k in enumerate(ks)} if precs else None),
            "ap_per_query": [None if a is None else round(100.0 * a, 4) for a in aps],
            "queries": len(valid), "no_positive": empty,
        }
    return out


@dataclass
class RevisitedDataset:
    name: str
    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    gnd_file: Path
    ext: str = ".jpg"

    def image_path(self, name: str) -> Path:
        return self.root / "jpg" / (name + self.ext)

    def items(self) -> list[tuple[Path, Optional[list]]]:
        """``(image path, query box or None)``: the database images, then the queries."""
        return ([(self.image_path(n), None) for n in self.imlist]
                + [(self.image_path(n), g.get("bbx")) for n, g in zip(self.qimlist, self.gnd)])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.gnd_file.read_bytes())
        for n in self.imlist + self.qimlist:
            p = self.image_path(n)
            h.update(f"{n}:{p.stat().st_size if p.is_file() else -1}".encode())
        return h.hexdigest()[:20]


def _latin1_encode(obj, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (bytes and array data as latin-1 text)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not admitted")
    return obj.encode("latin-1", errors)


def _gnd_globals() -> dict[tuple[str, str], object]:
    import importlib

    try:  # numpy >= 2; pickles written by numpy 1 name numpy.core, admitted as the same objects
        ma = importlib.import_module("numpy._core.multiarray")
        nu = importlib.import_module("numpy._core.numeric")
    except ImportError:
        ma = importlib.import_module("numpy.core.multiarray")
        nu = importlib.import_module("numpy.core.numeric")

    import builtins

    out: dict[tuple[str, str], object] = {
        ("builtins", n): getattr(builtins, n)
        for n in ("set", "frozenset", "bytes", "bytearray", "complex")}
    out[("_codecs", "encode")] = _latin1_encode
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    for mod in ("numpy._core", "numpy.core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = ma._reconstruct
        out[(f"{mod}.multiarray", "scalar")] = ma.scalar
        out[(f"{mod}.numeric", "_frombuffer")] = nu._frombuffer
    return out


class GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles data only: dicts, lists, tuples, strings, bytes, numbers, sets and numpy
    arrays / scalars (what the revisited ``gnd_*.pkl`` files hold: lists of dicts of index
    arrays and boxes). Any other global a pickle names (a class, a function, ``os.system``, a
    ``__reduce__`` payload) is refused before it is looked up, so nothing of it runs."""

    ADMITTED: Optional[dict] = None

    def find_class(self, module: str, name: str):
        if GroundTruthUnpickler.ADMITTED is None:
            GroundTruthUnpickler.ADMITTED = _gnd_globals()
        key = ("builtins" if module == "__builtin__" else module, name)
        if key not in GroundTruthUnpickler.ADMITTED:
            raise pickle.UnpicklingError(
                f"the pickle names {module}.{name}, which a ground-truth file never holds")
        return GroundTruthUnpickler.ADMITTED[key]


def read_ground_truth(p: Path) -> dict:
    """A ``gnd_*.pkl`` file's content through :class:`GroundTruthUnpickler`."""
    with open(p, "rb") as f:
        try:
            cfg = GroundTruthUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{p}: refused as a revisited ground-truth file: {e} (only data: "
                             f"lists, dicts, strings, numbers, numpy arrays)") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                MemoryError) as e:
            raise ValueError(f"{p}: not a readable ground-truth pickle: "
                             f"{type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: not a revisited ground-truth file (a {type(cfg).__name__}, "
                         f"not a dict)")
    return cfg


def _check_names(p: Path, key: str, names) -> None:
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{p}: {key} must be a list of image names")
    for n in names:
        if (not isinstance(n, str) or not n or "\x00" in n or os.path.isabs(n)
                or ".." in n.replace("\\", "/").split("/")):
            raise ValueError(f"{p}: {key} entry {n!r} is not an image name under jpg/")


def load_revisited(path: Union[str, os.PathLike]) -> RevisitedDataset:
    """A dataset directory holding ``gnd_<name>.pkl`` (and ``jpg/``), or the .pkl file itself.

    The ground truth is a pickle (the format the protocol ships); it is read with
    :class:`GroundTruthUnpickler`, which admits data only (no class or function a pickle
    names is looked up, so a crafted file cannot run code), and image names must stay under
    ``jpg/``.
    """
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("gnd_*.pkl"))
        if len(found) != 1:
            raise ValueError(f"{p}: expected one gnd_<name>.pkl, found "
                             f"{[f.name for f in found] or 'none'}")
        p = found[0]
    if not p.is_file():
        raise ValueError(f"revisited ground truth {p} does not exist")
    cfg = read_ground_truth(p)
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{p}: not a revisited ground-truth file (no {key!r})")
    _check_names(p, "imlist", cfg["imlist"])
    _check_names(p, "qimlist", cfg["qimlist"])
    ext = cfg.get("ext", ".jpg")
    if not isinstance(ext, str) or not re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext):
        raise ValueError(f"{p}: ext {ext!r} must be a file extension such as '.jpg'")
    if not isinstance(cfg["gnd"], (list, tuple)) or not all(isinstance(g, dict) for g in cfg["gnd"]):
        raise ValueError(f"{p}: gnd must be a list of one dict per query")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{p}: {len(cfg['gnd'])} ground-truth entries for "
                         f"{len(cfg['qimlist'])} queries")
    n = len(cfg["imlist"])
    for i, g in enumerate(cfg["gnd"]):
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(g.get(key, []), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"{p}: query {i} {key} index out of range 0..{n - 1}")
    ds = RevisitedDataset(p.stem[len("gnd_"):], p.parent, list(cfg["imlist"]),
                          list(cfg["qimlist"]), list(cfg["gnd"]), p, cfg.get("ext", ".jpg"))
    missing = [n for n in ds.imlist + ds.qimlist if not ds.image_path(n).is_file()]
    if missing:
        raise ValueError(f"{p}: {len(missing)} image(s) missing under {ds.root / 'jpg'}, e.g. "
                         f"{ds.image_path(missing[0])}")
    return ds


# ---- multi-scale features ------------------------------------------------------------------

def _patch(backbone: nn.Module) -> tuple[int, int]:
    p = getattr(getattr(backbone, "patch_embed", None), "patch_size", 1)
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


class MultiScaleFeatures:
    """One uint8 image ``[3, H, W]`` -> its multi-scale descriptor ``[D]`` (float32, unit norm).

    Per scale: normalise, resize by ``scale`` (bilinear, ``F.interpolate(scale_factor=...)``),
    drop the bottom/right rows and columns that do not fill a patch (what a strided patch
    convolution does), take the final [CLS]; sum, divide by the number of scales, L2-normalise.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 scales: Sequence[float] = DINO_SCALES, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(3, 1, 1)
        self.scales = tuple(float(s) for s in scales)
        self.patch = _patch(backbone)

    @torch.no_grad()
    def __call__(self, image_u8: torch.Tensor) -> torch.Tensor:
        x = ((image_u8.to(self.device).float() / 255.0 - self.mean) / self.std)[None]
        v = None
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                                  align_corners=False)
            h = xs.shape[-2] // self.patch[0] * self.patch[0]
            w = xs.shape[-1] // self.patch[1] * self.patch[1]
            if h == 0 or w == 0:
                raise ValueError(f"image {tuple(image_u8.shape[-2:])} at scale {s:.3f} is "
                                 f"smaller than a patch {self.patch}")
            f = cls_tokens(self.backbone, xs[..., :h, :w])[0, -1].float()
            v = f if v is None else v + f
        v = v / len(self.scales)
        return F.normalize(v, dim=0).cpu()


def prepare_image(data: bytes, imsize: Optional[int], bbx: Optional[Sequence[float]] = None
                  ) -> torch.Tensor:
    """Decode to uint8 RGB ``[3, H, W]``, crop to ``bbx`` (x1, y1, x2, y2; rounded) if given,
    shrink so that the longer side is at most ``imsize`` (bicubic, antialiased; aspect kept)."""
    from massl_ray.data.images import try_decode

    img, why = try_decode(bytes(data))
    if img is None:
        raise ValueError(f"undecodable image: {why}")
    if bbx is not None:
        x1, y1, x2, y2 = (int(round(float(c))) for c in bbx)
        h, w = img.shape[-2:]
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"empty query box {list(bbx)} for an image of {w}x{h}")
        img = img[:, y1:y2, x1:x2]
    h, w = img.shape[-2:]
    if imsize and max(h, w) > imsize:
        f = imsize / max(h, w)
        nh, nw = max(1, int(round(h * f))), max(1, int(round(w * f)))
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True,
                          align_corners=False)
        img = x[0].round().clamp(0, 255).to(torch.uint8)
    return img.contiguous()


def revisited_features(embed: Callable[[torch.Tensor], torch.Tensor], ds: RevisitedDataset,
                       imsize: Optional[int], progress: Optional[Callable[[int, int], None]] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(database ``[N, D]``, queries ``[Q, D]``): one image at a time (sizes differ)."""
    items = ds.items()
    out = []
    for path, bbx in items:
        out.append(embed(prepare_image(path.read_bytes(), imsize, bbx)))
        if progress:
            progress(len(out), len(items))
    n = len(ds.imlist)
    return torch.stack(out[:n]), torch.stack(out[n:])


class RevisitedFn:
    """``map_batches`` stage of the revisited descriptors (an actor pool; arguments as
    :func:`features.actor_backbone`): rows ``{index, path, bbx, has_bbx}`` -> ``{index,
    feature}``: read, decode, crop, shrink, multi-scale descriptor, one image at a time."""

    def __init__(self, weights, model: dict, mean: Sequence[float], std: Sequence[float],
                 device: str = "cpu", threads: Optional[int] = None,
                 scales: Sequence[float] = DINO_SCALES, imsize: Optional[int] = None):
        self.embed = MultiScaleFeatures(actor_backbone(weights, model, device, threads), mean,
                                        std, scales, device)
        self.imsize = imsize

    def __call__(self, batch: dict) -> dict:
        out = []
        for path, bbx, has in zip(batch["path"], batch["bbx"], batch["has_bbx"]):
            with open(str(path), "rb") as f:
                out.append(self.embed(prepare_image(f.read(), self.imsize,
                                                    list(bbx) if has else None)).numpy())
        return {"index": np.asarray(batch["index"]), "feature": np.stack(out)}


def rank_database(db: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """``[Q, N]`` database indices by decreasing cosine similarity (ties: lower index first)."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(db.float(), dim=1).T
    return torch.sort(sim, dim=1, descending=True, stable=True).indices.numpy()


def evaluate_revisited(ds: RevisitedDataset, features: tuple[torch.Tensor, torch.Tensor],
                       ks: Sequence[int] = DEFAULT_RETRIEVAL_KS) -> dict:
    """Rankings of the (database, queries) features and :func:`revisited_metrics`."""
    res = revisited_metrics(rank_database(*features), ds.gnd, ks)
    res.update(dataset=ds.name, database=len(ds.imlist), num_queries=len(ds.qimlist))
    return res


def revisited_cache_key(weights_sha256: str, ds: RevisitedDataset, imsize: Optional[int],
                        scales: Sequence[float]) -> str:
    blob = json.dumps({"format": "massl_ray/revisited/1", "weights": weights_sha256,
                       "data": ds.fingerprint(), "imsize": imsize,
                       "scales": [round(float(s), 8) for s in scales]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
