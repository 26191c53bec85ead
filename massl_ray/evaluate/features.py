"""Teacher features of labeled images, for the evaluation jobs. Ray-free.

- :func:`load_teacher`: the teacher backbone of a checkpoint (eval mode, no head) and the
  run's configuration; or of an exported ``.safetensors`` file (ours from ``export``, or any
  timm ViT's weights) described by its ``.json`` sidecar (:func:`load_exported_teacher`).
- :class:`TeacherFeatures`: the one teacher feature extractor (``eval``, ``embed``, the online
  k-NN monitor and the end-of-run k-NN): uint8 eval views -> the normalised [CLS] token of the
  last ``n`` blocks, ``[B, n, D]``. The last one is exactly ``backbone(x)`` (the k-NN feature);
  the concatenation of the ``n`` is the linear-probe feature (DINO: n = 4 for ViT-S).
- :class:`EvalViewsFn` / :class:`FeatureFn`: the two ``map_batches`` stages of the Ray Data
  batch inference (decode + resize + centre crop on CPU tasks; the backbone in an actor pool).
  Plain callables, so the in-process path (:func:`extract_in_process`) runs the same code.
- :class:`FeatureCache`: features + labels on disk, keyed by checkpoint, source and view size,
  so k-NN, linear probe and few-shot (and a second evaluation of the same checkpoint) reuse them.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from massl_ray.method.checkpoint import (META_FILE, CheckpointError, is_uri,
                                        latest_valid_checkpoint, load_checkpoint, read_meta)
from massl_ray.config import Config, config_from_dict
from massl_ray.data.images import try_decode
from massl_ray.method.learner import config_of_state, normalize
from massl_ray.method.model import build_backbone
from massl_ray.data.multicrop import eval_transform
from massl_ray.data.sources import Source, iter_rows, row_id


#: The keyword arguments a sidecar / header may give ``timm.create_model``: exactly the ones
#: :func:`massl_ray.method.model.backbone_kwargs` writes, with the types it writes them in.
TIMM_KWARGS: dict[str, tuple[type, ...]] = {
    "embed_dim": (int,),
    "depth": (int,),
    "num_heads": (int,),
    "patch_size": (int,),
    "img_size": (int,),
    "num_classes": (int,),
    "global_pool": (str,),
    "dynamic_img_size": (bool,),
    "drop_path_rate": (int, float),
    "pretrained": (bool,),  # only false: true downloads weights
}
#: A registered timm model name, optionally with a pretrained tag (``vit_small_patch16_224`` or
#: ``vit_small_patch16_224.augreg_in21k``); no ``hf-hub:`` / ``local-dir:`` / ``timm/`` source.
TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
GLOBAL_POOLS = ("", "token", "avg")


def check_timm_spec(name: Any, kwargs: Any, where: Union[str, os.PathLike]) -> tuple[str, dict]:
    """``(name, kwargs)`` of a sidecar or safetensors header, checked before timm sees them:
    a plain model name and only :data:`TIMM_KWARGS`; raises :class:`CheckpointError` naming
    the refused name or key (and ``where``)."""
    if not isinstance(name, str) or not TIMM_NAME.fullmatch(name):
        raise CheckpointError(
            f"{where}: timm_name {name!r} is refused: only a timm model name (letters, digits, "
            f"'_', an optional '.tag'), never a source such as hf-hub: or local-dir:")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: timm_kwargs must be a mapping, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in TIMM_KWARGS:
            raise CheckpointError(
                f"{where}: timm_kwargs key {key!r} is refused (only {', '.join(TIMM_KWARGS)} "
                f"build a model from an exported file; a model file cannot choose what timm "
                f"downloads or loads)")
        types = TIMM_KWARGS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CheckpointError(f"{where}: timm_kwargs {key}={value!r} must be "
                                  f"{' or '.join(t.__name__ for t in types)}")
        if key == "pretrained" and value:
            raise CheckpointError(f"{where}: timm_kwargs pretrained=true is refused: the "
                                  f"weights are the exported file's, never downloaded")
        if key == "global_pool" and value not in GLOBAL_POOLS:
            raise CheckpointError(f"{where}: timm_kwargs global_pool={value!r} must be one of "
                                  f"{GLOBAL_POOLS}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise CheckpointError(f"{where}: timm_kwargs {key}={value!r} must be >= 0")
    return name, dict(kwargs)

CACHE_FORMAT = "massl_ray/features/1"


# ---- the teacher backbone ------------------------------------------------------------------

def resolve_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """A checkpoint directory (with meta.json), or a run directory -> its newest valid checkpoint."""
    p = Path(path)
    if (p / META_FILE).is_file():
        return p.absolute()
    if p.is_dir():
        found = latest_valid_checkpoint(p)
        if found is not None:
            return found
        raise CheckpointError(f"{p} holds no valid checkpoint (no checkpoint_*/ with a good meta.json)")
    raise CheckpointError(f"checkpoint {p} does not exist")


def teacher_backbone_state(state: dict) -> dict[str, torch.Tensor]:
    """The teacher backbone's weights from a training state, with timm's own key names."""
    pre = "backbone."
    return {k[len(pre):]: v for k, v in state["teacher"].items() if k.startswith(pre)}


def build_teacher_backbone(cfg: Config, weights: dict[str, torch.Tensor]) -> nn.Module:
    bb = build_backbone(cfg.model, cfg.crops.global_size, 0.0)
    bb.load_state_dict(weights, strict=True)
    bb.eval()
    bb.requires_grad_(False)
    return bb


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Teacher:
    backbone: nn.Module
    cfg: Optional[Config]  # None for an exported backbone
    weights: dict[str, torch.Tensor]
    checkpoint: Path  # the checkpoint directory, or the .safetensors file
    global_step: Optional[int]
    sha256: str  # identifies the weights (cache key): state.pt's, or the exported file's + sidecar
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_size: int = 224  # the default eval view size
    # How to rebuild the backbone elsewhere (a Ray actor): {"config": dict} or
    # {"timm_name": str, "timm_kwargs": dict}.
    model_spec: Optional[dict] = None
    kind: str = "checkpoint"  # checkpoint | exported


def build_from_spec(spec: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The backbone of :attr:`Teacher.model_spec` with ``weights``, eval mode, frozen."""
    if "config" in spec:
        return build_teacher_backbone(config_from_dict(spec["config"], validate=False), weights)
    import timm

    model = timm.create_model(spec["timm_name"], **spec["timm_kwargs"])
    model.load_state_dict(weights, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def is_exported(path: Union[str, os.PathLike]) -> bool:
    return str(path).endswith(".safetensors")


def load_teacher(checkpoint: Union[str, os.PathLike]) -> Teacher:
    """Verify and load a checkpoint (directory, or run directory), or an exported
    ``.safetensors`` backbone; build its teacher backbone on CPU."""
    if is_exported(checkpoint):
        return load_exported_teacher(checkpoint)
    d = resolve_checkpoint(checkpoint)
    state = load_checkpoint(d)  # verifies the sha256 first
    meta = read_meta(d)
    cfg = config_of_state(state)
    weights = teacher_backbone_state(state)
    return Teacher(build_teacher_backbone(cfg, weights), cfg, weights, d,
                   int(state["global_step"]), str(meta["sha256"]), tuple(cfg.crops.mean),
                   tuple(cfg.crops.std), cfg.crops.global_size, {"config": cfg.to_dict()})


def exported_spec(p: Path) -> tuple[str, dict, dict]:
    """``(timm name, kwargs, meta)`` of an exported backbone: from its sidecar ``<name>.json``,
    or without one from the safetensors header (``timm_name``, ``timm_kwargs``); the name and
    kwargs through :func:`check_timm_spec` (an untrusted file: only the ViT arguments the
    project's own export writes reach timm)."""
    from safetensors import SafetensorError, safe_open

    side = p.with_suffix(".json")
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except ValueError as e:
            raise CheckpointError(f"sidecar {side} is not JSON: {e}") from None
        if not isinstance(meta, dict) or "timm_name" not in meta:
            raise CheckpointError(f"sidecar {side} has no timm_name")
        return (*check_timm_spec(meta["timm_name"], meta.get("timm_kwargs"), side), meta)
    try:
        with safe_open(str(p), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file: {e}") from None
    if "timm_name" not in header:
        raise CheckpointError(f"{p}: no sidecar {side.name} and no timm_name in the header: "
                              f"write {side.name} with timm_name (and timm_kwargs, mean, std)")
    meta = {"timm_name": header["timm_name"],
            "timm_kwargs": json.loads(header.get("timm_kwargs", "{}"))}
    return (*check_timm_spec(meta["timm_name"], meta["timm_kwargs"], f"{p} (header)"), meta)


def load_exported_teacher(path: Union[str, os.PathLike]) -> Teacher:
    """A backbone as safetensors + its sidecar ``<name>.json`` (``export`` writes both).

    The sidecar needs ``timm_name``; optional ``timm_kwargs`` (default ``{}``), ``mean`` and
    ``std`` (default ImageNet's), ``image_size`` (default ``timm_kwargs["img_size"]`` or 224),
    ``global_step``. Without a sidecar the safetensors header must hold ``timm_name`` /
    ``timm_kwargs`` (ours does). The model is built with ``pretrained=False``,
    ``num_classes=0`` (features only: a classifier ``head.*`` in the file is dropped) and, unless
    the sidecar says otherwise, ``dynamic_img_size=True`` (other resolutions interpolate the
    position embedding). Every other key must match the model exactly.
    """
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"exported backbone {p} does not exist")
    name, kwargs, meta = exported_spec(p)
    try:
        weights = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file: {e}") from None
    kwargs = dict(kwargs)
    kwargs.update(pretrained=False, num_classes=0)
    kwargs.setdefault("dynamic_img_size", True)
    dropped = sorted(k for k in weights if k.startswith("head."))
    for k in dropped:
        del weights[k]
    try:
        model = timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{p}: timm cannot build {name!r} with {kwargs}: {e}") from None
    if not hasattr(model, "blocks") or not hasattr(model, "forward_intermediates"):
        raise CheckpointError(f"{p}: {name!r} is not a timm ViT (no blocks)")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{p}: the weights do not fit {name!r}: {e}") from None
    model.eval()
    model.requires_grad_(False)
    mean = tuple(float(v) for v in meta.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in meta.get("std", IMAGENET_STD))
    size = int(meta.get("image_size") or kwargs.get("img_size") or 224)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    spec = {"timm_name": name, "timm_kwargs": kwargs}
    h.update(json.dumps({**spec, "mean": mean, "std": std}, sort_keys=True).encode())
    step = meta.get("global_step")
    return Teacher(model, None, weights, p.absolute(), None if step is None else int(step),
                   h.hexdigest(), mean, std, size, spec, kind="exported")


def cls_tokens(backbone: nn.Module, x: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """``[B, blocks, D]``: the final-norm [CLS] token of the last ``blocks`` blocks of
    normalised images ``x`` (``[:, -1]`` is ``backbone(x)`` for ours)."""
    inter = backbone.forward_intermediates(x, indices=blocks, return_prefix_tokens=True,
                                           norm=True, output_fmt="NLC", intermediates_only=True)
    return torch.stack([prefix[:, 0] for _, prefix in inter], dim=1)


class TeacherFeatures:
    """uint8 images ``[B, 3, H, W]`` -> float32 ``[B, n, D]`` on CPU: the final-norm [CLS] token
    of the last ``n`` blocks (``n`` capped at the depth); ``[:, -1]`` equals ``backbone(x)``.
    ``amp_dtype``: run under autocast (the training step's precision, for the online monitor)."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 blocks: int = 1, device: Union[str, torch.device] = "cpu", batch_size: int = 256,
                 amp_dtype: Optional[torch.dtype] = None):
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.blocks = max(1, min(int(blocks), len(backbone.blocks)))
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, images_u8.shape[0], self.batch_size):
            x = normalize(images_u8[i:i + self.batch_size].to(self.device), self.mean, self.std)
            with torch.autocast(self.device.type, self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out.append(cls_tokens(self.backbone, x, self.blocks).float().cpu())
        if not out:
            return torch.empty(0, self.blocks, self.backbone.embed_dim)
        return torch.cat(out)


# ---- eval views and labels -----------------------------------------------------------------

def batch_labels(batch: dict, label_column: Optional[str], classes: Optional[list[str]]) -> np.ndarray:
    """Integer labels of a batch: a label column, or the class sub-folder of each path."""
    if label_column is not None and label_column in batch:
        return np.asarray(batch[label_column], dtype=np.int64)
    paths = batch.get("path")
    if classes is not None and paths is not None:
        index = {c: i for i, c in enumerate(classes)}
        return np.asarray([index[posixpath.basename(posixpath.dirname(str(p)))] for p in paths],
                          dtype=np.int64)
    raise ValueError("a labeled source is needed: no label column and no class sub-folders")


def decode_views(images: Sequence[bytes], size: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode + eval transform. Returns uint8 views of the good rows, a mask of good rows, and
    the failure reasons of the bad ones."""
    imgs, ok, errors = [], np.zeros(len(images), dtype=bool), []
    for i, data in enumerate(images):
        img, why = try_decode(bytes(data))
        if img is None:
            errors.append(why or "undecodable")
            continue
        imgs.append(img)
        ok[i] = True
    views = eval_transform(imgs, size) if imgs else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return views, ok, errors


class EvalViewsFn:
    """``map_batches`` stage 1 (CPU tasks): ``{image, label | path}`` -> ``{view, label, ok}``.

    Every input row gives one output row; an undecodable image gets a black view and
    ``ok = False`` (counted and dropped by the driver), so a bad row never fails the job.
    """

    def __init__(self, size: int, image_column: str = "image", label_column: Optional[str] = "label",
                 classes: Optional[list[str]] = None, with_ids: bool = False,
                 require_labels: bool = True):
        self.size = size
        self.image_column = image_column
        self.label_column = label_column
        self.classes = classes
        self.with_ids = with_ids  # add "id": the path (folders) or sources.row_id of the bytes
        self.require_labels = require_labels  # False: label -1 where a source has none

    def __call__(self, batch: dict) -> dict:
        images = batch[self.image_column]
        views, ok, _ = decode_views(images, self.size)
        full = np.zeros((len(images), 3, self.size, self.size), dtype=np.uint8)
        full[ok] = views.numpy()
        if self.require_labels or (self.label_column and self.label_column in batch) or (
                self.classes is not None and "path" in batch):
            labels = batch_labels(batch, self.label_column, self.classes)
        else:
            labels = np.full(len(images), -1, dtype=np.int64)
        out = {"view": full, "label": labels, "ok": ok}
        if self.with_ids:
            paths = batch.get("path")
            out["id"] = np.asarray([str(p) for p in paths] if paths is not None
                                   else [row_id(bytes(b)) for b in images], dtype=object)
        return out


def actor_backbone(weights: Union[dict, Callable[[], dict]], model: dict, device: str,
                   threads: Optional[int]) -> nn.Module:
    """The backbone of :attr:`Teacher.model_spec` in a batch-inference actor. ``weights``: the
    state dict, or a zero-argument callable returning it (the Ray shell passes one that
    fetches it from the object store once per actor)."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("a batch-inference actor was given device='cuda' but has no GPU")
    return build_from_spec(model, weights() if callable(weights) else weights)


class FeatureFn:
    """``map_batches`` stage 2 (an actor pool): ``{view, label, ok[, id]}`` ->
    ``{features, label, ok[, id]}`` (see :func:`actor_backbone` for the first arguments)."""

    def __init__(self, weights: Union[dict, Callable[[], dict]], model: dict,
                 mean: Sequence[float], std: Sequence[float], device: str = "cpu",
                 threads: Optional[int] = None, blocks: int = 1, batch_size: int = 256):
        self.embed = TeacherFeatures(actor_backbone(weights, model, device, threads), mean, std,
                                     blocks, device, batch_size)

    def __call__(self, batch: dict) -> dict:
        # a batch from the object store is read-only: copied then (torch warns on those)
        view = np.require(batch["view"], requirements=["C_CONTIGUOUS", "WRITEABLE"])
        out = {k: np.asarray(batch[k]) for k in ("label", "ok", "id") if k in batch}
        return {"features": self.embed(torch.from_numpy(view)).numpy(), **out}


# ---- feature sets and the in-process path --------------------------------------------------

@dataclass
class FeatureSet:
    features: torch.Tensor  # float32 [N, n_blocks, D]
    labels: torch.Tensor  # int64 [N]
    skipped: int = 0  # undecodable rows dropped

    @property
    def cls(self) -> torch.Tensor:
        """The final [CLS] feature ``[N, D]`` (k-NN, few-shot)."""
        return self.features[:, -1]

    def concat(self, blocks: int) -> torch.Tensor:
        """The [CLS] of the last ``blocks`` blocks concatenated ``[N, blocks * D]`` (linear probe)."""
        b = max(1, min(blocks, self.features.shape[1]))
        return self.features[:, -b:].reshape(self.features.shape[0], -1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def iter_eval_batches(src: Source, size: int, limit: Optional[int] = None, batch_rows: int = 256,
                      order: Optional[np.ndarray] = None
                      ) -> Iterator[tuple[torch.Tensor, np.ndarray, int]]:
    """In-process: ``(uint8 views, labels, skipped)`` per batch of a labeled source (``order``:
    these rows, in this order; see :func:`massl_ray.data.sources.iter_rows`)."""
    for rows in iter_rows(src, limit=limit, order=order, batch_rows=batch_rows):
        labels = rows["label"]
        if labels is None:
            raise ValueError(f"{src.uri!r} has no labels (a label column or class sub-folders)")
        views, ok, errors = decode_views(rows["image"], size)
        yield views, np.asarray(labels)[ok], len(errors)


def labeled_views(src: Source, size: int, limit: Optional[int] = None, batch_rows: int = 256,
                  order: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All uint8 eval views and labels of a labeled source's decodable rows, in memory (for
    fine-tuning and the online monitor)."""
    views, labels = [], []
    for v, lab, _ in iter_eval_batches(src, size, limit, batch_rows, order):
        if v.shape[0]:
            views.append(v)
            labels.append(torch.as_tensor(lab, dtype=torch.int64))
    if not views:
        raise ValueError(f"no decodable labeled images in {src.uri!r}")
    return torch.cat(views), torch.cat(labels)


def extract_in_process(embed: Callable[[torch.Tensor], torch.Tensor], src: Source, size: int,
                       limit: Optional[int] = None, batch_rows: int = 256) -> FeatureSet:
    """Features of a labeled source in this process (``embed``: uint8 views -> features)."""
    feats, labels, skipped = [], [], 0
    for views, lab, bad in iter_eval_batches(src, size, limit, batch_rows):
        skipped += bad
        if views.shape[0]:
            f = embed(views)
            feats.append(f if f.dim() == 3 else f[:, None])
            labels.append(torch.as_tensor(lab, dtype=torch.int64))
    if not feats:
        raise ValueError(f"no decodable labeled images in {src.uri!r}")
    return FeatureSet(torch.cat(feats), torch.cat(labels), skipped)


# ---- on-disk cache -------------------------------------------------------------------------

def source_fingerprint(src: Source, limit: Optional[int]) -> dict:
    """What identifies a source's rows: URI, kind, row count, columns, and the files' sizes
    (Parquet) or the list of image paths (folders)."""
    fp: dict[str, Any] = {"uri": src.uri if is_uri(src.uri) else os.path.abspath(src.uri),
                          "kind": src.kind, "num_rows": src.num_rows, "limit": limit,
                          "image_column": src.image_column, "label_column": src.label_column,
                          "classes": src.classes}
    if src.kind == "parquet":
        fp["bytes"] = [i.size for i in src.filesystem.get_file_info(src.files)]
    else:
        fp["paths_sha1"] = hashlib.sha1("\n".join(src.files).encode()).hexdigest()
    return fp


def cache_key(checkpoint_sha256: str, src: Source, limit: Optional[int], size: int,
              blocks: int) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "checkpoint": checkpoint_sha256,
                       "source": source_fingerprint(src, limit), "size": size, "blocks": blocks},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class FeatureCache:
    """``<dir>/<split>-<key>.npz`` (features, labels, skipped) + ``.json`` (what the key means)."""

    def __init__(self, directory: Union[str, os.PathLike]):
        self.dir = Path(directory)

    def path(self, split: str, key: str) -> Path:
        return self.dir / f"{split}-{key}.npz"

    def load(self, split: str, key: str) -> Optional[FeatureSet]:
        p = self.path(split, key)
        if not p.is_file():
            return None
        try:
            with np.load(p) as z:
                return FeatureSet(torch.from_numpy(z["features"].copy()),
                                  torch.from_numpy(z["labels"].copy()), int(z["skipped"]))
        except (OSError, ValueError, KeyError):
            return None  # a broken cache file is recomputed (and overwritten)

    def save(self, split: str, key: str, fs: FeatureSet, info: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(split, key)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, features=fs.features.numpy(), labels=fs.labels.numpy(),
                         skipped=np.int64(fs.skipped))
            os.chmod(tmp, 0o644)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        p.with_suffix(".json").write_text(json.dumps(info, indent=1, default=str))
        return p
