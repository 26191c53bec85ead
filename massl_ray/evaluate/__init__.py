"""Judging a checkpoint's teacher: features of labeled images with their cache (``features``),
k-NN (``knn``), the linear probe and few-shot (``probe``), the online k-NN monitor and the
end-of-run k-NN check used during training (``online``), low-shot splits (``lowshot``),
retrieval mAP and the revisited Oxford/Paris protocol (``retrieval``), fine-tuning transfer
(``finetune``), embeddings as Parquet (``embed``), the timm-loadable export (``export``), Ray
Data batch inference (``inference``), the report (``report``), and the ``eval`` / ``embed`` jobs
(``jobs``).

May import: ``massl_ray.config``, ``massl_ray.method``, ``massl_ray.data``. Only ``inference``
imports ray. Never ``massl_ray.train`` (training uses evaluation, not the other way round).
"""
