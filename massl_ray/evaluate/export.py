"""Export a checkpoint's teacher backbone as safetensors that timm loads unchanged. Ray-free.

``python -m massl_ray export --checkpoint <dir> --out teacher.safetensors`` writes the teacher
backbone's state dict (timm's own key names, no head) and ``teacher.json`` next to it with the
timm model name and keyword arguments that build the matching model::

    meta = json.load(open("teacher.json"))
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("teacher.safetensors"))

The name and kwargs come from :func:`massl_ray.method.model.backbone_kwargs`, the function training
builds the backbone with (drop-path 0, as the teacher). The same pair is stored in the
safetensors header metadata.

A sidecar or header is data from whoever wrote the file, and ``timm.create_model`` does more
than build a model with some of its arguments (``pretrained=True`` downloads and loads weights,
``checkpoint_path`` / ``pretrained_cfg_overlay`` name files to load, an ``hf-hub:`` or
``local-dir:`` name fetches a config and weights). So :func:`check_timm_spec` admits a plain timm
model name and only the keyword arguments ``backbone_kwargs`` writes (:data:`TIMM_KWARGS`, each
with its type; ``pretrained`` only as ``false``) and refuses anything else before timm is
called, naming the key. :func:`load_exported` and the evaluation jobs' loader
(``features.load_exported_teacher``) go through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch.nn as nn

from massl_ray.config import ConfigError
from massl_ray.evaluate.features import (GLOBAL_POOLS, TIMM_KWARGS, TIMM_NAME,  # noqa: F401
                                         check_timm_spec, exported_spec, is_exported,
                                         load_teacher)
from massl_ray.method.model import backbone_kwargs

EXPORT_FORMAT = "massl_ray/teacher-backbone/1"

def sidecar_path(out: Union[str, os.PathLike]) -> Path:
    return Path(out).with_suffix(".json")


def export_teacher(checkpoint: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> dict:
    """Write ``out`` (.safetensors) and its ``.json`` sidecar; returns the sidecar's content."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r} must end in .safetensors")
    if is_exported(checkpoint):
        raise ConfigError(f"--checkpoint {str(checkpoint)!r} is already an exported backbone")
    teacher = load_teacher(checkpoint)
    name, kwargs = backbone_kwargs(teacher.cfg.model, teacher.cfg.crops.global_size, 0.0)
    # Check before writing: the state dict must load into a fresh timm model of that name.
    import timm

    probe = timm.create_model(name, **kwargs)
    probe.load_state_dict(teacher.weights, strict=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in teacher.weights.items()}
    meta = {
        "format": EXPORT_FORMAT,
        "timm_name": name,
        "timm_kwargs": kwargs,
        "embed_dim": int(teacher.backbone.embed_dim),
        "source_checkpoint": str(teacher.checkpoint),
        "checkpoint_sha256": teacher.sha256,
        "global_step": teacher.global_step,
        "image_size": teacher.cfg.crops.global_size,
        "mean": list(teacher.cfg.crops.mean),
        "std": list(teacher.cfg.crops.std),
        "arch": teacher.cfg.model.arch,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT, "timm_name": name,
                                            "timm_kwargs": json.dumps(kwargs)})
    os.replace(tmp, out)
    sidecar_path(out).write_text(json.dumps(meta, indent=1))
    return meta


def load_exported(path: Union[str, os.PathLike]) -> nn.Module:
    """Build the timm model named in the sidecar (or the header) and load the weights."""
    import timm
    from safetensors.torch import load_file

    name, kwargs, _ = exported_spec(Path(path))  # checked before timm sees them
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
