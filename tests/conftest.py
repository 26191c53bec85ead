"""Shared fixtures: a tiny CPU-sized configuration and deterministic uint8 crop batches."""

from __future__ import annotations

import json
import os
from typing import Callable

# The test models are tiny: intra-op threads buy nothing, and on a small shared machine several
# busy-waiting OpenMP threads per process make the suite ~10x slower. MASSL_TEST_THREADS overrides.
_THREADS = os.environ.get("MASSL_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)  # effective only if torch is not imported yet

import pytest  # noqa: E402
import torch  # noqa: E402

from massl_ray.config import Config, apply_overrides  # noqa: E402

torch.set_num_threads(int(_THREADS))

# The tiny setting every core test builds on: ViT-micro (ViT-Tiny widths, 4 blocks) on 32 px
# global / 16 px local crops with patch 4; K = 256 slots in 4 blocks of 64; batch 8.
TINY_OVERRIDES = [
    "model.arch=vit_micro",
    "model.patch_size=4",
    "model.drop_path_rate=0.1",
    "model.head_hidden_dim=64",
    "model.head_out_dim=32",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.num_local_crops=2",
    "massl.memory_size=256",
    "massl.block_size=64",
    "massl.num_blocks=null",
    "optim.batch_size_per_worker=8",
    "optim.steps_per_epoch=10",
    "optim.epochs=2",
    "optim.fused_adamw=false",
    "run.num_workers=1",
    "run.use_gpu=false",
]


def make_tiny_config(*overrides: str, validate: bool = True) -> Config:
    """The tiny config, then ``section.key=value`` overrides (applied in order)."""
    cfg = apply_overrides(Config(), TINY_OVERRIDES + list(overrides))
    return cfg.validate() if validate else cfg


@pytest.fixture
def tiny_config() -> Callable[..., Config]:
    """Factory: ``tiny_config("massl.memory_size=512", ...)`` returns a fresh validated Config."""
    return make_tiny_config


def make_crops(cfg: Config, seed: int = 0, batch: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic uint8 crops: global [B, 2, 3, Hg, Wg] and local [B, L, 3, Hl, Wl]."""
    g = torch.Generator().manual_seed(seed)
    b = batch or cfg.optim.batch_size_per_worker
    gs, ls, nl = cfg.crops.global_size, cfg.crops.local_size, cfg.crops.num_local_crops
    gc = torch.randint(0, 256, (b, 2, 3, gs, gs), generator=g, dtype=torch.uint8)
    lc = torch.randint(0, 256, (b, nl, 3, ls, ls), generator=g, dtype=torch.uint8)
    return gc, lc


@pytest.fixture
def crops() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Factory: ``crops(cfg, seed=0)`` returns deterministic (global, local) uint8 crops."""
    return make_crops


@pytest.fixture(scope="session")
def ray_instance(tmp_path_factory, request):
    """One small local Ray for every in-process Ray test of the session: 4 logical CPUs on this
    2-core machine (two train workers and a decode task fit), a 512 MiB object store, no
    dashboard, its own temp dir. A Ray start costs seconds and an idle Ray about 1 GB, so the
    tests that use it run together (see ``pytest_collection_modifyitems``) and it is shut down
    before the tests that start Ray processes of their own. The S3 test server (``s3_server``)
    is started first, so every process of this Ray has its variables (a test may train on it
    with ``s3://`` data and storage); where it cannot start outside CI (a skip), this Ray
    starts without it and only the tests that ask for ``s3_server`` skip."""
    ray = pytest.importorskip("ray")
    try:
        request.getfixturevalue("s3_server")
    except pytest.skip.Exception:
        pass
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    yield ray
    ray.shutdown()


# ---- test order: Ray-free first, then the shared Ray's tests, then those with a Ray of their own
# A test marked ``ray`` that does not take ``ray_instance`` starts its own Ray (a CLI subprocess,
# a multi-node cluster): the shared instance would only compete with it for the two cores.

def _ray_group(item) -> int:
    if "ray_instance" in getattr(item, "fixturenames", ()):
        return 1
    return 2 if item.get_closest_marker("ray") else 0


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_ray_group)  # stable: the file order within each group


def pytest_runtest_setup(item):
    if _ray_group(item) == 2:
        import sys

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


# ---- failures reported as they happen ------------------------------------------------------
# pytest prints failure details only in its final summary. A session that dies before it (a Ray
# driver whose cluster went away exits its process; a CI limit) would leave a bare "F". So each
# failure's report is also written at once, to the terminal, as the test ends.

_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


def pytest_runtest_logreport(report):
    if not report.failed or _CONFIG is None:
        return
    tr = _CONFIG.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    text = report.longreprtext or ""
    if len(text) > 4000:
        text = "...\n" + text[-4000:]
    tr.write_line("")
    tr.write_line(f"FAILED ({report.when}) {report.nodeid}:", red=True)
    for line in text.splitlines():
        tr.write_line(line)
    tr.flush()


# ---- an S3 server on loopback (moto), for the object-storage tests ---------------------------

def bucket_jsonl(uri: str) -> list[dict]:
    """The JSON lines of an object-store file (e.g. a run's ``logs/metrics.jsonl`` in the
    bucket), [] if it does not exist."""
    from pyarrow import fs as pafs

    fs, key = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(key).type != pafs.FileType.File:
        return []
    with fs.open_input_stream(key) as f:
        return [json.loads(x) for x in f.read().decode().splitlines() if x.strip()]


class S3Server:
    """A running S3-compatible server: its ``endpoint``, the ``env`` (endpoint, dummy keys,
    region) a process needs to use it, and boto3 helpers to make buckets and read objects."""

    def __init__(self, endpoint: str, env: dict):
        import boto3

        self.endpoint, self.env = endpoint, dict(env)
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def bucket(self, name: str) -> str:
        """Create the bucket ``name`` (3-63 lower-case letters, digits, '-'); returns it."""
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                           Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in this process on 127.0.0.1 (a free port), for the whole session. Its
    endpoint (``AWS_ENDPOINT_URL``, which pyarrow's S3 filesystem and boto3 honour), dummy keys
    and a region are set in ``os.environ`` until the session ends (earlier AWS_* values put
    back then): every process started after it (a CLI subprocess and its Ray, the session's
    shared ``ray_instance``, which starts it first) inherits them. Under ``CI=true`` a server that cannot
    start fails the test; elsewhere it skips it."""
    import logging
    import threading

    def unavailable(why: str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"the S3 test server cannot start: {why}")
        pytest.skip(f"the S3 test server cannot start: {why}")

    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:  # requirements-test.txt: moto[server]
        unavailable(str(e))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # start() waits for the server without a deadline (forever if it failed to bind)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(timeout=60)
    if starter.is_alive():
        unavailable("not listening after 60 s")
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:  # a developer's own profile or session token must not reach the server
        del os.environ[k]
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env)
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)
        server.stop()
