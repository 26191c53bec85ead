"""Submit a jobs/ config to a Ray cluster with ``ray job submit``.

    python jobs/submit.py JOB [section.key=value ...] [--address URL] [--dry-run] [--no-wait]
                          [--insecure]

JOB is a config name (``imagenet_vit_s16_800ep``) or path (``jobs/cifar10_gpu.yaml``). The script
validates the config and the overrides here, before anything is uploaded; refuses placeholders
(``YOUR-BUCKET``) and paths the cluster could not read; then runs (``--dry-run``: prints)

    ray job submit --address URL --working-dir . --submission-id ID \\
        --runtime-env-json '{"excludes": [...], "env_vars": {...}}' \\
        -- python -m massl_ray train --config jobs/JOB.yaml [overrides]

from the repository root. The working directory is uploaded through an allow-list, not a
deny-list: the package's ``.py`` files (``massl_ray/``), ``jobs/*.yaml``, the chosen config, and
the bundled files the config reads (``jobs/data/...`` for the quick start); nothing else of the
checkout (no ``.env``, key file, notes, data, runs, ``.git``), whatever it holds. Ray applies
it as ``excludes`` (gitignore patterns, :func:`excludes_for`: everything excluded, the allowed
entries re-included, then the deny patterns of EXCLUDES and SECRET_FILES, which win); ``--dry-run``
lists every file that goes. The job server address comes from --address, else
RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else http://127.0.0.1:8265 (a local head, or a cluster
behind ``ray dashboard cluster.yaml``); a plain ``http://`` address that is not loopback is
refused unless --insecure (the token and the code would cross the network in clear text).
Credentials are never put into the runtime environment: the nodes use their IAM instance
profile (docs/cluster.md); a URI with credentials in it (``s3://KEY:SECRET@bucket/...``) is
refused wherever it appears. The exit code is the job's (0 = SUCCEEDED) unless --no-wait;
2 = refused here (invalid config, placeholder, unusable path, insecure address, credentials), in
which case nothing was submitted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
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

from massl_ray.config import (Config, ConfigError, credentials_refusal,  # noqa: E402
                              load_config, uri_with_credentials)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# What the job may receive of the checkout (relative to the repository root): the package's
# Python files and the job configs; plus, per job, the chosen config and the bundled data it
# reads (under BUNDLED_DATA). The code is well under 1 MB; jobs/data (the quick-start subset,
# 6 MB) goes only with jobs that read it.
PACKAGE = "massl_ray"
JOB_CONFIGS = "jobs/*.yaml"

# Deny patterns applied after the allow-list (they win over it): version control,
# environments, caches, data and run outputs ...
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
# ... and files that hold secrets, wherever they are (even inside an allowed folder).
SECRET_FILES = [
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    "*.p12",
    "*.pfx",
    ".netrc",
    ".aws",
    ".ssh",
    "credentials",
    "auth_token",
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

def _segment_regex(seg: str) -> str:
    """One path segment of a gitwildmatch pattern as a regex (``*``, ``?``, ``[...]``)."""
    out, i, n = "", 0, len(seg)
    escape = False
    while i < n:
        c = seg[i]
        i += 1
        if escape:
            escape = False
            out += re.escape(c)
        elif c == "\\":
            escape = True
        elif c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = i
            if j < n and seg[j] == "!":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j < n:
                j += 1
                expr = "["
                if seg[i] == "!":
                    expr, i = expr + "^", i + 1
                elif seg[i] == "^":
                    expr, i = expr + "\\^", i + 1
                out += expr + seg[i:j].replace("\\", "\\\\")
                i = j
            else:
                out += "\\["
        else:
            out += re.escape(c)
    return out


def _compile(pattern: str) -> Optional[tuple[re.Pattern, bool]]:
    """A gitwildmatch pattern -> (regex, excludes?) as the pathspec that Ray vendors (0.8.1)
    compiles it; None for a blank line or a comment. A ``!`` pattern re-includes."""
    pattern = pattern.strip()
    if not pattern or pattern.startswith("#") or pattern == "/":
        return None
    exclude = not pattern.startswith("!")
    if not exclude:
        pattern = pattern[1:]
    if pattern.startswith("\\"):
        pattern = pattern[1:]
    segs = pattern.split("/")
    if not segs[0]:
        del segs[0]
    elif len(segs) == 1 or (len(segs) == 2 and not segs[1]):
        if segs[0] != "**":
            segs.insert(0, "**")
    if not segs[-1] and len(segs) > 1:
        segs[-1] = "**"
    out, need_slash, end = ["^"], False, len(segs) - 1
    for i, seg in enumerate(segs):
        if seg == "**":
            if i == 0 and i == end:
                out.append(".+")
            elif i == 0:
                out.append("(?:.+/)?")
                need_slash = False
            elif i == end:
                out.append("/.*")
            else:
                out.append("(?:/.+)?")
                need_slash = True
        elif seg == "*":
            out.append(("/" if need_slash else "") + "[^/]+")
            need_slash = True
        else:
            out.append(("/" if need_slash else "") + _segment_regex(seg))
            if i == end and exclude:
                out.append("(?:/.*)?")
            need_slash = True
    out.append("$")
    return re.compile("".join(out)), exclude


def is_excluded(rel: str, excludes: list[str]) -> bool:
    """Whether Ray's matcher excludes this repository-relative path itself (the last matching
    pattern decides; ``!`` re-includes), as ``PathSpec.match_file`` does. Ray also skips
    everything below an excluded folder: :func:`is_uploaded` checks that."""
    path = Path(rel).as_posix()
    path = path[2:] if path.startswith("./") else path.lstrip("/") or "."
    matched = False
    for pat in excludes:
        c = _compile(pat)
        if c is not None and c[0].match(path):
            matched = c[1]
    return matched


def is_uploaded(rel: str, excludes: list[str]) -> bool:
    """Whether ``--working-dir .`` uploads this path: neither it nor a folder above it excluded."""
    parts = Path(os.path.normpath(rel)).as_posix().split("/")
    return not any(is_excluded("/".join(parts[:k]), excludes) for k in range(1, len(parts) + 1))


def _bundled_paths(cfg: Optional[Config], root: Path) -> list[str]:
    """The config's relative data paths under BUNDLED_DATA that exist (normalised)."""
    out = []
    for key in PATH_KEYS:
        p = None if cfg is None else _get(cfg, key)
        if isinstance(p, str) and _rel_to_root(p, BUNDLED_DATA) and (root / p).exists():
            out.append(Path(os.path.normpath(p)).as_posix())
    return sorted(set(out))


def excludes_for(cfg: Optional[Config], config_rel: Optional[str] = None,
                 root: Optional[Path] = None) -> list[str]:
    """The ``excludes`` that make ``--working-dir .`` upload the allow-list only.

    Everything at the top level is excluded (``/[!.]*``, ``/.?*``: every name but the root
    itself), then each allowed folder is re-included with its direct children excluded again
    (``!/d``, ``/d/*``; parents first), then the allowed files are re-included (the package's
    ``*.py`` in each of its folders, ``jobs/*.yaml``, the chosen config, each bundled data file
    the config reads), and last the deny patterns (EXCLUDES, SECRET_FILES, and
    ``/jobs/data`` when the config reads none of it), which win over everything before them.
    Folders created after this call are not uploaded.
    """
    root = ROOT if root is None else Path(root)
    dirs: set[str] = set()
    files: list[str] = []

    def allow_dir(rel: str) -> None:
        parts = rel.split("/")
        for k in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:k]))

    pkg = root / PACKAGE
    if pkg.is_dir():
        for dirpath, dirnames, _ in os.walk(pkg):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            rel = Path(dirpath).relative_to(root).as_posix()
            allow_dir(rel)
            files.append(f"{_escape(rel)}/*.py")
    allow_dir("jobs")
    files.append(JOB_CONFIGS)
    if config_rel:
        rel = Path(os.path.normpath(config_rel)).as_posix()
        if "/" in rel:
            allow_dir(rel.rsplit("/", 1)[0])
        files.append(_escape(rel))
    bundled = _bundled_paths(cfg, root)
    for rel in bundled:
        p = root / rel
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                d = Path(dirpath).relative_to(root).as_posix()
                allow_dir(d)
                files += [f"{d}/{_escape(f)}" for f in sorted(filenames)]
        else:
            allow_dir(rel.rsplit("/", 1)[0])
            files.append(_escape(rel))
    ex = ["/[!.]*", "/.?*"]
    for d in sorted(dirs, key=lambda d: (d.count("/"), d)):
        ex += [f"!/{_escape(d)}", f"/{_escape(d)}/*"]
    ex += [f"!/{f}" for f in dict.fromkeys(files)]
    ex += EXCLUDES + SECRET_FILES
    if not bundled:
        ex.append("/" + BUNDLED_DATA)
    return ex


def _escape(rel: str) -> str:
    """A literal path for a gitwildmatch pattern (glob characters escaped)."""
    return re.sub(r"([\\*?\[\]!#])", r"\\\1", rel)


def _rel_to_root(path: str, prefix: str) -> bool:
    if "://" in path or os.path.isabs(path):
        return False
    return Path(os.path.normpath(path)).as_posix().startswith(prefix + "/")


def upload_files(excludes: list[str], root: Optional[Path] = None) -> list[tuple[str, int]]:
    """(path, bytes) of every file ``--working-dir .`` uploads with these excludes, walked as
    Ray walks it (an excluded folder is not entered). Ray also honours the checkout's
    ``.gitignore`` / ``.rayignore``, which can only leave more out."""
    root = ROOT if root is None else Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = sorted(d for d in dirnames
                             if not is_excluded(os.path.join(rel_dir, d), excludes))
        for f in sorted(filenames):
            rel = os.path.join(rel_dir, f)
            if not is_excluded(rel, excludes):
                out.append((Path(rel).as_posix(), os.path.getsize(os.path.join(dirpath, f))))
    return out


def upload_size(excludes: list[str], root: Optional[Path] = None) -> tuple[int, int]:
    """(files, bytes) that ``--working-dir .`` would upload with these excludes."""
    files = upload_files(excludes, root)
    return len(files), sum(b for _, b in files)


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
        if local.exists() and inside and is_uploaded(norm, excludes):
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


def check_address(address: str, insecure: bool) -> Optional[str]:
    """Why the job server address is refused, or None: plain http:// to a host that is not
    loopback (the cluster token and the uploaded code would travel in clear
    text; reach a remote head through ``ray dashboard cluster.yaml``, an SSH tunnel, or TLS)."""
    url = address if "://" in address else "http://" + address
    scheme = url.split("://", 1)[0].lower()
    host = urlparse(url).hostname or ""
    if scheme != "http" or insecure:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"--address {address} is plain http:// to another machine: the cluster token and the "
            f"job's code would cross the network unencrypted. Reach the job server through "
            f"`ray dashboard cluster.yaml` (an SSH tunnel to http://127.0.0.1:8265) or https://, "
            f"or pass --insecure if this network is trusted")


def credentials_in(cfg: Config, outputs: dict[str, str], overrides: list[str],
                   env: list[str]) -> list[str]:
    """A refusal per URI with credentials in the config, the overrides or --env values (the
    command line would carry them into the job's metadata and the dashboard)."""
    found = []
    for section, values in cfg.to_dict().items():
        for key, v in values.items():
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                if uri_with_credentials(item):
                    found.append(credentials_refusal(f"{section}.{key}", item))
    for key, v in outputs.items():
        if uri_with_credentials(v):
            found.append(credentials_refusal(key, v))
    for item in overrides + env:
        key, _, value = item.partition("=")
        if uri_with_credentials(value):
            found.append(credentials_refusal(key, value))
    return list(dict.fromkeys(found))


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
    for item in overrides + list(args.env) + [f"--address={args.address}"]:
        key, _, value = item.partition("=")  # refused before anything could echo them
        if uri_with_credentials(value if "://" in value else "http://" + value):
            raise SubmitError(credentials_refusal(key, value))
    try:
        cfg, outputs = load_for_submit(path, sub, overrides)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    creds = credentials_in(cfg, outputs, overrides, list(args.env))
    if creds:
        raise SubmitError("\n  - ".join(["refused:"] + creds))
    excludes = excludes_for(cfg, rel)
    info: dict = {"config": rel, "command": sub, "problems": []}
    bad_address = check_address(args.address, getattr(args, "insecure", False))
    if bad_address:
        info["problems"].append(bad_address)
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
    p.add_argument("--insecure", action="store_true",
                   help="allow a plain http:// job server address that is not loopback")
    args = p.parse_intermixed_args(argv)
    try:
        cmd, info = build(args)
    except SubmitError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    shown = shlex.join(["ray", *cmd[1:]])
    if args.dry_run:
        files = upload_files(json.loads(cmd[cmd.index("--runtime-env-json") + 1])["excludes"])
        for problem in info["problems"]:
            print(f"# to fix before submitting: {problem}")
        size = sum(b for _, b in files)
        print(f"# working dir upload: {len(files)} files, {size / 2**20:.1f} MiB:")
        for rel_path, b in files:
            print(f"#   {rel_path} ({b} bytes)")
        print(f"# (cd {shlex.quote(str(ROOT))} &&)")
        print(shown)
        return 0
    print(f"submit: {info['config']} as {info['submission_id']} -> {args.address}", file=sys.stderr)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
