"""Images in, uint8 multi-crop views out: data sources (Parquet, image folders, object-store
URIs; ``sources``), robust decoding (``images``), the multi-crop augmentation (``multicrop``),
decode + crop of a batch of rows with the skipped-row report (``views``), the seeded,
index-keyed data order (``order``) and the Ray Data pipeline that runs all of it on the
cluster's CPUs (``pipeline``).

May import: ``massl_ray.config`` and ``massl_ray.method``. Only ``pipeline`` imports ray.
"""
