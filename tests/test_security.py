"""Safe on a shared cluster (Ray-free): untrusted model files and ground-truth pickles run no
code and fetch nothing; image bytes reach only the promised decoders; a submitted job uploads an
allow-list and carries no credentials; run/sweep names, prepare's OUT and a sweep directory are
checked before anything is written or unpickled. (cluster.yaml's part: tests/test_cluster.py.)"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import shutil
import socket
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

from massl_ray.config import Config, ConfigError, CropConfig, load_config
from massl_ray.data import images as images_mod
from massl_ray.data import prepare as prep
from massl_ray.data.images import ImageDecodeError, decode_image, try_decode
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.sources import DataSourceError
from massl_ray.evaluate.export import TIMM_KWARGS, check_timm_spec, load_exported
from massl_ray.evaluate.retrieval import load_revisited
from massl_ray.method.checkpoint import CheckpointError
from massl_ray.method.model import ARCHS, backbone_kwargs

from conftest import make_tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "jobs" / "data" / "cifar10-quick"


def _load_submit():
    spec = importlib.util.spec_from_file_location("massl_jobs_submit_sec", ROOT / "jobs" / "submit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


submit = _load_submit()


# ---- untrusted model files: the sidecar / header of an exported backbone --------------------

@pytest.fixture
def no_fetch_no_unpickle(monkeypatch):
    """timm.create_model, torch.load and any network connection fail the test if reached."""
    import timm

    reached: list[str] = []

    def trap(what):
        def f(*a, **k):
            reached.append(what)
            raise AssertionError(f"{what} was reached")
        return f

    monkeypatch.setattr(timm, "create_model", trap("timm.create_model"))
    monkeypatch.setattr(torch, "load", trap("torch.load"))
    monkeypatch.setattr(socket.socket, "connect", trap("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", trap("socket.create_connection"))
    return reached


MALICIOUS_SIDECARS = {
    "hf_hub_pretrained": ({"timm_name": "hf-hub:attacker/vit", "timm_kwargs": {"pretrained": True}},
                          "hf-hub:attacker/vit"),
    "local_dir": ({"timm_name": "local-dir:/tmp/evil", "timm_kwargs": {}}, "local-dir:/tmp/evil"),
    "timm_hub_path": ({"timm_name": "timm/vit_small_patch16_224.augreg_in21k"}, "timm/"),
    "pretrained_true": ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"pretrained": True}},
                        "pretrained=true"),
    "checkpoint_path": ({"timm_name": "vit_tiny_patch16_224",
                         "timm_kwargs": {"checkpoint_path": "/tmp/evil.pth"}}, "'checkpoint_path'"),
    "pretrained_cfg_overlay": ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {
        "pretrained_cfg_overlay": {"file": "/tmp/evil.pth"}}}, "'pretrained_cfg_overlay'"),
    "pretrained_cfg": ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {
        "pretrained_cfg": {"hf_hub_id": "attacker/vit"}}}, "'pretrained_cfg'"),
    "unknown_key": ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"block_fn": "os.system"}},
                    "'block_fn'"),
    "wrong_type": ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"depth": "4; rm -rf"}},
                   "depth="),
    "kwargs_not_a_mapping": ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": ["x"]},
                             "must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS_SIDECARS))
def test_malicious_sidecar_refused_before_timm_torch_load_or_network(case, tmp_path,
                                                                     no_fetch_no_unpickle):
    from safetensors.torch import save_file

    meta, named = MALICIOUS_SIDECARS[case]
    f = tmp_path / "teacher.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 4)}, str(f))
    f.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refused|must be") as e:
        load_exported(f)
    assert named in str(e.value) and str(f.with_suffix(".json")) in str(e.value)
    # the evaluation's and embed's loader of an exported backbone refuses it the same way
    from massl_ray.evaluate.features import load_exported_teacher

    with pytest.raises(CheckpointError, match="refused|must be") as e:
        load_exported_teacher(f)
    assert named in str(e.value)
    assert no_fetch_no_unpickle == []


def test_malicious_safetensors_header_refused_without_a_sidecar(tmp_path, no_fetch_no_unpickle):
    from safetensors.torch import save_file

    f = tmp_path / "teacher.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 4)}, str(f),
              metadata={"timm_name": "hf-hub:attacker/vit",
                        "timm_kwargs": json.dumps({"pretrained": True})})
    with pytest.raises(CheckpointError, match="hf-hub:attacker/vit.*refused"):
        load_exported(f)
    assert no_fetch_no_unpickle == []


def test_the_projects_own_sidecars_pass_the_allow_list():
    # Every preset and the config-driven sizes: what export writes is exactly what is admitted.
    cfg = make_tiny_config("model.depth=2")
    cfg.model.embed_dim, cfg.model.num_heads = 48, 3
    written = [backbone_kwargs(cfg.model, cfg.crops.global_size, 0.0)]
    cfg.model.embed_dim = cfg.model.num_heads = cfg.model.depth = None
    for arch in ARCHS:
        cfg.model.arch = arch
        written.append(backbone_kwargs(cfg.model, 224, 0.1))
    for name, kwargs in written:
        assert set(kwargs) <= set(TIMM_KWARGS)
        assert check_timm_spec(name, json.loads(json.dumps(kwargs)), "x") == (name, kwargs)
    assert set().union(*(set(k) for _, k in written)) == set(TIMM_KWARGS)  # no unused entry


# ---- untrusted ground-truth pickles (revisited Oxford / Paris) ---------------------------------

class _Payload:
    """Unpickling this runs ``exec`` (a file appears if it ran)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _revisited_dir(root: Path, gnd_obj, names=("a", "b", "q")) -> Path:
    (root / "jpg").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    for n in names:
        (root / "jpg" / f"{n}.jpg").write_bytes(buf.getvalue())
    (root / "gnd_evil.pkl").write_bytes(gnd_obj if isinstance(gnd_obj, bytes) else
                                        pickle.dumps(gnd_obj, protocol=4))
    return root


@pytest.mark.parametrize("where", ["top", "inside_gnd", "as_imlist_entry"])
def test_ground_truth_pickle_with_a_reduce_payload_is_refused_and_not_run(where, tmp_path):
    marker = tmp_path / "payload_ran"
    good = {"imlist": ["a", "b"], "qimlist": ["q"],
            "gnd": [{"bbx": [0, 0, 8, 8], "easy": [0], "hard": [], "junk": [1]}]}
    if where == "top":
        obj = _Payload(marker)
    elif where == "inside_gnd":
        obj = dict(good, gnd=[dict(good["gnd"][0], easy=_Payload(marker))])
    else:
        obj = dict(good, imlist=["a", _Payload(marker)])
    # The same bytes with a plain pickle.load would run the payload (so the test can fail).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.read_text() == "ran"
    d = _revisited_dir(tmp_path / "ds", obj)
    with pytest.raises(ValueError, match="refused as a revisited ground-truth file.*builtins.exec"):
        load_revisited(d)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_ground_truth_with_numpy_arrays_still_loads(protocol, tmp_path):
    # The protocol's files: a dict of lists of dicts with int arrays and boxes (numpy scalars
    # included), pickled by any protocol.
    gnd = [{"bbx": [np.float64(0.5), 1.0, 7.0, 8.0], "easy": np.array([0], np.int64),
            "hard": np.array([], np.int64), "junk": np.array([1])},
           {"bbx": (0, 0, 8, 8), "easy": [], "hard": np.array([0, 1], np.int32), "junk": []}]
    data = pickle.dumps({"imlist": ["a", "b"], "qimlist": ["q", "q"], "gnd": gnd,
                         "meta": {b"bytes", frozenset([1])}}, protocol=protocol)
    ds = load_revisited(_revisited_dir(tmp_path / "ds", data))
    assert ds.imlist == ["a", "b"] and len(ds.gnd) == 2
    np.testing.assert_array_equal(ds.gnd[1]["hard"], [0, 1])
    assert float(ds.gnd[0]["bbx"][0]) == 0.5


def test_ground_truth_image_names_stay_under_jpg(tmp_path):
    bad = {"imlist": ["a", "../../etc/passwd"], "qimlist": ["q"],
           "gnd": [{"bbx": [0, 0, 8, 8], "easy": [0], "hard": [], "junk": []}]}
    with pytest.raises(ValueError, match="not an image name under jpg/"):
        load_revisited(_revisited_dir(tmp_path / "ds", bad))


# ---- image bytes: only the promised formats reach a decoder ------------------------------------

def _eps() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(buf, "EPS")
    return buf.getvalue()


def _psd(w: int = 4, h: int = 3) -> bytes:
    """A minimal uncompressed RGB Photoshop file (Pillow can read PSD, not write it)."""
    return (b"8BPS" + struct.pack(">H", 1) + b"\0" * 6 + struct.pack(">HIIHH", 3, h, w, 8, 3)
            + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(range(3 * w * h)))


def _jpeg(color=(200, 30, 40), size=(10, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def ghostscript_calls(monkeypatch):
    from PIL import EpsImagePlugin

    calls: list = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or None)
    return calls


def test_eps_and_psd_named_jpg_are_refused_without_reaching_their_parsers(ghostscript_calls):
    for data, fmt in ((_eps(), "EPS"), (_psd(), "PSD")):
        assert Image.open(io.BytesIO(data)).format == fmt  # Pillow alone would parse it
        assert fmt not in images_mod.FORMATS
        t, reason = try_decode(data)
        assert t is None and "not a recognised image format (accepted: JPEG" in reason
    assert ghostscript_calls == []


def test_eps_and_psd_named_jpg_are_skipped_and_named_in_the_report(tmp_path, ghostscript_calls):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "good.jpg").write_bytes(_jpeg())
    (src / "eps.jpg").write_bytes(_eps())
    (src / "psd.jpg").write_bytes(_psd())
    m = prep.prepare(str(tmp_path / "src"), str(tmp_path / "out"), prep.PrepareOptions(),
                     local=True, say=lambda s: None)
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert m["rows"] == 1 and m["skipped"] == 2
    assert sorted(r["id"] for r in report) == [str(src / "eps.jpg"), str(src / "psd.jpg")]
    assert all("not a recognised image format" in r["reason"] for r in report)
    assert ghostscript_calls == []


def test_every_promised_format_still_decodes():
    a = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM"):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        t = decode_image(buf.getvalue())
        assert tuple(t.shape) == (3, 4, 5), fmt
    buf = io.BytesIO()
    Image.fromarray(a[..., 0]).save(buf, "PPM")  # PGM (grey) through the PPM plugin
    assert tuple(decode_image(buf.getvalue()).shape) == (3, 4, 5)


def test_multipage_tiff_decodes_its_first_page_only():
    pages = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    t = decode_image(buf.getvalue())
    assert tuple(t.shape) == (3, 4, 6) and t[:, 0, 0].tolist() == [255, 0, 0]
    assert bool((t == t[:, :1, :1]).all())
    # training's decode (reduced 1/4 for 32/16 px crops): the first page too, its full size
    pages = [Image.new("RGB", (640, 480), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    (px, full), why = _TRAIN_MC.decode(buf.getvalue())
    assert why is None and tuple(px.shape) == (3, 120, 160) and full == (480, 640)
    assert px[:, 0, 0].tolist() == [255, 0, 0] and bool((px == px[:, :1, :1]).all())


def _png_with_exif(a: np.ndarray, exif: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    png = buf.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return png[:33] + chunk(b"eXIf", exif) + png[33:]  # after IHDR


def _ifd(*entries) -> bytes:
    body = b"MM" + struct.pack(">HI", 42, 8) + struct.pack(">H", len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack(">HHI", tag, typ, count) + value
    return body + b"\0\0\0\0"


MALFORMED_EXIF = {
    "orientation_9": _ifd((0x0112, 3, 1, b"\x00\x09\x00\x00")),
    "orientation_as_text": _ifd((0x0112, 2, 4, b"abc\x00")),
    "orientation_bad_type": _ifd((0x0112, 99, 1, b"\x00\x06\x00\x00")),
    "orientation_past_the_end": _ifd((0x0112, 3, 1000, b"\x00\x00\x00\x1a")),
    "exif_ifd_loops_to_itself": _ifd((0x8769, 4, 1, b"\x00\x00\x00\x08")),
    "exif_ifd_out_of_range": _ifd((0x8769, 4, 1, b"\xff\xff\xff\xff")),
    "truncated_header": b"MM\x00\x2a\x00\x00",
    "garbage": b"\xde\xad\xbe\xef" * 8,
}


_TRAIN_MC = MultiCrop(CropConfig(global_size=32, local_size=16, num_local_crops=2))


@pytest.mark.parametrize("case", sorted(MALFORMED_EXIF))
def test_malformed_exif_keeps_the_stored_pixels(case):
    a = np.random.default_rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = decode_image(_png_with_exif(a, MALFORMED_EXIF[case]))
        assert np.array_equal(t.permute(1, 2, 0).numpy(), a)
        # in a JPEG's APP1, through training's drafted decode (1/4): stored orientation, decoded
        buf = io.BytesIO()
        app1 = b"Exif\x00\x00" + MALFORMED_EXIF[case]
        Image.new("RGB", (640, 480), (0, 200, 0)).save(buf, "JPEG", exif=app1)
        assert app1 in buf.getvalue()
        (px, full), why = _TRAIN_MC.decode(buf.getvalue())
    assert why is None and tuple(px.shape) == (3, 120, 160) and full == (480, 640)
    assert abs(int(px[1, 60, 80]) - 200) <= 2


def test_an_exif_transpose_failure_keeps_the_stored_orientation(monkeypatch):
    a = np.random.default_rng(2).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    data = _png_with_exif(a, _ifd((0x0112, 3, 1, b"\x00\x06\x00\x00")))  # rotate 90 to display
    assert tuple(decode_image(data).shape) == (3, 8, 6)  # applied when it can be

    def broken(img, *a, **k):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    t = decode_image(data)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), a)


# ---- jobs/submit.py: an allow-list upload, no credentials, no clear-text remote address ------

def _temporary_checkout(tmp: Path) -> Path:
    """The package's .py files, jobs/quickstart.yaml and small stand-ins for its data, plus the
    files a real checkout accumulates that must never be uploaded."""
    root = tmp / "checkout"
    for p in (ROOT / "massl_ray").rglob("*.py"):
        dst = root / p.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    (root / "jobs" / "data" / "cifar10-quick").mkdir(parents=True)
    shutil.copyfile(ROOT / "jobs" / "quickstart.yaml", root / "jobs" / "quickstart.yaml")
    for n in ("train.parquet", "test.parquet"):
        (root / "jobs" / "data" / "cifar10-quick" / n).write_bytes(b"PAR1 stand-in")
    for rel in (".env", "key.pem", "notes.txt", "massl_ray/key.pem", "massl_ray/.env",
                "massl_ray/data/secret.txt", "massl_ray/__pycache__/x.pyc", "jobs/.env",
                "jobs/id_rsa", "jobs/notes.md", "jobs/data/cifar10-quick/.env",
                "jobs/data/cifar10-quick/key.pem", "jobs/data/other/x.parquet",
                ".git/config", ".aws/credentials", "runs/r/state.pt", "tests/test_x.py"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("AKIA... secret\n")
    return root


def test_submit_uploads_the_allow_list_only(tmp_path, capsys, monkeypatch):
    root = _temporary_checkout(tmp_path)
    monkeypatch.setattr(submit, "ROOT", root)
    assert submit.main(["quickstart", "--same-machine", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [ln.split("#   ", 1)[1].rsplit(" (", 1)[0] for ln in out.splitlines()
              if ln.startswith("#   ")]
    expected = sorted([p.relative_to(root).as_posix() for p in (root / "massl_ray").rglob("*.py")]
                      + ["jobs/quickstart.yaml", "jobs/data/cifar10-quick/test.parquet",
                         "jobs/data/cifar10-quick/train.parquet"])
    assert sorted(listed) == expected
    assert f"working dir upload: {len(expected)} files" in out
    # What Ray itself packs with these excludes (its own matcher and walk, .gitignore honoured)
    # is exactly the listed set: neither .env nor key.pem (nor anything else) goes.
    from ray._private.runtime_env.packaging import _zip_files

    line = [ln for ln in out.splitlines() if ln.startswith("ray job submit")][0]
    import shlex

    cmd = shlex.split(line)
    excludes = json.loads(cmd[cmd.index("--runtime-env-json") + 1])["excludes"]
    z = tmp_path / "pkg.zip"
    _zip_files(str(root), excludes, str(z), include_gitignore=True)
    packed = sorted(n for n in zipfile.ZipFile(z).namelist() if not n.endswith("/"))
    assert packed == expected
    assert ".env" not in packed and "key.pem" not in packed


def test_submit_refuses_credentials_in_uris_without_repeating_them(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(submit.subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    with pytest.raises(ConfigError, match=r"data.train \(s3://\*\*\*@x/y\) holds credentials"):
        load_config(None, ["data.train=s3://a:b@x/y"])
    cfg = Config()
    cfg.run.storage_path = "gs://KEY:SECRET@bucket/runs"
    with pytest.raises(ConfigError, match="run.storage_path") as e:
        cfg.validate()
    assert "SECRET" not in str(e.value)
    for args in (["cifar10_gpu", "data.train=s3://a:b@x/y"],
                 ["cifar10_gpu", "run.storage_path=s3://AKIAX:hunter2@b/runs"],
                 ["sweep_gpu", "data.train=s3://a:b@x/y"],  # a sweep: merged unvalidated
                 ["cifar10_gpu", "--env", "AWS_ENDPOINT_URL=https://a:b@minio.example:9000"],
                 ["cifar10_gpu", "--address", "https://a:b@head.example:8265"]):
        assert submit.main([*args, "--dry-run"]) == 2, args
        err = capsys.readouterr()
        assert "holds credentials" in err.err, args
        assert "a:b" not in err.err + err.out and "hunter2" not in err.err + err.out
    assert calls == []


def test_submit_refuses_plain_http_to_another_machine_unless_insecure(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(submit.subprocess, "call", lambda *a, **k: calls.append(a[0]) or 0)
    job = ["imagenet_vit_s16_800ep", "data.train=s3://b/t/", "run.storage_path=s3://b/runs"]
    for address in ("http://10.0.0.5:8265", "head.example:8265", "http://[fe80::1]:8265"):
        assert submit.main([*job, "--address", address]) == 2, address
        assert "unencrypted" in capsys.readouterr().err
    assert calls == []
    for address in ("http://127.0.0.1:8265", "http://127.0.0.2:8265", "http://localhost:8265",
                    "http://[::1]:8265", "https://head.example:8265"):
        assert submit.main([*job, "--address", address]) == 0, address
    assert submit.main([*job, "--address", "http://10.0.0.5:8265", "--insecure"]) == 0
    assert [c[c.index("--address") + 1] for c in calls][-1] == "http://10.0.0.5:8265"
    assert len(calls) == 6


# ---- names, prepare's OUT, the sweep directory ----------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", ".hidden", "-rf", "a/b", "a\\b", "", "x y", "ü"])
def test_bad_run_and_sweep_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"run.name .* must match \[A-Za-z0-9\]"):
        load_config(None, [f"run.name={name}"])
    from massl_ray.sweep import parse_sweep

    with pytest.raises(ConfigError, match=r"sweep.name .* must match"):
        parse_sweep({"name": name, "space": {"massl.memory_size": [256]}})


def test_plain_names_are_accepted():
    from massl_ray.sweep import parse_sweep

    for name in ("quickstart", "vit-s16_800ep.v2", "0run"):
        assert load_config(None, [f"run.name={name}"]).run.name == name
        assert parse_sweep({"name": name, "space": {"massl.memory_size": [256]}}).name == name


def _tiny_image_folder(root: Path, n: int = 3) -> Path:
    (root / "cls").mkdir(parents=True)
    for i in range(n):
        (root / "cls" / f"im{i}.jpg").write_bytes(_jpeg((20 * i, 40, 60)))
    return root


def test_prepare_refuses_out_in_src_and_a_folder_of_other_files(tmp_path):
    src = _tiny_image_folder(tmp_path / "src")
    opts = prep.PrepareOptions(rows_per_shard=2)
    run = lambda out: prep.prepare(str(src), str(out), opts, local=True, say=lambda s: None)  # noqa: E731
    with pytest.raises(DataSourceError, match="is SRC"):
        run(src)
    with pytest.raises(DataSourceError, match="inside SRC"):
        run(src / "cls" / "out")
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(DataSourceError, match="inside SRC"):
        run(tmp_path / "link" / "out")  # the same place through a symbolic link
    assert sorted(p.name for p in (src / "cls").iterdir()) == ["im0.jpg", "im1.jpg", "im2.jpg"]
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    with pytest.raises(DataSourceError, match="not empty .*thesis.tex.* not an earlier prepare"):
        run(other)
    assert sorted(os.listdir(other)) == ["thesis.tex"]
    # An earlier prepare of another SRC is refused too; of the same SRC it has nothing to do.
    done = tmp_path / "done"
    assert run(done)["rows"] == 3
    said: list[str] = []
    prep.prepare(str(src), str(done), opts, local=True, say=said.append)
    assert "nothing to do" in said[-1]
    src2 = _tiny_image_folder(tmp_path / "src2")
    with pytest.raises(DataSourceError, match="holds a prepare of another SRC"):
        prep.prepare(str(src2), str(done), opts, local=True, say=lambda s: None)
    # An empty OUT folder, or one a prepare left with only its work folder, is fine.
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty")["rows"] == 3
    (tmp_path / "started" / ".prepare").mkdir(parents=True)
    assert run(tmp_path / "started")["rows"] == 3


def _sweep_file(tmp_path: Path) -> tuple[Path, Path]:
    doc = yaml.safe_load((ROOT / "jobs" / "sweep_cpu.yaml").read_text())
    doc["data"].update(train=str(QUICK / "train.parquet"), eval_train=str(QUICK / "train.parquet"),
                       eval_test=str(QUICK / "test.parquet"))
    doc["sweep"].update(name="perm", storage_path=str(tmp_path / "sweeps"))
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p, tmp_path / "sweeps" / "perm"


@pytest.mark.parametrize("what", ["sweep_dir_group", "tune_file_others", "parent_others"])
def test_sweep_directory_others_could_write_is_refused_before_tune_restores(what, tmp_path,
                                                                           monkeypatch):
    import massl_ray.runtime
    from ray import tune

    from massl_ray.sweep import run_sweep

    reached = []
    monkeypatch.setattr(massl_ray.runtime, "init_ray", lambda *a, **k: reached.append("ray"))
    monkeypatch.setattr(tune.Tuner, "restore", lambda *a, **k: reached.append("restore"))
    p, sweep_dir = _sweep_file(tmp_path)
    state = sweep_dir / "tune" / "tuner.pkl"
    state.parent.mkdir(parents=True)
    state.write_bytes(pickle.dumps({"x": 1}))
    for d in (sweep_dir.parent, sweep_dir, state.parent):
        d.chmod(0o755)
    state.chmod(0o644)
    target, bits = {"sweep_dir_group": (sweep_dir, stat.S_IWGRP),
                    "tune_file_others": (state, stat.S_IWOTH),
                    "parent_others": (sweep_dir.parent, stat.S_IWOTH)}[what]
    target.chmod(stat.S_IMODE(target.stat().st_mode) | bits)
    with pytest.raises(ConfigError, match="not safe to resume from") as e:
        run_sweep(p)
    assert str(target) in str(e.value) and "chmod -R go-w" in str(e.value)
    assert reached == []
    if what == "parent_others":  # the sticky bit (as /tmp) keeps others from replacing it
        sweep_dir.parent.chmod(0o1777)
        from massl_ray.sweep import check_sweep_dir

        check_sweep_dir(sweep_dir)


def test_a_sweeps_own_files_are_written_without_group_or_other_write(tmp_path, monkeypatch):
    from massl_ray import sweep as sweep_mod

    seen = {}

    def fake(config_path, overrides, retry_errored):
        d = tmp_path / "made"
        d.mkdir()
        (d / "f").write_text("x")
        seen["dir"], seen["file"] = d.stat().st_mode, (d / "f").stat().st_mode
        return {}

    monkeypatch.setattr(sweep_mod, "_run_sweep", fake)
    old = os.umask(0o002)  # a group-writable umask, as on some shared machines
    try:
        sweep_mod.run_sweep("unused.yaml")
        assert os.umask(0o002) == 0o002  # restored afterwards
    finally:
        os.umask(old)
    assert not seen["dir"] & (stat.S_IWGRP | stat.S_IWOTH)
    assert not seen["file"] & (stat.S_IWGRP | stat.S_IWOTH)
