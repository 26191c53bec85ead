"""``prepare``: a messy source -> shuffled, validated Parquet shards with a manifest; resumable;
the same shards from Ray Data and in-process; the result opens with ``open_source`` and trains."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from massl_ray.cli import main as cli_main
from massl_ray.data import prepare as prep
from massl_ray.data.images import decode_image
from massl_ray.data.sources import DataSourceError, open_source

ROOT = Path(__file__).resolve().parents[1]
MAX_SIDE = 40
OPTS = prep.PrepareOptions(seed=3, rows_per_shard=5, row_group_size=2, max_side=MAX_SIDE,
                           unit_rows=4)


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / (3 + seed % 5)) + np.cos(yy / (4 + seed % 3))) * 60 + 128
    arr = base[..., None] + rng.integers(-20, 20, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, mode: str = "RGB") -> bytes:
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_messy_folder(root: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Class sub-folders cat/ and dog/ (class-sorted on disk): good images (path -> bytes) and
    bad ones (path -> what is wrong)."""
    good, bad = {}, {}
    files = {}
    for i in range(7):
        files[f"cat/c{i}.jpg"] = _jpeg(_noise(30 + 7 * i, 50 + 5 * i, i))  # some > MAX_SIDE
    files["cat/gray.jpg"] = _jpeg(_noise(24, 36, 11), "L")
    rgba = np.concatenate([_noise(32, 32, 12), np.full((32, 32, 1), 128, np.uint8)], axis=2)
    files["cat/alpha.png"] = _png(Image.fromarray(rgba))
    for i in range(5):
        files[f"dog/d{i}.jpg"] = _jpeg(_noise(60 + 3 * i, 45, 20 + i))
    files["dog/cmyk.jpg"] = _jpeg(_noise(50, 64, 30), "CMYK")
    g16 = (np.linspace(0, 65535, 36 * 28).reshape(36, 28)).astype(np.uint16)
    files["dog/deep16.png"] = _png(Image.fromarray(g16))
    files["dog/wide.png"] = _png(Image.fromarray(_noise(20, 900, 31)))  # aspect 45:1
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        good[str(p)] = data
    trunc = root / "dog" / "truncated.jpg"
    trunc.write_bytes(files["dog/d0.jpg"][:300])
    bad[str(trunc)] = "truncated"
    text = root / "cat" / "notes.jpg"
    text.write_bytes(b"this is not an image\n" * 10)
    bad[str(text)] = "not an image"
    return good, bad


def read_out(out: Path) -> pa.Table:
    m = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / f["path"]) for f in m["files"]])


def check_messy_output(out: Path, good: dict, bad: dict) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows"] == len(good) and m["skipped"] == len(bad)
    assert m["classes"] == ["cat", "dog"] and m["num_classes"] == 2
    assert (m["image_column"], m["label_column"]) == ("image", "label")
    assert (m["row_group_size"], m["rows_per_shard"], m["seed"], m["max_side"]) == (2, 5, 3, MAX_SIDE)
    report = json.loads((out / m["skipped_report"]).read_text())
    assert sorted(r["id"] for r in report) == sorted(bad)
    assert all(r["reason"] for r in report)
    # files: exactly the Parquet files present, their footers as the manifest says
    assert sorted(f["path"] for f in m["files"]) == sorted(p.name for p in out.glob("*.parquet"))
    for f in m["files"]:
        md = pq.read_metadata(out / f["path"])
        assert f["rows"] == md.num_rows and f["bytes"] == (out / f["path"]).stat().st_size
        assert f["row_groups"] == [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert all(r == 2 for r in f["row_groups"][:-1]) and 1 <= f["row_groups"][-1] <= 2
        schema_md = pq.read_schema(out / f["path"]).metadata
        assert json.loads(schema_md[b"massl_ray.classes"]) == ["cat", "dog"]
    assert sum(f["rows"] for f in m["files"]) == m["rows"]
    t = read_out(out)
    ids = t.column("id").to_pylist()
    assert sorted(ids) == sorted(good), "every good image exactly once, no bad one"
    labels = t.column("label").to_pylist()
    for i, lab in zip(ids, labels):
        assert ["cat", "dog"][lab] == Path(i).parent.name
    assert ids != sorted(ids), "class-sorted input must come out shuffled"
    per_shard = [set(pq.read_table(out / f["path"]).column("label").to_pylist()) for f in m["files"]]
    assert any(len(s) == 2 for s in per_shard), per_shard
    resized = 0
    for i, data in zip(ids, t.column("image").to_pylist()):
        img = decode_image(data)
        src = decode_image(good[i])
        if min(src.shape[1:]) > MAX_SIDE:
            resized += 1
            assert min(img.shape[1:]) == MAX_SIDE, (i, img.shape)
            assert data[:2] == b"\xff\xd8"  # re-encoded as JPEG
        else:
            assert data == good[i], f"{i} must keep its bytes"
    assert resized == m["resized"] and resized >= 5
    # opens as a training source
    s = open_source(str(out))
    assert s.kind == "parquet" and s.num_rows == len(good) and s.label_column == "label"
    return m


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    good, bad = make_messy_folder(root / "src")
    return root / "src", good, bad


@pytest.fixture(scope="module")
def prepared_local(messy, tmp_path_factory):
    src, good, bad = messy
    out = tmp_path_factory.mktemp("out") / "local"
    prep.prepare(str(src), str(out), OPTS, local=True, say=lambda s: None)
    return out


@pytest.mark.timeout(60)
def test_messy_folder_gives_validated_shuffled_shards_and_manifest(messy, prepared_local):
    src, good, bad = messy
    m = check_messy_output(prepared_local, good, bad)
    assert len(m["files"]) == 4 and not (prepared_local / ".prepare").exists()


@pytest.mark.timeout(60)
def test_interrupted_runs_resume_skipping_finished_work_and_match(messy, prepared_local, tmp_path,
                                                                  monkeypatch):
    src, good, bad = messy
    out = tmp_path / "resumed"
    said: list[str] = []
    real_unit, real_shard = prep.ValidateFn.run, prep.ShardFn.run
    calls = {"n": 0}

    def stop_after(real, k):
        def run(self, i):
            calls["n"] += 1
            if calls["n"] > k:
                raise KeyboardInterrupt("simulated interruption")
            return real(self, i)
        return run

    monkeypatch.setattr(prep.ValidateFn, "run", stop_after(real_unit, 2))  # 2 of 5 units
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(src), str(out), OPTS, local=True, say=said.append)
    calls["n"] = 0
    monkeypatch.setattr(prep.ValidateFn, "run", real_unit)
    monkeypatch.setattr(prep.ShardFn, "run", stop_after(real_shard, 1))  # 1 of 4 shards
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(src), str(out), OPTS, local=True, say=said.append)
    assert any("2/5 source units already validated" in s for s in said), said
    assert len(list(out.glob("part-*.parquet"))) == 1
    monkeypatch.setattr(prep.ShardFn, "run", real_shard)
    said.clear()
    prep.prepare(str(src), str(out), OPTS, local=True, say=said.append)
    assert any("5/5 source units already validated" in s for s in said), said
    assert any("1/4 shards already written" in s for s in said), said
    check_messy_output(out, good, bad)
    assert (out / "manifest.json").read_text() == (prepared_local / "manifest.json").read_text()
    for f in sorted(prepared_local.glob("part-*.parquet")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    said.clear()
    prep.prepare(str(src), str(out), OPTS, local=True, say=said.append)  # complete: no work
    assert "nothing to do" in said[-1]
    with pytest.raises(DataSourceError, match="other settings"):
        prep.prepare(str(src), str(out), prep.PrepareOptions(seed=4), local=True, say=said.append)


@pytest.mark.timeout(60)
def test_flat_folder_and_parquet_sources(tmp_path, prepared_local):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        (flat / f"im{i}.jpg").write_bytes(_jpeg(_noise(20, 24, i)))
    (flat / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    m = prep.prepare(str(flat), str(tmp_path / "o1"), prep.PrepareOptions(rows_per_shard=4),
                     local=True, say=lambda s: None)
    assert m["rows"] == 6 and m["skipped"] == 1 and m["classes"] is None
    assert m["label_column"] is None and [f["rows"] for f in m["files"]] == [3, 3]
    t = read_out(tmp_path / "o1")
    assert t.column_names == ["image", "id"]
    assert sorted(t.column("id").to_pylist()) == sorted(str(flat / f"im{i}.jpg") for i in range(6))
    # Parquet with a label column and an undecodable row (named <file>#<row>)
    imgs = [_jpeg(_noise(16, 16, i)) for i in range(9)] + [b"\xff\xd8 not really"]
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                             "label": pa.array([i % 3 for i in range(10)], pa.int16())}),
                   tmp_path / "src.parquet", row_group_size=4)
    m = prep.prepare(str(tmp_path / "src.parquet"), str(tmp_path / "o2"),
                     prep.PrepareOptions(rows_per_shard=4, row_group_size=3, seed=1),
                     local=True, say=lambda s: None)
    report = json.loads((tmp_path / "o2" / "skipped.json").read_text())
    assert m["rows"] == 9 and [r["id"] for r in report] == [f"{tmp_path / 'src.parquet'}#9"]
    t = read_out(tmp_path / "o2")
    by_id = dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))
    assert by_id == {f"{tmp_path / 'src.parquet'}#{i}": i % 3 for i in range(9)}
    for f in m["files"]:  # row groups of 3 rows, the last of a file shorter
        g = f["row_groups"]
        assert g[:-1] == [3] * (len(g) - 1) and 1 <= g[-1] <= 3 and sum(g) == f["rows"] <= 4
    assert sum(f["rows"] for f in m["files"]) == 9
    # a prepared set as the source: its class names (schema metadata) carry over
    m = prep.prepare(str(prepared_local), str(tmp_path / "o3"), prep.PrepareOptions(seed=5),
                     local=True, say=lambda s: None)
    assert m["classes"] == ["cat", "dog"] and m["rows"] == read_out(prepared_local).num_rows
    a, b = read_out(prepared_local), read_out(tmp_path / "o3")
    assert sorted(a.column("label").to_pylist()) == sorted(b.column("label").to_pylist())


@pytest.mark.timeout(60)
def test_cli_prepare_as_a_user_runs_it(tmp_path, messy):
    src, good, bad = messy
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "massl_ray", "prepare", str(src), str(out),
                        "--local", "--rows-per-shard", "6", "--max-side", "40"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=50)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"wrote {len(good)} rows in 4 files" in p.stdout and "skipped 2 undecodable" in p.stdout
    assert "prepare validate [" in p.stderr  # the progress line
    assert json.loads((out / "manifest.json").read_text())["rows"] == len(good)


def test_cli_prepare_refuses_bad_options_and_sources(tmp_path, capsys):
    assert cli_main(["prepare", str(tmp_path), str(tmp_path / "o"), "--local",
                     "--row-group-size", "0"]) == 2
    assert "row_group_size must be >= 1" in capsys.readouterr().err
    assert cli_main(["prepare", str(tmp_path / "nope"), str(tmp_path / "o"), "--local"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_data_prepare_matches_in_process_and_trains(ray_instance, messy, prepared_local,
                                                        tmp_path):
    src, good, bad = messy
    out = tmp_path / "ray"
    prep.prepare(str(src), str(out), OPTS, local=False, task_cpus=1, say=lambda s: None)
    assert (out / "manifest.json").read_text() == (prepared_local / "manifest.json").read_text()
    for f in sorted(prepared_local.glob("part-*.parquet")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    o = {"model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 2,
         "model.head_hidden_dim": 64, "model.head_out_dim": 32,
         "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
         "massl.memory_size": 64, "massl.block_size": 16,
         "optim.batch_size_per_worker": 4, "optim.epochs": 1,
         "data.train": str(out), "run.name": "prep", "run.storage_path": str(tmp_path / "runs"),
         "run.log_every_steps": 1, "run.checkpoint_every_steps": 100, "run.final_knn": False,
         "run.max_steps": 3}
    rc = cli_main(["train", "--local", *[f"{k}={v}" for k, v in o.items()]])
    assert rc == 0
    summary = json.loads((tmp_path / "runs" / "prep" / "summary.json").read_text())
    assert summary["skipped_images"] == 0 and summary["metrics"]["step"] == 3
    lines = (tmp_path / "runs" / "prep" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3
