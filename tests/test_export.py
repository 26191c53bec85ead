"""Export: the teacher backbone as safetensors that timm loads unchanged; features round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from massl_ray.method.checkpoint import load_checkpoint, save_checkpoint
from massl_ray.cli import main as cli_main
from massl_ray.evaluate.export import export_teacher, load_exported
from massl_ray.method.learner import Learner, normalize
from massl_ray.method.model import backbone_kwargs

from conftest import make_crops, make_tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after three steps, so the teacher differs from the student and the init."""
    cfg = make_tiny_config("model.depth=2", "run.seed=5")
    learner = Learner(cfg)
    for s in range(3):
        learner.step(*make_crops(cfg, seed=s))
    d = tmp_path_factory.mktemp("run") / "checkpoint_000000003"
    save_checkpoint(learner.state_dict(), d)
    return cfg, d


@pytest.mark.timeout(120)
def test_export_round_trip_features_equal_the_checkpoints_teacher(trained, tmp_path):
    cfg, ckpt = trained
    out = tmp_path / "export" / "teacher.safetensors"
    rc = cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out)])
    assert rc == 0 and out.is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    name, kwargs = backbone_kwargs(cfg.model, cfg.crops.global_size, 0.0)
    assert meta["timm_name"] == name == "vit_tiny_patch16_224"
    assert meta["timm_kwargs"] == kwargs and meta["global_step"] == 3
    with safe_open(str(out), "pt") as f:
        header = f.metadata()
    assert header["timm_name"] == name and json.loads(header["timm_kwargs"]) == kwargs

    # What a user does: timm.create_model(name, **kwargs) + load_state_dict, unchanged (strict).
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(out)))
    model.eval()

    learner = Learner(cfg)
    learner.load_state_dict(load_checkpoint(ckpt))
    imgs = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = normalize(imgs, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))
    with torch.no_grad():
        exported = model(x)
    with torch.no_grad():
        teacher = learner.teacher.backbone(normalize(imgs, learner.mean, learner.std))
    torch.testing.assert_close(exported, teacher, rtol=0, atol=0)
    # Another resolution goes through the same weights (dynamic_img_size).
    imgs16 = imgs[:, :, :16, :16]
    with torch.no_grad():
        torch.testing.assert_close(model(normalize(imgs16, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))),
                                   learner.teacher.backbone(normalize(imgs16, learner.mean, learner.std)), rtol=0, atol=0)
    # The teacher, not the student, and not the random init.
    student = {k[len("backbone."):]: v for k, v in learner.student.state_dict().items()
               if k.startswith("backbone.")}
    sd = load_file(str(out))
    assert any(not torch.equal(sd[k], student[k]) for k in sd)
    assert set(sd) == set(student)
    # The helper builds the same model.
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), exported, rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_export_refuses_bad_arguments(trained, tmp_path, capsys):
    _, ckpt = trained
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_teacher(ckpt, tmp_path / "teacher.pt")
    rc = cli_main(["export", "--checkpoint", str(tmp_path / "missing"), "--out",
                   str(tmp_path / "t.safetensors")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    # A corrupt checkpoint is refused (sha256), nothing written.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(ckpt).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "state.pt").write_bytes((bad / "state.pt").read_bytes()[:-10] + b"0123456789")
    rc = cli_main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "t.safetensors")])
    assert rc == 2 and "sha256" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.timeout(30)
def test_export_refuses_an_exported_file(tmp_path, capsys):
    rc = cli_main(["export", "--checkpoint", str(tmp_path / "t.safetensors"), "--out",
                   str(tmp_path / "u.safetensors")])
    assert rc == 2 and "already an exported backbone" in capsys.readouterr().err
