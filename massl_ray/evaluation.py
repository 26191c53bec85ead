"""In-process feature extraction and the end-of-run k-NN check. Ray-free."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .checkpoint import load_checkpoint
from .config import Config
from .images import try_decode
from .knn import knn_accuracy
from .learner import Learner
from .multicrop import eval_transform
from .sources import Source, iter_rows, open_source

log = logging.getLogger("massl_ray")


@torch.no_grad()
def extract_features(learner: Learner, src: Source, size: int, limit: Optional[int] = None,
                     batch_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Teacher [CLS] features and labels of a labeled source; returns (feats, labels, skipped)."""
    feats, labels, skipped = [], [], 0
    for rows in iter_rows(src, limit=limit, batch_rows=batch_rows):
        imgs, keep = [], []
        for i, data in enumerate(rows["image"]):
            img, _ = try_decode(bytes(data))
            if img is None:
                skipped += 1
                continue
            imgs.append(img)
            keep.append(i)
        if not imgs:
            continue
        x = eval_transform(imgs, size)
        feats.append(learner.features(x).cpu())
        labels.append(torch.as_tensor(rows["label"][keep]))
    if not feats:
        raise ValueError(f"no decodable labeled images in {src.uri!r}")
    return torch.cat(feats), torch.cat(labels), skipped


def knn_of(learner: Learner, cfg: Config, train_src: Source, test_src: Source, k: int) -> dict:
    size = cfg.crops.global_size
    ftr, ltr, _ = extract_features(learner, train_src, size)
    fte, lte, _ = extract_features(learner, test_src, size)
    return knn_accuracy(ftr, ltr, fte, lte, ks=(k,))


def knn_vs_random_init(cfg: Config, checkpoint_dir: str) -> dict:
    """k-NN top-1 of the trained teacher next to the same backbone at random initialisation."""
    d = cfg.data
    tr = open_source(d.eval_train, "auto", d.image_column, d.label_column, require_labels=True,
                     what="data.eval_train")
    te = open_source(d.eval_test, "auto", d.image_column, d.label_column, require_labels=True,
                     what="data.eval_test")
    k = cfg.run.knn_k
    device = "cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu"
    random_init = Learner(cfg, device)  # same seed -> the run's own initial weights
    trained = Learner(cfg, device)
    trained.load_state_dict(load_checkpoint(checkpoint_dir))
    res_rand = knn_of(random_init, cfg, tr, te, k)
    res_trained = knn_of(trained, cfg, tr, te, k)
    key = f"knn_top1_k{k}"
    out = {"k": k, "trained_top1": res_trained[key], "random_init_top1": res_rand[key],
           "train_rows": tr.num_rows, "test_rows": te.num_rows, "step": trained.global_step}
    log.info("k-NN top-1 (k=%d, %d bank / %d query images): trained %.2f%% | random init %.2f%%",
             k, tr.num_rows, te.num_rows, out["trained_top1"], out["random_init_top1"])
    return out
