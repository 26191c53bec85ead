"""cluster.yaml: valid for the cluster launcher of the installed Ray, no secrets, the node types
the jobs need (CPU head, GPU training workers, CPU decode workers), job server on localhost."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"the installed ray has no {path}"
    return json.loads(path.read_text())


def test_validates_against_the_schema_shipped_with_ray(cluster, schema):
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_check_is_not_vacuous(cluster, schema):
    # The same validator refuses a typo'd key and a fractional resource count.
    bad = json.loads(json.dumps(cluster))
    bad["max_worker"] = 3
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(bad))) >= 2


def test_passes_rays_own_launcher_checks(cluster):
    # The launcher's validation beyond the schema (node types, head type, docker, limits),
    # after filling in the AWS provider's defaults, as `ray up` does before creating anything.
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(cluster)
    filled = util.prepare_config(json.loads(json.dumps(cluster)))
    util.validate_config(filled)
    assert filled["head_node_type"] == "head"


def test_node_types(cluster):
    types = cluster["available_node_types"]
    assert cluster["provider"]["type"] == "aws"
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    cpu = [n for n, t in types.items()
           if n != cluster["head_node_type"] and t["resources"].get("GPU", 0) == 0
           and t["resources"].get("CPU", 0) > 0]
    assert gpu, "a GPU worker type for training"
    assert cpu, "a CPU worker type for Ray Data decoding"
    for name in gpu + cpu:
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name
    # The published recipes (2 x 64 ViT-S, 4 x 32 ViT-B) must fit on the GPU workers.
    gpus = sum(types[n]["resources"]["GPU"] * types[n]["max_workers"] for n in gpu)
    assert gpus >= 4
    assert cluster["idle_timeout_minutes"] > 0


SECRET_KEYS = re.compile(
    r"aws_access_key|aws_secret|secret_access|session_token|AKIA[0-9A-Z]{16}|password|"
    r"BEGIN (RSA |OPENSSH )?PRIVATE KEY|gcp_credentials|client_secret", re.IGNORECASE)


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}")
            yield f"{path}.{k}", k
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_no_secrets(cluster):
    text = CLUSTER.read_text()
    # Comments included: no key, token or password may appear anywhere in the file.
    assert not SECRET_KEYS.search(text), SECRET_KEYS.search(text).group(0)
    for path, value in _walk(cluster):
        if isinstance(value, str):
            assert not SECRET_KEYS.search(value), path
    # Credentials come from the instance profile / the environment, not from the config.
    assert "gcp_credentials" not in cluster["provider"]
    assert "ssh_private_key" not in cluster.get("auth", {})


def test_job_server_listens_on_localhost_only(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_setup_installs_the_project_requirements(cluster):
    mounts = cluster["file_mounts"]
    req = [remote for remote, local in mounts.items() if local.rstrip("/") in
           ("./requirements.txt", "requirements.txt")]
    assert req, "requirements.txt is mounted on the nodes"
    setup = " ".join(cluster["setup_commands"])
    assert f"pip install --no-cache-dir -r {req[0]}" in setup
    # The image's Ray is the version requirements.txt pins.
    pinned = re.search(r"ray\[[^\]]*\]==([\d.]+)", (ROOT / "requirements.txt").read_text())
    assert pinned and pinned.group(1) in cluster["docker"]["image"]
    assert pinned.group(1) == ray.__version__


def test_a_spot_gpu_type_in_one_zone_spilling_to_local_nvme(cluster):
    types = cluster["available_node_types"]
    spot = [t for t in types.values() if t["resources"].get("GPU", 0) > 0
            and t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot, "a spot GPU worker type"
    assert spot[0]["min_workers"] == 0  # nothing is paid while no run wants it
    # one zone: the ranks all-reduce every step
    assert "," not in cluster["provider"]["availability_zone"]
    assert "/mnt/nvme" in " ".join(spot[0]["initialization_commands"])
    start = " ".join(cluster["worker_start_ray_commands"])
    assert "--object-spilling-directory=/mnt/nvme/" in start and "TMPDIR=/mnt/nvme/" in start
    assert "-v /mnt/nvme:/mnt/nvme" in cluster["docker"]["run_options"]
