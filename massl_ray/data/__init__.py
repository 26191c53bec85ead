"""Images in, uint8 multi-crop views out: data sources (Parquet, image folders, object-store
URIs; ``sources``), robust decoding (``images``), the multi-crop augmentation (``multicrop``),
decode + crop of a batch of rows with the skipped-row report (``views``), the exact data order:
its plan (``plan``: windows of row groups, positions -> rows, decode tasks), its work
(``groups``: row groups read once, rows routed to decode tasks, decoded by position; the local
mode's feed) and its Ray shell (``feed``: the coordinator actor and its tasks), ``prepare``
(raw images -> shuffled Parquet shards, on Ray Data) and ``pipeline`` (encoded rows as a Ray
Dataset for the evaluation jobs, the decode report actor, the CPU check).

May import: ``massl_ray.config`` and ``massl_ray.method``. ``feed``, ``pipeline`` and
``prepare`` import ray; the others never do.
"""
