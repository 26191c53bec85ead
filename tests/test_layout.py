"""The package layout is the architecture: a Ray-free core under a thin Ray shell.

- The Ray-free modules import, and a CPU training step runs, in a process where ``import ray``
  fails.
- The import graph between the package's rooms has no circle, and no room imports a later one
  (``method <- data <- evaluate <- train <- sweep <- cli``; ``config`` and ``runtime`` below all).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY_OVERRIDES

PKG = Path(__file__).resolve().parents[1] / "massl_ray"

# Modules that must never need ray (the shell modules are data.pipeline, evaluate.jobs,
# train.trainer, runtime, sweep, cli).
RAY_FREE = [
    "massl_ray.config",
    "massl_ray.method.model", "massl_ray.method.memory", "massl_ray.method.loss",
    "massl_ray.method.schedules", "massl_ray.method.learner", "massl_ray.method.checkpoint",
    "massl_ray.method.distributed",
    "massl_ray.data.sources", "massl_ray.data.images", "massl_ray.data.multicrop",
    "massl_ray.data.views", "massl_ray.data.plan", "massl_ray.data.groups",
    "massl_ray.evaluate.features", "massl_ray.evaluate.knn", "massl_ray.evaluate.probe",
    "massl_ray.evaluate.online", "massl_ray.evaluate.export",
    "massl_ray.train.loop", "massl_ray.train.log_sync",
]

# Rooms in import order: a module may import its own room and earlier ones only.
ORDER = ["config", "runtime", "method", "data", "evaluate", "train", "sweep", "cli"]


def test_ray_free_modules_import_and_train_a_step_where_ray_cannot_be_imported():
    code = f"""
import json, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not importable in this process")
sys.meta_path.insert(0, NoRay())
import importlib
for m in {RAY_FREE!r}:
    importlib.import_module(m)
import torch
torch.set_num_threads(1)
from massl_ray.config import Config, apply_overrides
from massl_ray.method.learner import Learner
cfg = apply_overrides(Config(), json.loads({json.dumps(json.dumps(TINY_OVERRIDES))})).validate()
learner = Learner(cfg, "cpu")
g = torch.Generator().manual_seed(0)
b, c = cfg.optim.batch_size_per_worker, cfg.crops
gc = torch.randint(0, 256, (b, 2, 3, c.global_size, c.global_size), generator=g, dtype=torch.uint8)
lc = torch.randint(0, 256, (b, c.num_local_crops, 3, c.local_size, c.local_size), generator=g, dtype=torch.uint8)
m = learner.step(gc, lc).metrics()
assert learner.global_step == 1 and m["loss"] == m["loss"], m
assert not any(k == "ray" or k.startswith("ray.") for k in sys.modules)
print("ok", m["loss"])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                       cwd=PKG.parent)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.startswith("ok ")


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """massl_ray modules imported anywhere in a file (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("massl_ray"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("massl_ray")}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import (use absolute massl_ray.* imports)")
    return out


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_room_imports_a_later_room_and_the_graph_has_no_circle():
    graph = {_module_of(p): _imports(p) for p in PKG.rglob("*.py")}
    order = {r: i for i, r in enumerate(ORDER)}
    bad = []
    for mod, deps in graph.items():
        if mod in ("massl_ray", "massl_ray.__main__"):
            continue
        for d in deps:
            if d == "massl_ray":
                continue
            a, b = _room(mod), _room(d)
            if order[b] > order[a]:
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports against the layout: " + ", ".join(sorted(bad))
    # the loop gets its monitor handed in: it imports no evaluation code
    assert not {d for d in graph["massl_ray.train.loop"] if d.startswith("massl_ray.evaluate")}
    # no circle among modules
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if d not in graph:
                continue
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
