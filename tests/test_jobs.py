"""jobs/: every config loads and validates, the recipes carry the published numbers, the CPU-sized
configs train, jobs/submit.py builds a safe ``ray job submit``; and, marked ``ray``, the quick
start submitted as a job to a local head, and a 2-worker run spread over two nodes.

The ``ray`` tests share one two-node cluster of their own (``ray start --block`` in a private
temp dir, dashboard on 127.0.0.1, free ports, a start retried once on other ports) and stop
exactly those processes afterwards, whatever happens: by the process ids they started, then any process whose command line or working
directory lies in that temp dir. ``ray stop`` is not used: it kills every Ray process of the
machine, including other users' sessions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from massl_ray.method.checkpoint import load_checkpoint
from massl_ray.config import Config, load_config
from massl_ray.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
QUICK = JOBS / "data" / "cifar10-quick"
TRAIN_SECTIONS = {"model", "crops", "massl", "optim", "data", "run"}


def _load_submit():
    spec = importlib.util.spec_from_file_location("massl_jobs_submit", JOBS / "submit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


submit = _load_submit()


def is_sweep(path: Path) -> bool:
    return "sweep" in (yaml.safe_load(path.read_text()) or {})


ALL_JOBS = sorted(JOBS.glob("*.yaml"))
# Training configs; a sweep config (a training config + a `sweep:` section, run by
# `python -m massl_ray tune`) is validated by the sweep's own tests.
CONFIGS = [p for p in ALL_JOBS if not is_sweep(p)]
IDS = [p.stem for p in CONFIGS]


# ---- every config ----------------------------------------------------------------------------

def test_the_expected_jobs_exist():
    assert {"quickstart", "cifar10_cpu", "cifar10_gpu", "imagenet_vit_s16_800ep",
            "imagenet_vit_b16_400ep"} <= set(IDS)


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    data = yaml.safe_load(path.read_text())
    assert set(data) <= TRAIN_SECTIONS
    assert cfg.run.name == path.stem, "run.name is the job's name (its run folder and resume key)"
    # Schedules resolve once the epoch length is known (from the data otherwise).
    if cfg.optim.steps_per_epoch is None:
        cfg.optim.steps_per_epoch = 100
    assert cfg.total_steps() == round(cfg.optim.epochs * cfg.optim.steps_per_epoch)
    assert cfg.massl.memory_size % cfg.global_batch_size == 0
    assert cfg.num_blocks * cfg.block_size == cfg.massl.memory_size


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_has_no_machine_paths_or_secrets(path):
    text = path.read_text()
    assert not re.search(r"aws_access_key|secret|token|password", text, re.IGNORECASE)
    cfg = load_config(path)
    for key in ("data.train", "data.eval_train", "data.eval_test", "run.storage_path",
                "model.init_from"):
        section, k = key.split(".")
        v = getattr(getattr(cfg, section), k)
        if isinstance(v, str) and "://" not in v:
            assert not os.path.isabs(v) and not v.startswith(".."), f"{key}={v}: a machine path"


@pytest.mark.parametrize("path", ALL_JOBS, ids=[p.stem for p in ALL_JOBS])
def test_config_is_documented_with_its_submit_command(path):
    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert path.stem in doc


# ---- the published recipes -------------------------------------------------------------------

RECIPES = {
    # arch, epochs, workers x batch, base lr, warm-up epochs, min lr, teacher momentum,
    # teacher-temperature warm-up epochs
    "imagenet_vit_s16_800ep": ("vit_small", 800, 2, 64, 5e-4, 0, 1e-6, 0.992, 30),
    "imagenet_vit_b16_400ep": ("vit_base", 400, 4, 32, 7.5e-4, 10, 2e-6, 0.996, 50),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_has_the_published_hyperparameters(name):
    arch, epochs, workers, bs, lr, warm, min_lr, mom, tt_epochs = RECIPES[name]
    cfg = load_config(JOBS / f"{name}.yaml")
    m, c, o, r, mo = cfg.massl, cfg.crops, cfg.optim, cfg.run, cfg.model
    # memory and blocks: K = 2^17 in 8 blocks of 16384
    assert m.memory_size == 131072 and cfg.block_size == 16384 and cfg.num_blocks == 8
    # 2 global 224 px + 10 local 96 px crops, patch 16
    assert (c.global_size, c.local_size, c.num_local_crops, mo.patch_size) == (224, 96, 10, 16)
    assert c.global_scale == (0.32, 1.0) and c.local_scale == (0.05, 0.32)
    # global batch 128 from workers x batch, linear scaling rule for the peak lr
    assert (r.num_workers, o.batch_size_per_worker, cfg.global_batch_size) == (workers, bs, 128)
    assert cfg.peak_lr == pytest.approx(lr * 128 / 256)
    assert o.lr == pytest.approx(lr) and o.min_lr == pytest.approx(min_lr)
    assert o.warmup_epochs == warm and o.epochs == epochs
    assert (o.weight_decay, o.weight_decay_end, o.clip_grad) == (0.04, 0.4, 3.0)
    assert o.betas == (0.9, 0.999)
    assert m.momentum_teacher == pytest.approx(mom)
    assert m.warmup_teacher_temp_epochs == tt_epochs
    assert (m.student_temp, m.warmup_teacher_temp, m.teacher_temp) == (0.1, 0.04, 0.07)
    assert mo.arch == arch and mo.drop_path_rate == 0.1
    assert (mo.head_hidden_dim, mo.head_out_dim) == (2048, 256)
    # one epoch of ImageNet-1k = 1,281,167 images // 128 (drop_last), as in the reference
    assert o.steps_per_epoch == 1281167 // 128
    # on GPUs, in bf16; data and checkpoints on object storage the user names
    assert r.use_gpu and r.gpus_per_worker == 1 and o.precision == "bf16"
    assert cfg.data.train.startswith("s3://YOUR-BUCKET/")
    assert r.storage_path.startswith("s3://YOUR-BUCKET/")
    assert r.max_failures > 0 and r.resume == "auto"


# ---- a few real steps on this CPU ------------------------------------------------------------

def _local_overrides(tmp_path: Path, **extra) -> list[str]:
    o = {"data.train": str(QUICK / "train.parquet"), "data.limit": 64,
         "run.max_steps": 2, "run.storage_path": str(tmp_path), "run.final_knn": False,
         "run.num_workers": 1, "run.use_gpu": False, "optim.fused_adamw": False,
         "run.log_every_steps": 1}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _check_run(res: dict, cfg: Config, steps: int) -> None:
    assert res["mode"] == "local"
    assert res["metrics"]["step"] == steps and np.isfinite(res["metrics"]["loss"])
    state = load_checkpoint(res["checkpoint"])
    assert state["global_step"] == steps
    assert tuple(state["memory"]["rows"].shape) == (cfg.massl.memory_size, cfg.model.head_out_dim)
    assert int(state["memory"]["ptr"]) == steps * cfg.global_batch_size


CPU_SIZED = [p for p in CONFIGS if not load_config(p).run.use_gpu]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", CPU_SIZED, ids=[p.stem for p in CPU_SIZED])
def test_cpu_config_trains_a_few_steps(path, tmp_path):
    # The config as shipped (model, crops, memory, schedules) on 64 quick-start images, one
    # process, batch 16 (the memory size stays divisible by the global batch).
    cfg = load_config(path, _local_overrides(tmp_path, **{"optim.batch_size_per_worker": 16}))
    shipped = load_config(path)
    assert (cfg.model.arch, cfg.massl.memory_size, cfg.crops.num_local_crops) == (
        shipped.model.arch, shipped.massl.memory_size, shipped.crops.num_local_crops)
    res = train(cfg, local=True)
    _check_run(res, cfg, 2)
    assert (tmp_path / cfg.run.name / "metrics.jsonl").is_file()


GPU_RECIPES = [p for p in CONFIGS if load_config(p).run.use_gpu]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", GPU_RECIPES, ids=[p.stem for p in GPU_RECIPES])
def test_gpu_recipe_shrunk_runs_one_step_on_cpu(path, tmp_path):
    # The GPU recipe with its memory (K, S), crops (sizes, L) and schedules as published, but a
    # one-block ViT of the smallest width, 4 images per step and one process on this CPU.
    shipped = load_config(path)
    over = _local_overrides(tmp_path, **{
        "model.arch": "vit_micro", "model.depth": 1, "model.head_hidden_dim": 256,
        "optim.batch_size_per_worker": 4, "data.limit": 8, "run.max_steps": 1,
        "data.eval_train": "null", "data.eval_test": "null", "data.decode_batch_size": 4,
        # the recipe's epoch length is ImageNet's: 8 rows hold 2 steps (a longer epoch than the
        # data is refused before training)
        "optim.steps_per_epoch": "null"})
    cfg = load_config(path, over)
    assert cfg.massl.memory_size == shipped.massl.memory_size
    assert cfg.block_size == shipped.block_size
    assert (cfg.crops.global_size, cfg.crops.local_size, cfg.crops.num_local_crops) == (
        shipped.crops.global_size, shipped.crops.local_size, shipped.crops.num_local_crops)
    assert cfg.optim.precision == shipped.optim.precision
    res = train(cfg, local=True)
    _check_run(res, cfg, 1)


# ---- jobs/submit.py --------------------------------------------------------------------------

def _dry_run(capsys, *args: str) -> tuple[int, str]:
    rc = submit.main([*args, "--dry-run"])
    return rc, capsys.readouterr().out


def _command(out: str) -> list[str]:
    import shlex

    line = [ln for ln in out.splitlines() if ln.startswith("ray job submit")]
    assert len(line) == 1, out
    return shlex.split(line[0])


@pytest.mark.parametrize("path", ALL_JOBS, ids=[p.stem for p in ALL_JOBS])
def test_submit_dry_run_prints_the_ray_job_submit_command(path, capsys):
    rc, out = _dry_run(capsys, path.stem, "--address", "http://127.0.0.1:8265")
    assert rc == 0
    cmd = _command(out)
    assert cmd[:3] == ["ray", "job", "submit"]
    assert cmd[cmd.index("--address") + 1] == "http://127.0.0.1:8265"
    assert cmd[cmd.index("--working-dir") + 1] == "."
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    for pattern in (".git", ".venv", "/runs", "/data", "__pycache__"):
        assert pattern in env["excludes"]
    assert not any(submit.SECRET_NAME.search(k) for k in env["env_vars"])
    assert "RAY_ADDRESS" not in env["env_vars"]
    entry = cmd[cmd.index("--") + 1:]
    assert entry[:6] == ["python", "-m", "massl_ray", "tune" if is_sweep(path) else "train",
                         "--config", f"jobs/{path.name}"]
    # The upload is the code (+ the quick-start data for the jobs that read it).
    m = re.search(r"working dir upload: (\d+) files, ([\d.]+) MiB", out)
    assert m and float(m.group(2)) < 20
    uses_bundled = "jobs/data/" in path.read_text()
    assert ("/jobs/data" in env["excludes"]) != uses_bundled


def test_submit_refuses_placeholders_and_submits_nothing(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(submit.subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    assert submit.main(["imagenet_vit_s16_800ep"]) == 2
    assert "YOUR-BUCKET" in capsys.readouterr().err
    assert submit.main(["imagenet_vit_s16_800ep", "data.train=s3://b/imagenet/train/",
                        "run.storage_path=s3://b/runs"]) == 0
    assert len(calls) == 1
    entry = calls[0][0][calls[0][0].index("--") + 1:]
    assert entry[-2:] == ["data.train=s3://b/imagenet/train/", "run.storage_path=s3://b/runs"]


def test_submit_validates_the_config_before_uploading(capsys):
    rc = submit.main(["imagenet_vit_s16_800ep", "optim.batch_size_per_worker=48", "--dry-run"])
    assert rc == 2
    assert "must be divisible by the global batch (2 workers x 48 = 96)" in capsys.readouterr().err


def test_submit_local_paths(capsys):
    # A relative run folder would land in the job's temporary copy of the code: refused for a
    # remote cluster, made absolute with --same-machine.
    rc = submit.main(["quickstart", "--submission-id", "x", "--address", "http://h:8265"])
    assert rc == 2 and "run.storage_path=runs" in capsys.readouterr().err
    rc, out = _dry_run(capsys, "quickstart", "--same-machine")
    assert rc == 0
    entry = _command(out)
    assert f"run.storage_path={ROOT / 'runs'}" in entry
    # The quick-start data is uploaded with the code: its relative paths stay relative.
    assert not any(a.startswith("data.train=") for a in entry)
    # Excluded or missing data is refused, and made absolute only if it exists here.
    rc = submit.main(["quickstart", "data.train=data/x.parquet", "run.storage_path=s3://b/r",
                      "--address", "http://h:8265"])
    assert rc == 2 and "data.train=data/x.parquet is not uploaded" in capsys.readouterr().err


def test_submit_never_forwards_credentials(capsys):
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_ADDRESS"):
        rc = submit.main(["cifar10_gpu", f"--env={name}=x", "--dry-run"])
        assert rc == 2, name
    rc, out = _dry_run(capsys, "cifar10_gpu", "--env", "AWS_REGION=us-west-2")
    env = json.loads(_command(out)[_command(out).index("--runtime-env-json") + 1])
    assert env["env_vars"]["AWS_REGION"] == "us-west-2"


SWEEPS = [p for p in ALL_JOBS if is_sweep(p)]


@pytest.mark.skipif(not SWEEPS, reason="no sweep config in jobs/")
def test_submit_sweep_config(capsys):
    # A sweep config (training sections + sweep:) is submitted as `massl_ray tune`; its
    # outputs folder is sweep.storage_path, checked like run.storage_path; sweep.* overrides
    # pass through.
    path = SWEEPS[0]
    storage = str((yaml.safe_load(path.read_text())["sweep"] or {}).get("storage_path",
                                                                      "runs/sweeps"))
    rc, out = _dry_run(capsys, path.stem, "--same-machine", "sweep.num_samples=2")
    entry = _command(out)[_command(out).index("--") + 1:]
    assert rc == 0 and entry[:4] == ["python", "-m", "massl_ray", "tune"]
    assert "sweep.num_samples=2" in entry
    if not os.path.isabs(storage):
        assert f"sweep.storage_path={ROOT / storage}" in entry
        rc = submit.main([path.stem, "--address", "http://h:8265", "data.train=s3://b/t",
                          "data.eval_train=s3://b/t", "data.eval_test=s3://b/v"])
        assert rc == 2 and f"sweep.storage_path={storage} would put" in capsys.readouterr().err


def test_submit_excludes_match_rays_own_matcher():
    # Ray applies the excludes with gitignore semantics (its vendored pathspec).
    thirdparty = pytest.importorskip("ray._private.thirdparty.pathspec")
    spec = thirdparty.PathSpec.from_lines("gitwildmatch", submit.excludes_for(None))
    paths = [".git/config", "a/.git/x", ".venv/bin/python", "runs/q/metrics.jsonl",
             "data/cifar10/train.parquet", "jobs/data/cifar10-quick/train.parquet",
             "massl_ray/__pycache__/x.pyc", "massl_ray/config.py", "jobs/submit.py",
             "tests/data/x.txt", "docs/runs.md", "benchmarks/results/loss.json",
             "benchmarks/loss.py", "x.egg-info/PKG-INFO", "tmp/a"]
    for p in paths:
        assert submit.is_excluded(p, submit.excludes_for(None)) == spec.match_file(p), p


# ---- local Ray clusters (ray start) ----------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_refs(pid: int) -> tuple[str, str]:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = ""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    return cmd, cwd


class LocalRayCluster:
    """Ray nodes on this machine in a private temp dir; ``stop`` ends exactly those processes."""

    def __init__(self) -> None:
        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="mrc", dir="/tmp"))
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.gcs_address: Optional[str] = None
        self.dashboard_url: Optional[str] = None
        bin_dir = str(Path(sys.executable).parent)
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        # The job entrypoint's `python` is the one on the PATH of `ray start`: this venv's.
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.env = env
        self.ray = str(Path(bin_dir) / "ray") if (Path(bin_dir) / "ray").exists() else "ray"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [self.ray, "start", "--block", "--disable-usage-stats", *args],
                stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _node_ports(self) -> list[str]:
        nm, om, ag, agg, me, re_ = _free_ports(6)
        return [f"--node-manager-port={nm}", f"--object-manager-port={om}",
                f"--dashboard-agent-listen-port={ag}", f"--dashboard-agent-grpc-port={agg}",
                f"--metrics-export-port={me}", f"--runtime-env-agent-port={re_}",
                "--node-ip-address=127.0.0.1"]

    def _start_with_retry(self, name: str, make_args, ready, timeout: float, what: str) -> None:
        """Two Ray nodes on one machine need distinct ports, which ``ray start`` takes as
        numbers: free ones are picked, but another process can take one before Ray binds it.
        A node whose ``ray start`` exits before it is up is started once more on fresh ports,
        saying why; a second failure fails the test with both logs."""
        for attempt in (1, 2):
            proc = self._start(name if attempt == 1 else f"{name}-retry", make_args())
            try:
                self._wait(ready, timeout, what, proc)
                return
            except RuntimeError as e:
                if attempt == 2:
                    raise
                print(f"LocalRayCluster: {what}: `ray start` exited ({proc.returncode}); "
                      f"starting it once more on other ports. Its log:\n{e}", file=sys.stderr)

    def start_head(self, num_cpus: int, resources: Optional[dict] = None,
                   timeout: float = 120) -> None:
        def args() -> list[str]:
            gcs, dash, client = _free_ports(3)
            self.gcs_address = f"127.0.0.1:{gcs}"
            self.dashboard_url = f"http://127.0.0.1:{dash}"
            a = ["--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                 "--object-store-memory=300000000", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--ray-client-server-port={client}", f"--temp-dir={self.root / 'head'}",
                 *self._node_ports()]
            if resources:
                a.append(f"--resources={json.dumps(resources)}")
            return a

        self._start_with_retry("head", args,
                               lambda: self._http_ok("/api/version") and len(self.alive_nodes()) == 1,
                               timeout, "the head node and its dashboard")

    def add_node(self, num_cpus: int, resources: dict, timeout: float = 120) -> None:
        n = len(self.alive_nodes())
        name = f"node{len(self.procs)}"

        def args() -> list[str]:
            return [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                    "--object-store-memory=300000000", f"--resources={json.dumps(resources)}",
                    f"--temp-dir={self.root / name}", *self._node_ports()]

        self._start_with_retry(name, args, lambda: len(self.alive_nodes()) == n + 1, timeout,
                               "the new node")

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.dashboard_url + path, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        try:
            return [n for n in list_nodes(address=self.dashboard_url, timeout=10)
                    if n.state == "ALIVE"]
        except Exception:  # noqa: BLE001 - not up yet
            return []

    def _wait(self, ready, timeout: float, what: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited ({proc.returncode}) before {what} was "
                                   f"up:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(1)
        raise TimeoutError(f"{what} not up after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}"
                         for p in self.logs if p.exists())

    def _ours(self) -> list[int]:
        root = str(self.root)
        me = os.getpid()
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            cmd, cwd = _proc_refs(int(d.name))
            if root in cmd or cwd.startswith(root):
                out.append(int(d.name))
        return out

    def stop(self) -> None:
        # 1. `ray start --block` stops its node's processes on SIGTERM (workers first).
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # then the process groups are killed anyway
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # 2. Whatever is left in the process groups we created, then anything still working
        #    in our temp dir (job drivers, workers), by process id.
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = self._ours()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.5)
        self.leftovers = self._ours()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        assert not self.leftovers, f"processes left running: {self.leftovers}"


def _subset(src: Path, dst: Path, rows: int) -> str:
    pq.write_table(pq.read_table(src).slice(0, rows), dst)
    return str(dst)


# The tiny training setting of tests/test_ray_train.py.
def _tiny(tmp_path: Path, name: str, **extra) -> list[str]:
    o = {"model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 2,
         "model.head_hidden_dim": 128, "model.head_out_dim": 32,
         "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
         "massl.memory_size": 2048, "massl.block_size": 512,
         "optim.batch_size_per_worker": 32, "optim.epochs": 2,
         "data.train": str(QUICK / "train.parquet"), "data.limit": 256,
         "data.decode_batch_size": 64, "run.name": name, "run.storage_path": str(tmp_path),
         "run.log_every_steps": 2, "run.checkpoint_every_steps": 2, "run.final_knn": False,
         "run.cpus_per_worker": 1, "data.decode_cpus": 1}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def two_nodes():
    """One local Ray cluster for the module's cluster tests: a 2-CPU head (the job server, a
    job's driver) and a second 2-CPU node, each with a custom resource naming it."""
    with LocalRayCluster() as cluster:
        cluster.start_head(num_cpus=2, resources={"head": 1})
        cluster.add_node(num_cpus=2, resources={"node2": 1})
        yield cluster


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_quickstart_submitted_as_a_job_to_a_local_head(two_nodes, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    runs = tmp_path / "runs"
    # k-NN on 500 bank / 200 query images instead of 5,000 / 1,000: same code, a few seconds.
    knn_train = _subset(QUICK / "train.parquet", tmp_path / "knn_train.parquet", 500)
    knn_test = _subset(QUICK / "test.parquet", tmp_path / "knn_test.parquet", 200)
    sid = f"quickstart-test-{os.getpid()}"
    cluster = two_nodes
    client = JobSubmissionClient(cluster.dashboard_url)
    cmd = [sys.executable, str(JOBS / "submit.py"), "quickstart",
           "--address", cluster.dashboard_url, "--submission-id", sid,
           "run.max_steps=4", f"run.storage_path={runs}", "run.final_knn=true",
           "data.limit=512", f"data.eval_train={knn_train}", f"data.eval_test={knn_test}"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=cluster.env, capture_output=True,
                              text=True, timeout=450)
    finally:
        if client.get_job_status(sid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                              JobStatus.STOPPED):
            client.stop_job(sid)
    logs = client.get_job_logs(sid)
    status = client.get_job_status(sid)
    info = client.get_job_info(sid)
    assert proc.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"{status}: {proc.stderr[-3000:]}\n{logs[-5000:]}")
    # The job ran the uploaded code, not this checkout, with the runtime environment we built.
    assert info.runtime_env["working_dir"].startswith("gcs://")
    assert ".git" in info.runtime_env["excludes"]
    # Outputs: checkpoint (with meta.json at step 4), metrics, summary, the k-NN line.
    run_dir = runs / "quickstart"
    metas = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/meta.json")]
    assert metas and max(int(m["global_step"]) for m in metas) == 4
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tb").iterdir())
    m = re.search(r"k-NN top-1 \(k=20\): trained (\d+\.\d+)% vs random-init backbone "
                  r"(\d+\.\d+)%", logs)
    assert m, logs[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    knn = summary["knn"]
    assert knn["k"] == 20 and knn["step"] == 4
    assert knn["train_rows"] == 500 and knn["test_rows"] == 200
    # The printed line is the summary's numbers (2 decimals), for both backbones ...
    trained, random_init = float(m.group(1)), float(m.group(2))
    assert knn["trained_top1"] == pytest.approx(trained, abs=0.006)
    assert knn["random_init_top1"] == pytest.approx(random_init, abs=0.006)
    # ... and each is a top-1 accuracy over the 200 queries: a percentage in steps of 0.5.
    for acc in (knn["trained_top1"], knn["random_init_top1"]):
        assert 0.0 <= acc <= 100.0
        assert acc * 2 == pytest.approx(round(acc * 2), abs=1e-6), acc


def _worker_nodes_from_state_api(dashboard_url: str, pids: list[int]) -> list[str]:
    """The nodes of the Ray Train worker actors with these process ids, as Ray's state API
    knows them (the cluster is shared with the module's other tests: other runs' workers too)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                         detail=True, limit=1000)
    return [a.node_id for a in actors if a.pid in pids]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_workers_spread_over_two_nodes(two_nodes, tmp_path):
    cluster = two_nodes
    nodes = {n.node_id: n for n in cluster.alive_nodes()}
    assert len(nodes) == 2
    env = dict(cluster.env, RAY_ADDRESS=cluster.gcs_address)
    over = _tiny(tmp_path, "spread", **{"run.num_workers": 2, "run.max_steps": 4,
                                        "run.placement_strategy": "SPREAD"})
    proc = subprocess.run([sys.executable, "-m", "massl_ray", "train", *over], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = tmp_path / "spread"
    pids = [json.loads((run_dir / "workers" / f"rank_{r}.json").read_text())["pid"] for r in (0, 1)]
    actor_nodes = _worker_nodes_from_state_api(cluster.dashboard_url, pids)
    summary = json.loads((run_dir / "summary.json").read_text())
    m = summary["metrics"]
    assert m["step"] == 4
    # The two ranks ran on the two different nodes: each rank records its Ray node id (one run
    # folder here, as both nodes share this machine's disk), and Ray's state API agrees.
    ranks = [json.loads((run_dir / "workers" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    rank_nodes = [w["node_id"] for w in ranks]
    assert len(set(rank_nodes)) == 2 and set(rank_nodes) == set(nodes), (rank_nodes, nodes)
    assert sorted(actor_nodes) == sorted(rank_nodes)
    # ... and ended with identical memory banks (a checksum per rank at the last checkpoint).
    assert m["memory_replicas_identical"] is True
    assert len(m["memory_checksums"]) == 2
    assert m["memory_checksums"][0] == m["memory_checksums"][1]
    state = load_checkpoint(summary["checkpoint"])
    assert int(state["memory"]["ptr"]) == 4 * 64
    assert not torch.isnan(state["memory"]["rows"]).any()
