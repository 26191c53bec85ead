"""The end-of-run k-NN check and the online k-NN monitor, on the evaluations' own teacher
feature extractor (:class:`features.TeacherFeatures`). Ray-free."""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch

from massl_ray.config import Config
from massl_ray.data.sources import Source, open_source
from massl_ray.evaluate.features import (TeacherFeatures, build_teacher_backbone,
                                         extract_in_process, labeled_views, teacher_backbone_state)
from massl_ray.evaluate.knn import knn_accuracy
from massl_ray.method.checkpoint import load_checkpoint
from massl_ray.method.learner import AMP_DTYPES, Learner
from massl_ray.method.model import build_student_teacher

log = logging.getLogger("massl_ray")


def eval_sources(cfg: Config) -> tuple[Source, Source]:
    """The run's labeled held-out sources (``data.eval_train``, ``data.eval_test``)."""
    d = cfg.data
    return tuple(open_source(uri, "auto", d.image_column, d.label_column, require_labels=True,
                             what=what)
                 for uri, what in ((d.eval_train, "data.eval_train"),
                                   (d.eval_test, "data.eval_test")))


def knn_vs_random_init(cfg: Config, checkpoint_dir: str) -> dict:
    """k-NN top-1 of the trained teacher next to the same backbone at random initialisation
    (the run's own initial weights: seeded as :class:`Learner` builds them)."""
    t0 = time.perf_counter()
    tr, te = eval_sources(cfg)
    k, size = cfg.run.knn_k, cfg.crops.global_size
    device = "cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.run.seed)
    initial = build_student_teacher(cfg)[1].backbone
    state = load_checkpoint(checkpoint_dir)
    trained = build_teacher_backbone(cfg, teacher_backbone_state(state))

    def top1(backbone: torch.nn.Module) -> float:
        embed = TeacherFeatures(backbone, cfg.crops.mean, cfg.crops.std, 1, device,
                                amp_dtype=AMP_DTYPES[cfg.optim.precision])
        ftr, fte = extract_in_process(embed, tr, size), extract_in_process(embed, te, size)
        return knn_accuracy(ftr.cls, ftr.labels, fte.cls, fte.labels, ks=(k,))[f"knn_top1_k{k}"]

    out = {"k": k, "trained_top1": top1(trained), "random_init_top1": top1(initial),
           "train_rows": tr.num_rows, "test_rows": te.num_rows,
           "step": int(state["global_step"]), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("k-NN top-1 (k=%d, %d bank / %d query images): trained %.2f%% | random init %.2f%%",
             k, tr.num_rows, te.num_rows, out["trained_top1"], out["random_init_top1"])
    return out


# ---- online k-NN monitor -------------------------------------------------------------------

def held_out_views(src: Source, rows: int, size: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 eval views and labels of ``rows`` rows of a labeled source, a seeded random subset
    (sources sorted by class get every class). Undecodable rows are dropped."""
    idx = np.random.default_rng(seed).permutation(src.num_rows)[:min(rows, src.num_rows)]
    return labeled_views(src, size, order=np.sort(idx))


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
        r = cfg.run
        every = r.online_knn_every_steps
        if every <= 0:
            return None
        tr, te = eval_sources(cfg)
        return cls.from_sources(tr, te, cfg.crops.global_size, every,
                                r.online_knn_train_rows, r.online_knn_test_rows, r.knn_k, r.seed)

    @torch.no_grad()
    def measure(self, learner: Learner) -> dict:
        t0 = time.perf_counter()
        embed = TeacherFeatures(learner.teacher.backbone, learner.mean, learner.std, 1,
                                learner.device, amp_dtype=learner.amp_dtype)
        res = knn_accuracy(embed(self.bank_views)[:, -1], self.bank_labels,
                           embed(self.query_views)[:, -1], self.query_labels, ks=(self.k,),
                           temperature=self.temperature, num_classes=self.num_classes)
        self._last_step = learner.global_step
        self.last = {"online_knn_top1": res[f"knn_top1_k{self.k}"],
                     "online_knn_step": learner.global_step,
                     "online_knn_s": time.perf_counter() - t0}
        return self.last

    def __call__(self, learner: Learner) -> dict:
        if self._last_step is None or learner.global_step - self._last_step >= self.every:
            self.measure(learner)
        return dict(self.last)
