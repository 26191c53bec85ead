"""Backbone, projection head, student/teacher construction, EMA and parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from massl_ray.method.model import (ARCHS, MultiCropNet, ProjectionHead, build_backbone,
                             build_student_teacher, ema_update, load_backbone_weights,
                             param_groups)


@pytest.fixture(scope="module")
def tiny_pair():
    from conftest import make_tiny_config

    cfg = make_tiny_config()
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    return cfg, student, teacher


# ---- backbone ---------------------------------------------------------------------------

def test_backbone_accepts_global_and_local_resolutions(tiny_pair):
    cfg, student, _ = tiny_pair
    bb = student.backbone.eval()
    with torch.no_grad():
        g = bb(torch.randn(3, 3, cfg.crops.global_size, cfg.crops.global_size))
        loc = bb(torch.randn(5, 3, cfg.crops.local_size, cfg.crops.local_size))
    assert g.shape == (3, bb.embed_dim) and loc.shape == (5, bb.embed_dim)
    assert torch.isfinite(g).all() and torch.isfinite(loc).all()


@pytest.mark.parametrize("arch, depth, width", [("vit_micro", 4, 192), ("vit_tiny", 12, 192)])
def test_presets(tiny_config, arch, depth, width):
    cfg = tiny_config(f"model.arch={arch}")
    bb = build_backbone(cfg.model, cfg.crops.global_size, 0.0)
    assert len(bb.blocks) == depth
    assert bb.embed_dim == width
    assert bb.patch_embed.proj.kernel_size == (4, 4)
    assert bb.num_classes == 0  # features, no classifier


def test_presets_table():
    assert set(ARCHS) >= {"vit_micro", "vit_tiny", "vit_small", "vit_base"}


def test_architecture_overrides(tiny_config):
    cfg = tiny_config("model.embed_dim=64", "model.num_heads=2", "model.depth=2")
    bb = build_backbone(cfg.model, cfg.crops.global_size, 0.0)
    assert bb.embed_dim == 64 and len(bb.blocks) == 2
    assert bb.blocks[0].attn.num_heads == 2


@pytest.mark.parametrize("arch", ["vit_does_not_exist", "resnet18"])
def test_unknown_or_non_vit_arch_is_a_clear_error(tiny_config, arch):
    cfg = tiny_config(f"model.arch={arch}")
    with pytest.raises(ValueError, match=rf"model\.arch '{arch}'"):
        build_backbone(cfg.model, cfg.crops.global_size, 0.0)


# ---- head -------------------------------------------------------------------------------

def test_head_default_dims_no_batchnorm_zero_bias():
    head = ProjectionHead(384)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048),
                                                                  (2048, 256)]
    assert all(m.bias is not None and torch.count_nonzero(m.bias) == 0 for m in linears)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    assert sum(isinstance(m, nn.GELU) for m in head.modules()) == 2
    for m in linears:  # N(0, 0.02) weights (trunc_normal_ at its default +-2: see below)
        w = m.weight.detach().double().flatten()
        assert abs(w.mean().item()) < 1e-3
        assert w.std().item() == pytest.approx(0.02, rel=0.015), m
        # a normal's share beyond 2 sigma (4.55 %): not uniform, not cut at 2 sigma
        assert (w.abs() > 0.04).double().mean().item() == pytest.approx(0.0455, abs=0.005), m
    z = head(torch.randn(5, 384))
    assert z.shape == (5, 256)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))


def test_head_weights_are_initialised_by_trunc_normal_with_std_002(monkeypatch):
    """The head's Linear weights come from ``nn.init.trunc_normal_(w, std=0.02)`` (DINO's head
    init; torch's default bounds a=-2, b=2 are absolute, i.e. 100 sigma: a normal in
    practice), once per layer, and keep what it drew."""
    calls = []
    real = nn.init.trunc_normal_

    def spy(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, **kw):
        out = real(tensor, mean=mean, std=std, a=a, b=b, **kw)
        calls.append((tuple(tensor.shape), mean, std, a, b, tensor.detach().clone()))
        return out

    monkeypatch.setattr(nn.init, "trunc_normal_", spy)
    head = ProjectionHead(48, 64, 16)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [c[:5] for c in calls] == [((64, 48), 0.0, 0.02, -2.0, 2.0),
                                      ((64, 64), 0.0, 0.02, -2.0, 2.0),
                                      ((16, 64), 0.0, 0.02, -2.0, 2.0)]
    for m, c in zip(linears, calls):
        assert torch.equal(m.weight.detach(), c[5])


def test_no_batchnorm_anywhere(tiny_pair):
    _, student, teacher = tiny_pair
    for net in (student, teacher):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# ---- multi-crop net ---------------------------------------------------------------------

def test_multicrop_returns_unit_embeddings_in_view_order(tiny_pair):
    cfg, _, teacher = tiny_pair
    net = teacher  # eval mode, no drop-path: each crop's embedding is deterministic
    b, gs, ls, nl = 3, cfg.crops.global_size, cfg.crops.local_size, cfg.crops.num_local_crops
    torch.manual_seed(1)
    gc = torch.randn(b, 2, 3, gs, gs)
    lc = torch.randn(b, nl, 3, ls, ls)
    with torch.no_grad():
        z = net(gc, lc)
        assert z.shape == (2 + nl, b, cfg.model.head_out_dim)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(2 + nl, b))
        # view v of sample i must be the embedding of that crop alone
        for i in range(b):
            for v in range(2):
                alone = net.head(net.backbone(gc[i, v:v + 1]))[0]
                torch.testing.assert_close(z[v, i], alone, atol=1e-5, rtol=1e-4)
            for v in range(nl):
                alone = net.head(net.backbone(lc[i, v:v + 1]))[0]
                torch.testing.assert_close(z[2 + v, i], alone, atol=1e-5, rtol=1e-4)
        # distinct crops give distinct embeddings (so the order check above is meaningful)
        assert not torch.allclose(z[0, 0], z[1, 0], atol=1e-3)
        assert not torch.allclose(z[0, 0], z[0, 1], atol=1e-3)
        # globals only
        zg = net(gc)
        assert zg.shape == (2, b, cfg.model.head_out_dim)
        torch.testing.assert_close(zg, z[:2], atol=1e-5, rtol=1e-4)
        assert net(gc, lc[:, :0]).shape == (2, b, cfg.model.head_out_dim)


# ---- student / teacher ------------------------------------------------------------------

def test_teacher_starts_equal_frozen_without_drop_path(tiny_pair):
    cfg, student, teacher = tiny_pair
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    assert s_sd.keys() == t_sd.keys()
    for k in s_sd:
        assert torch.equal(s_sd[k], t_sd[k]), k
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher.training
    rates_t = [b.drop_path1 for b in teacher.backbone.blocks]
    assert all(isinstance(m, nn.Identity) for m in rates_t)
    # the student's drop-path rises linearly over the blocks up to drop_path_rate
    probs = [getattr(b.drop_path1, "drop_prob", 0.0) for b in student.backbone.blocks]
    assert probs[-1] == pytest.approx(cfg.model.drop_path_rate)
    assert probs == sorted(probs) and probs[0] < probs[-1]
    # the teacher's head is its own copy, not shared with the student
    assert teacher.head.mlp[0].weight.data_ptr() != student.head.mlp[0].weight.data_ptr()


def _small_pair():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    t = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
        for p in t.parameters():
            p.normal_()
    for p in t.parameters():
        p.requires_grad_(False)
    return s, t


def test_ema_update_momentum_zero_copies_student():
    s, t = _small_pair()
    ema_update(t, s, 0.0)
    for ps, pt in zip(s.parameters(), t.parameters()):
        assert torch.equal(ps, pt)


def test_ema_update_momentum_one_keeps_teacher():
    s, t = _small_pair()
    before = [p.clone() for p in t.parameters()]
    ema_update(t, s, 1.0)
    for b, pt in zip(before, t.parameters()):
        assert torch.equal(b, pt)


def test_ema_update_blend():
    s, t = _small_pair()
    before = [p.clone() for p in t.parameters()]
    s_before = [p.clone() for p in s.parameters()]
    ema_update(t, s, 0.9)
    for b, ps, pt, sb in zip(before, s.parameters(), t.parameters(), s_before):
        torch.testing.assert_close(pt, 0.9 * b + 0.1 * ps, atol=1e-7, rtol=1e-6)
        assert torch.equal(ps, sb)  # the student is not touched
        assert not pt.requires_grad


def test_ema_update_refuses_mismatched_modules():
    s, t = _small_pair()
    with pytest.raises(RuntimeError):
        ema_update(nn.Linear(4, 3), s, 0.5)


def test_param_groups_split():
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    net.register_parameter("tok", nn.Parameter(torch.zeros(1, 1, 3)))  # ndim > 1, decayed
    net.register_parameter("scale", nn.Parameter(torch.ones(3)))  # ndim 1, not decayed
    frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    net.register_parameter("frozen", frozen)
    groups = param_groups(net)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert decay == {id(net[0].weight), id(net[2].weight), id(net.tok)}
    assert no_decay == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net.scale)}
    assert groups[1]["weight_decay"] == 0.0
    assert "weight_decay" not in groups[0]  # set per step from the schedule
    assert id(frozen) not in decay | no_decay


def test_param_groups_on_student(tiny_pair):
    _, student, _ = tiny_pair
    groups = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    decay = [names[id(p)] for p in groups[0]["params"]]
    no_decay = [names[id(p)] for p in groups[1]["params"]]
    assert len(decay) + len(no_decay) == len(list(student.parameters()))
    assert all(not n.endswith(".bias") for n in decay)
    assert all(n.endswith(".bias") or student.get_parameter(n).ndim <= 1 for n in no_decay)
    assert "backbone.cls_token" in decay and "backbone.pos_embed" in decay
    assert "head.mlp.0.weight" in decay and "head.mlp.0.bias" in no_decay
    assert "backbone.norm.weight" in no_decay


# ---- warm start -------------------------------------------------------------------------

def _donor(cfg, seed=123):
    torch.manual_seed(seed)
    return build_backbone(cfg.model, cfg.crops.global_size, 0.0)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_init_from_warm_starts_backbone(tiny_config, tmp_path, fmt):
    base = tiny_config()
    donor = _donor(base)
    path = tmp_path / f"backbone.{fmt}"
    if fmt == "pt":
        torch.save(donor.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    cfg = tiny_config(f"model.init_from={path}")
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    for k, v in donor.state_dict().items():
        assert torch.equal(student.backbone.state_dict()[k], v), k
        assert torch.equal(teacher.backbone.state_dict()[k], v), k
    # without init_from the same seed gives different weights (so the check above is real)
    torch.manual_seed(0)
    fresh, _ = build_student_teacher(base)
    assert not torch.equal(fresh.backbone.pos_embed, donor.pos_embed)


def test_init_from_massl_state_takes_teacher_backbone(tiny_config, tmp_path):
    cfg = tiny_config()
    torch.manual_seed(5)
    _, teacher = build_student_teacher(cfg)
    path = tmp_path / "state.pt"
    torch.save({"teacher": teacher.state_dict()}, path)
    bb = build_backbone(cfg.model, cfg.crops.global_size, 0.0)
    load_backbone_weights(bb, str(path))
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(bb.state_dict()[k], v), k


def test_init_from_missing_keys_raises(tiny_config, tmp_path):
    donor = _donor(tiny_config("model.depth=2"))  # blocks 2 and 3 missing
    path = tmp_path / "short.pt"
    torch.save(donor.state_dict(), path)
    bb = build_backbone(tiny_config().model, 32, 0.0)
    with pytest.raises(ValueError, match="does not match the backbone"):
        load_backbone_weights(bb, str(path))
    sd = _donor(tiny_config()).state_dict()
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="unexpected"):
        load_backbone_weights(bb, str(path))


def test_init_from_shape_mismatch_raises(tiny_config, tmp_path):
    donor = _donor(tiny_config("model.embed_dim=96"))
    path = tmp_path / "narrow.pt"
    torch.save(donor.state_dict(), path)
    cfg = tiny_config(f"model.init_from={path}")
    with pytest.raises((ValueError, RuntimeError)):
        build_student_teacher(cfg)


def test_init_from_shape_mismatch_names_init_from(tiny_config, tmp_path):
    donor = _donor(tiny_config("model.embed_dim=96"))
    path = tmp_path / "narrow.pt"
    torch.save(donor.state_dict(), path)
    bb = build_backbone(tiny_config().model, 32, 0.0)
    with pytest.raises(ValueError, match="init_from"):
        load_backbone_weights(bb, str(path))
