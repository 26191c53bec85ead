"""In-process feature extraction, the end-of-run k-NN check and the online k-NN monitor.
Ray-free."""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch

from massl_ray.method.checkpoint import load_checkpoint
from massl_ray.config import Config
from massl_ray.evaluate.features import decode_views, extract_in_process
from massl_ray.evaluate.knn import knn_accuracy
from massl_ray.method.learner import Learner
from massl_ray.data.sources import Source, iter_rows, open_source

log = logging.getLogger("massl_ray")


@torch.no_grad()
def extract_features(learner: Learner, src: Source, size: int, limit: Optional[int] = None,
                     batch_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Teacher [CLS] features and labels of a labeled source; returns (feats, labels, skipped)."""
    fs = extract_in_process(learner.features, src, size, limit, batch_rows)
    return fs.cls, fs.labels, fs.skipped


def knn_of(learner: Learner, cfg: Config, train_src: Source, test_src: Source, k: int) -> dict:
    size = cfg.crops.global_size
    ftr, ltr, _ = extract_features(learner, train_src, size)
    fte, lte, _ = extract_features(learner, test_src, size)
    return knn_accuracy(ftr, ltr, fte, lte, ks=(k,))


def knn_vs_random_init(cfg: Config, checkpoint_dir: str) -> dict:
    """k-NN top-1 of the trained teacher next to the same backbone at random initialisation."""
    t0 = time.perf_counter()
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
           "train_rows": tr.num_rows, "test_rows": te.num_rows, "step": trained.global_step,
           "seconds": round(time.perf_counter() - t0, 2)}
    log.info("k-NN top-1 (k=%d, %d bank / %d query images): trained %.2f%% | random init %.2f%%",
             k, tr.num_rows, te.num_rows, out["trained_top1"], out["random_init_top1"])
    return out


# ---- online k-NN monitor -------------------------------------------------------------------

def held_out_views(src: Source, rows: int, size: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 eval views and labels of ``rows`` rows of a labeled source, a seeded random subset
    (sources sorted by class get every class). Undecodable rows are dropped."""
    n = min(rows, src.num_rows)
    idx = np.sort(np.random.default_rng(seed).permutation(src.num_rows)[:n])
    views, labels = [], []
    for batch in iter_rows(src, order=idx, batch_rows=256):
        if batch["label"] is None:
            raise ValueError(f"{src.uri!r} has no labels")
        v, ok, _ = decode_views(batch["image"], size)
        views.append(v)
        labels.append(torch.as_tensor(np.asarray(batch["label"])[ok], dtype=torch.int64))
    return torch.cat(views), torch.cat(labels)


class OnlineKnn:
    """A small k-NN during training: teacher [CLS] features of a held-out labeled bank and query
    set (decoded once, kept as uint8 views), top-1 at k, recomputed at most every ``every`` steps.

    Calling it returns the latest value every time (``online_knn_top1`` and the step it was
    measured at), so every reported metrics dict carries it (Tune's schedulers need the metric in
    each result); it recomputes when ``every`` steps have passed since the last measurement.
    """

    def __init__(self, bank: tuple[torch.Tensor, torch.Tensor],
                 queries: tuple[torch.Tensor, torch.Tensor], every: int, k: int = 20,
                 temperature: float = 0.07):
        if every <= 0:
            raise ValueError(f"online k-NN: every ({every}) must be positive")
        self.bank_views, self.bank_labels = bank
        self.query_views, self.query_labels = queries
        self.every, self.k, self.temperature = every, k, temperature
        self.num_classes = int(max(self.bank_labels.max(), self.query_labels.max())) + 1
        self.last: dict = {}
        self._last_step: Optional[int] = None

    @classmethod
    def from_sources(cls, train_src: Source, test_src: Source, size: int, every: int,
                     train_rows: int = 1000, test_rows: int = 500, k: int = 20,
                     seed: int = 0) -> "OnlineKnn":
        t0 = time.perf_counter()
        mon = cls(held_out_views(train_src, train_rows, size, seed),
                  held_out_views(test_src, test_rows, size, seed + 1), every, k)
        log.info("online k-NN: %d bank / %d query images (k=%d, every %d steps), decoded in %.1fs",
                 len(mon.bank_labels), len(mon.query_labels), k, every, time.perf_counter() - t0)
        return mon

    @classmethod
    def from_config(cls, cfg: Config) -> Optional["OnlineKnn"]:
        """None unless ``run.online_knn_every_steps`` > 0 (needs data.eval_train / eval_test)."""
        r, d = cfg.run, cfg.data
        every = r.online_knn_every_steps
        if every <= 0:
            return None
        tr = open_source(d.eval_train, "auto", d.image_column, d.label_column, require_labels=True,
                         what="data.eval_train")
        te = open_source(d.eval_test, "auto", d.image_column, d.label_column, require_labels=True,
                         what="data.eval_test")
        return cls.from_sources(tr, te, cfg.crops.global_size, every,
                                r.online_knn_train_rows, r.online_knn_test_rows, r.knn_k, r.seed)

    def due(self, step: int) -> bool:
        return self._last_step is None or step - self._last_step >= self.every

    @torch.no_grad()
    def measure(self, learner: Learner) -> dict:
        t0 = time.perf_counter()
        bank = learner.features(self.bank_views)
        queries = learner.features(self.query_views)
        res = knn_accuracy(bank, self.bank_labels, queries, self.query_labels, ks=(self.k,),
                           temperature=self.temperature, num_classes=self.num_classes)
        self._last_step = learner.global_step
        self.last = {"online_knn_top1": res[f"knn_top1_k{self.k}"],
                     "online_knn_step": learner.global_step,
                     "online_knn_s": time.perf_counter() - t0}
        return self.last

    def __call__(self, learner: Learner) -> dict:
        if self.due(learner.global_step):
            self.measure(learner)
        return dict(self.last)


def online_knn(learner: Learner, cfg: Config, cache: dict) -> dict:
    """The monitor as one function: ``cache`` (a dict the caller keeps) holds the decoded
    held-out views between calls. Returns {} when ``run.online_knn_every_steps`` is off."""
    if "monitor" not in cache:
        cache["monitor"] = OnlineKnn.from_config(cfg)
    mon = cache["monitor"]
    return mon(learner) if mon is not None else {}
