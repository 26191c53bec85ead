"""Submit a jobs/ config to a Ray cluster with ``ray job submit``.

    python jobs/submit.py JOB [section.key=value ...] [--address URL] [--dry-run] [--no-wait]

JOB is a config name (``imagenet_vit_s16_800ep``) or path (``jobs/cifar10_gpu.yaml``). The script
validates the config and the overrides here, before anything is uploaded; refuses placeholders
(``YOUR-BUCKET``) and paths the cluster could not read; then runs (``--dry-run``: prints)

    ray job submit --address URL --working-dir . --submission-id ID \\
        --runtime-env-json '{"excludes": [...], "env_vars": {...}}' \\
        -- python -m massl_ray train --config jobs/JOB.yaml [overrides]

from the repository root. The working directory is the code the job runs: everything except
version control, environments, data and run outputs (EXCLUDES), a few MB. The job server
address comes from --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else
http://127.0.0.1:8265 (a local head, or a cluster behind ``ray dashboard cluster.yaml``).
Credentials are never put into the runtime environment: the nodes use their IAM instance
profile (docs/cluster.md). The exit code is the job's (0 = SUCCEEDED) unless --no-wait; 2 = refused
here (invalid config, placeholder, unusable path), in which case nothing was submitted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from massl_ray.config import Config, ConfigError, load_config  # noqa: E402

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Kept out of the upload (gitignore syntax, relative to the repository root): version control,
# environments, caches, data and run outputs. Ray's package limit is a few hundred MB; the code
# is well under 1 MB. jobs/data (the quick-start subset, 6 MB) goes only with jobs that use it.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".hypothesis",
    "*.egg-info",
    "/runs",
    "/data",
    "/tmp",
    "/benchmarks/results",
]
BUNDLED_DATA = "jobs/data"

# Set in every job's environment.
BASE_ENV = {"PYTHONUNBUFFERED": "1"}

# Never forwarded through the runtime environment (it is visible in the dashboard and job
# metadata): credentials come from the nodes' instance profile or their own environment.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY",
                         re.IGNORECASE)
# Ray sets these for the job itself; a value from this machine would point the job elsewhere.
RESERVED_ENV = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}

PLACEHOLDER = "YOUR-BUCKET"
PATH_KEYS = ("data.train", "data.eval_train", "data.eval_test", "model.init_from")


class SubmitError(ValueError):
    """A job that must not be submitted as it stands; the message says what to change."""


# ---- what travels with the job --------------------------------------------------------------

def is_excluded(rel: str, excludes: list[str]) -> bool:
    """Whether a repository-relative path is left out of the upload.

    Handles the three pattern forms used in EXCLUDES with gitignore meaning: ``name`` (any path
    component), ``/dir`` (anchored at the root, with everything below) and ``*.ext`` globs.
    """
    parts = Path(rel).as_posix().strip("/").split("/")
    for pat in excludes:
        if pat.startswith("/"):
            anchored = pat.strip("/").split("/")
            if parts[: len(anchored)] == anchored:
                return True
        elif any(fnmatch.fnmatch(p, pat) for p in parts):
            return True
    return False


def excludes_for(cfg: Optional[Config]) -> list[str]:
    """EXCLUDES, plus the bundled quick-start data unless the config reads it."""
    ex = list(EXCLUDES)
    used = [] if cfg is None else [_get(cfg, k) for k in PATH_KEYS]
    if not any(isinstance(p, str) and _rel_to_root(p, BUNDLED_DATA) for p in used):
        ex.append("/" + BUNDLED_DATA)
    return ex


def _rel_to_root(path: str, prefix: str) -> bool:
    if "://" in path or os.path.isabs(path):
        return False
    return Path(os.path.normpath(path)).as_posix().startswith(prefix + "/")


def upload_size(excludes: list[str]) -> tuple[int, int]:
    """(files, bytes) that ``--working-dir .`` would upload with these excludes."""
    n = size = 0
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if not is_excluded(os.path.join(rel_dir, d), excludes)]
        for f in filenames:
            rel = os.path.join(rel_dir, f)
            if not is_excluded(rel, excludes):
                n += 1
                size += os.path.getsize(os.path.join(dirpath, f))
    return n, size


# ---- checks on the resolved config ------------------------------------------------------------

def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def check_paths(cfg: Config, excludes: list[str], same_machine: bool,
                outputs: Optional[dict[str, str]] = None) -> tuple[list[str], list[str]]:
    """(overrides that make local paths usable by the job, problems that block the job).

    A job runs in a copy of the working directory (on every node), so a relative path works
    only if it is uploaded. Excluded or missing relative paths, and a relative run output
    folder, are problems, or are made absolute with ``same_machine`` (the head runs here).
    ``outputs``: output folders by key (default: run.storage_path).
    """
    if outputs is None:
        outputs = {"run.storage_path": cfg.run.storage_path}
    fixes: list[str] = []
    errors: list[str] = []
    for key in PATH_KEYS:
        p = _get(cfg, key)
        if not isinstance(p, str) or "://" in p or os.path.isabs(p):
            continue
        local = (ROOT / p).resolve()
        norm = os.path.normpath(p)
        inside = not (norm == ".." or norm.startswith(".." + os.sep))
        if local.exists() and inside and not is_excluded(norm, excludes):
            continue  # uploaded with the code: the same relative path works on every node
        if same_machine and local.exists():
            fixes.append(f"{key}={local}")
        elif same_machine:
            errors.append(f"{key}={p}: {local} does not exist")
        else:
            errors.append(
                f"{key}={p} is not uploaded with the job "
                f"({'not in the upload' if local.exists() else 'missing here'}): use an s3:// / gs:// URI or a path every node can read, or --same-machine "
                f"if the Ray head runs on this machine")
    for key, sp in outputs.items():
        if "://" in sp or os.path.isabs(sp):
            continue
        if same_machine:
            fixes.append(f"{key}={ROOT / sp}")
        else:
            where = ("a path on a filesystem every node mounts" if key.startswith(SWEEP_SECTION)
                     else "s3://YOUR-BUCKET/massl-runs or a path on a filesystem every node mounts")
            errors.append(
                f"{key}={sp} would put the outputs inside the job's temporary copy of the code: "
                f"set it to {where}, or pass --same-machine if the Ray head runs on this machine")
    return fixes, errors


def placeholders(cfg: Config) -> list[str]:
    out = []
    for section, values in cfg.to_dict().items():
        for key, v in values.items():
            if isinstance(v, str) and PLACEHOLDER in v:
                out.append(f"{section}.{key}={v}")
    return out


def parse_env(items: list[str]) -> dict[str, str]:
    env = dict(BASE_ENV)
    for item in items:
        if "=" not in item:
            raise SubmitError(f"--env {item!r} must look like NAME=VALUE")
        name, value = item.split("=", 1)
        if SECRET_NAME.search(name):
            raise SubmitError(
                f"--env {name}: credentials are not passed through the job's runtime environment "
                f"(it is shown in the dashboard); give the nodes an IAM instance profile or set it "
                f"in the nodes' environment (docs/cluster.md)")
        if name in RESERVED_ENV:
            raise SubmitError(f"--env {name}: set by Ray for the job; do not override it")
        env[name] = value
    return env


# ---- the command ------------------------------------------------------------------------------

def resolve_job(job: str) -> Path:
    cands = [Path(job), ROOT / job, ROOT / "jobs" / job, ROOT / "jobs" / f"{job}.yaml"]
    for c in cands:
        if c.is_file():
            p = c.resolve()
            try:
                p.relative_to(ROOT)
            except ValueError:
                raise SubmitError(f"{job}: the config must be inside the repository ({ROOT}), "
                                  f"which is what gets uploaded") from None
            return p
    names = sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml"))
    raise SubmitError(f"no job config {job!r}; known: {', '.join(names)}")


SWEEP_SECTION = "sweep"


def subcommand_of(path: Path) -> str:
    """``tune`` for a sweep config (a training config plus a ``sweep:`` section), else ``train``."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return "tune" if isinstance(data, dict) and SWEEP_SECTION in data else "train"


def load_for_submit(path: Path, sub: str, overrides: list[str]) -> tuple[Config, dict[str, str]]:
    """The resolved config (validated for ``train``) and its output folders by override key.

    For a sweep the training part is merged without validation (the sweep fills in values and
    validates every trial itself); its outputs go to ``sweep.storage_path``.
    """
    import yaml

    from massl_ray.config import apply_overrides, merge_dict

    if sub == "train":
        cfg = load_config(path, overrides)
        return cfg, {"run.storage_path": cfg.run.storage_path}
    data = yaml.safe_load(path.read_text()) or {}
    sweep = dict(data.pop(SWEEP_SECTION) or {})
    prefix = SWEEP_SECTION + "."
    for item in overrides:
        if item.startswith(prefix) and "=" in item:
            key, value = item[len(prefix):].split("=", 1)
            sweep[key] = yaml.safe_load(value)
    cfg = apply_overrides(merge_dict(Config(), data),
                          [o for o in overrides if not o.startswith(prefix)])
    return cfg, {"sweep.storage_path": str(sweep.get("storage_path", "runs/sweeps"))}


def default_address() -> str:
    return (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.is_file() else (shutil.which("ray") or "ray")


def build(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The ``ray job submit`` argv (run from the repository root) and a summary for the user."""
    path = resolve_job(args.job)
    rel = path.relative_to(ROOT).as_posix()
    sub = subcommand_of(path)
    overrides = list(args.overrides)
    try:
        cfg, outputs = load_for_submit(path, sub, overrides)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    excludes = excludes_for(cfg)
    info: dict = {"config": rel, "command": sub, "problems": []}
    ph = placeholders(cfg) + [f"{k}={v}" for k, v in outputs.items()
                              if PLACEHOLDER in v and k != "run.storage_path"]
    if ph:
        info["problems"].append(
            "replace the placeholders (on the command line or in the config): " + ", ".join(ph))
    fixes, problems = check_paths(cfg, excludes, args.same_machine, outputs)
    overrides += fixes
    info["problems"] += problems
    runtime_env = {"excludes": excludes, "env_vars": parse_env(args.env)}
    name = cfg.run.name if sub == "train" else path.stem
    sid = args.submission_id or f"massl-{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    cmd = [ray_executable(), "job", "submit", "--address", args.address, "--working-dir", ".",
           "--submission-id", sid, "--runtime-env-json", json.dumps(runtime_env)]
    if args.no_wait:
        cmd.append("--no-wait")
    if args.entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(args.entrypoint_num_cpus)]
    cmd += ["--", "python", "-m", "massl_ray", sub, "--config", rel, *overrides]
    info["submission_id"] = sid
    if info["problems"] and not args.dry_run:
        raise SubmitError("cannot submit:\n  - " + "\n  - ".join(info["problems"]))
    return cmd, info


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python jobs/submit.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="config name in jobs/ (imagenet_vit_s16_800ep) or a path")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for the job")
    p.add_argument("--address", default=default_address(),
                   help=f"job server (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--dry-run", action="store_true", help="print the command, submit nothing")
    p.add_argument("--no-wait", action="store_true", help="return after submitting (no log stream)")
    p.add_argument("--submission-id", help="job id (default: massl-<run name>-<time>)")
    p.add_argument("--same-machine", action="store_true",
                   help="the Ray head runs on this machine: make local relative paths "
                        "(data, run.storage_path) absolute instead of refusing them")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable for the job (not for credentials)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs reserved for the driver process (default: none)")
    args = p.parse_intermixed_args(argv)
    try:
        cmd, info = build(args)
    except SubmitError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    shown = shlex.join(["ray", *cmd[1:]])
    if args.dry_run:
        files, size = upload_size(json.loads(cmd[cmd.index("--runtime-env-json") + 1])["excludes"])
        for problem in info["problems"]:
            print(f"# to fix before submitting: {problem}")
        print(f"# working dir upload: {files} files, {size / 2**20:.1f} MiB")
        print(f"# (cd {shlex.quote(str(ROOT))} &&)")
        print(shown)
        return 0
    host = urlparse(args.address if "://" in args.address else "http://" + args.address).hostname
    if host not in ("127.0.0.1", "localhost", "::1") and not args.address.startswith("https"):
        print(f"submit: note: {args.address} is not a local or TLS address; the job server "
              f"should be reached through `ray dashboard cluster.yaml` (an SSH tunnel)",
              file=sys.stderr)
    print(f"submit: {info['config']} as {info['submission_id']} -> {args.address}", file=sys.stderr)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
