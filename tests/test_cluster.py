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


# ---- safe on a shared cluster: IAM, metadata service, network -----------------------------

IAM = ROOT / "docs" / "iam"


def _policy(name: str) -> dict:
    doc = json.loads((IAM / name).read_text())
    assert doc["Version"] == "2012-10-17"
    return doc


def _listed(v) -> list:
    return v if isinstance(v, list) else [v]


def test_head_and_workers_have_their_own_scoped_instance_profiles(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    profiles = {n: t["node_config"]["IamInstanceProfile"]["Name"] for n, t in types.items()}
    assert "ray-autoscaler-v1" not in CLUSTER.read_text()  # Ray's EC2 + S3 full-access default
    workers = {p for n, p in profiles.items() if n != head}
    assert workers == {"massl-ray-worker"} and profiles[head] == "massl-ray-head"

    # The workers' policy: S3 only, on the run bucket's two prefixes; data read-only.
    storage = _policy("worker-storage-policy.json")["Statement"]
    bucket = "arn:aws:s3:::YOUR-BUCKET"
    writes = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    for st in storage:
        assert st["Effect"] == "Allow"
        for action in _listed(st["Action"]):
            assert action.startswith("s3:") and "*" not in action, action
        for res in _listed(st["Resource"]):
            assert res == bucket or res in (f"{bucket}/massl-data/*", f"{bucket}/massl-runs/*"), res
            if res == bucket and "s3:ListBucket" in _listed(st["Action"]):
                prefixes = st["Condition"]["StringLike"]["s3:prefix"]
                assert all(p.split("/")[0] in ("massl-data", "massl-runs") for p in prefixes)
            if res.endswith("/massl-data/*"):
                assert not writes & set(_listed(st["Action"])), "the data prefix is read-only"
    granted = {(a, r) for st in storage for a in _listed(st["Action"]) for r in _listed(st["Resource"])}
    assert ("s3:GetObject", f"{bucket}/massl-data/*") in granted
    assert {("s3:PutObject", f"{bucket}/massl-runs/*"), ("s3:GetObject", f"{bucket}/massl-runs/*"),
            ("s3:DeleteObject", f"{bucket}/massl-runs/*")} <= granted
    # The cluster.yaml's storage is under the writable prefix.
    assert cluster["metadata"]["storage"].startswith("s3://YOUR-BUCKET/massl-runs")

    # The head's autoscaler policy: EC2 instances of this cluster (its tag), PassRole for the
    # worker role only; nothing else.
    tag = "ray-cluster-name"
    auto = _policy("head-autoscaler-policy.json")["Statement"]
    for st in auto:
        actions = _listed(st["Action"])
        assert all(a.startswith("ec2:") or a == "iam:PassRole" for a in actions), actions
        assert not any("*" in a for a in actions), actions
        cond = st.get("Condition", {}).get("StringEquals", {})
        if {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"} & set(actions):
            assert cond == {f"aws:ResourceTag/{tag}": cluster["cluster_name"]}
        if "ec2:CreateTags" in actions:
            assert cond in ({f"aws:ResourceTag/{tag}": cluster["cluster_name"]},
                            {"ec2:CreateAction": "RunInstances"})
        if "ec2:RunInstances" in actions and any(":instance/" in r for r in _listed(st["Resource"])):
            assert cond == {f"aws:RequestTag/{tag}": cluster["cluster_name"]}
        if actions == ["iam:PassRole"]:
            assert st["Resource"].endswith(":role/massl-ray-worker")
            assert cond == {"iam:PassedToService": "ec2.amazonaws.com"}
        if st["Resource"] == "*":
            assert all(a.startswith("ec2:Describe") for a in actions), actions
    assert any(st["Action"] == "iam:PassRole" for st in auto)
    # Ray's launcher tags every instance with the cluster name under that key.
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    assert TAG_RAY_CLUSTER_NAME == tag
    trust = _policy("ec2-trust-policy.json")["Statement"]
    assert trust == [{"Sid": trust[0]["Sid"], "Effect": "Allow",
                      "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]


def test_every_node_requires_imdsv2(cluster):
    for name, t in cluster["available_node_types"].items():
        assert t["node_config"]["MetadataOptions"]["HttpTokens"] == "required", name
        # the containers use the host's network: the default hop limit (1) is enough
        assert t["node_config"]["MetadataOptions"].get("HttpPutResponseHopLimit", 1) == 1, name
    assert "--net=host" in Path(ray.__file__).parent.joinpath(
        "autoscaler", "_private", "docker.py").read_text()


def test_no_public_ips_and_ssh_from_one_cidr_only(cluster, monkeypatch):
    aws_config = pytest.importorskip("ray.autoscaler._private.aws.config")
    assert cluster["provider"]["use_internal_ips"] is True
    head = cluster["head_node_type"]
    for name, t in cluster["available_node_types"].items():
        nics = t["node_config"]["NetworkInterfaces"]
        assert len(nics) == 1 and nics[0]["AssociatePublicIpAddress"] is False, name
        assert nics[0]["SubnetId"].startswith("subnet-REPLACE-ME"), name
        assert nics[0]["Groups"] == ["sg-REPLACE-ME-HEAD" if name == head else "sg-REPLACE-ME-WORKER"]
    # Ray's own bootstrap reads the interfaces (subnets and groups) ...
    filled = aws_config._configure_from_network_interfaces(json.loads(json.dumps(cluster)))
    for name, t in filled["available_node_types"].items():
        assert t["node_config"]["SecurityGroupIds"], name
    # ... so it never creates its default group (which opens SSH to 0.0.0.0/0).
    monkeypatch.setattr(aws_config, "_upsert_security_groups",
                        lambda *a, **k: pytest.fail("Ray would create its default security group"))
    aws_config._configure_security_group(filled)
    # The head's group: SSH only, from the CIDR the user fills in; never from everywhere.
    rules = json.loads((IAM / "head-ssh-ingress.json").read_text())
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in rules] == [("tcp", 22, 22)]
    cidrs = [ip["CidrIp"] for r in rules for ip in r["IpRanges"]]
    assert cidrs == ["SSH-CIDR-REPLACE-ME"] and not any("Ipv6Ranges" in r for r in rules)
    assert "0.0.0.0/0" not in CLUSTER.read_text() + (IAM / "head-ssh-ingress.json").read_text()
