"""Command line: ``python -m massl_ray train --config jobs/<name>.yaml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from .config import ConfigError, load_config

log = logging.getLogger("massl_ray")


def _train(args: argparse.Namespace) -> int:
    from .trainer import setup_logging, train

    setup_logging(0)
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"run.num_workers={args.num_workers}")
    if args.local:
        overrides.append("run.num_workers=0")
    cfg = load_config(args.config, overrides)
    result = train(cfg, local=args.local)
    m = result.get("metrics", {})
    print(f"done: {result['mode']} run {cfg.run.name!r}, step {m.get('step')}, "
          f"loss {m.get('loss', float('nan')):.4f}, {result['wall_s']:.0f}s, "
          f"skipped images {result['skipped_images']}, checkpoint {result['checkpoint']}")
    if "knn" in result:
        k = result["knn"]
        print(f"k-NN top-1 (k={k['k']}): trained {k['trained_top1']:.2f}% vs random-init "
              f"backbone {k['random_init_top1']:.2f}%")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m massl_ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train MaSSL (Ray Train, or --local in this process)")
    t.add_argument("--config", help="YAML config (jobs/*.yaml); defaults otherwise")
    t.add_argument("--local", action="store_true",
                   help="run in this process without Ray (debuggable); implies one worker")
    t.add_argument("--num-workers", type=int, default=None, help="shortcut for run.num_workers")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.set_defaults(fn=_train)
    c = sub.add_parser("config", help="print the resolved, validated config")
    c.add_argument("--config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=_show_config)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        from .sources import DataSourceError

        if isinstance(e, DataSourceError):
            print(f"data error: {e}", file=sys.stderr)
            return 2
        raise
