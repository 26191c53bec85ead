"""Build the quick-start dataset shipped in jobs/data/cifar10-quick/ (run once; output committed).

Origin: CIFAR-10 (Krizhevsky, 2009), the JPEG files of a public mirror packed as Parquet in the
workplace's shared data folder (../shared/data/cifar10/). We take a class-balanced, seeded random
subset and store it shuffled (the source is sorted by class):
  train.parquet: 500 images per class (5,000)  -- self-supervised training + k-NN bank
  test.parquet:  100 images per class (1,000)  -- k-NN queries
Columns: image (JPEG bytes, 32x32 RGB), label (int16, 0-9), class_name, path.
Usage: python jobs/make_quickstart_data.py [--src ../shared/data/cifar10] [--out jobs/data/cifar10-quick]
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq


def subset(table, per_class: int, rng: np.random.Generator):
    labels = table.column("label").to_numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                          for c in np.unique(labels)])
    rng.shuffle(idx)
    return table.take(idx)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--src", default="../shared/data/cifar10")
    p.add_argument("--out", default="jobs/data/cifar10-quick")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", a.train_per_class), ("test", a.test_per_class)):
        t = subset(pq.read_table(Path(a.src) / f"{name}.parquet"), n, rng)
        pq.write_table(t, out / f"{name}.parquet", row_group_size=1000, compression="none")
        print(name, t.num_rows, "rows", (out / f"{name}.parquet").stat().st_size, "bytes",
              "labels", np.bincount(pc.cast(t.column("label"), "int64").to_numpy()).tolist())


if __name__ == "__main__":
    main()
