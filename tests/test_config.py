"""Configuration: defaults, YAML and command-line overrides, type coercion, validation messages."""

from __future__ import annotations

import re

import pytest

from massl_ray.config import (Config, ConfigError, apply_overrides, config_from_dict,
                              dump_config, load_config)


def invalid(*overrides: str) -> str:
    """The validation message for the defaults plus ``overrides`` (which must be refused)."""
    cfg = apply_overrides(Config(), list(overrides))
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    return str(ei.value)


# ---- defaults --------------------------------------------------------------------------

def test_defaults_validate_without_steps_per_epoch():
    cfg = Config()
    assert cfg.optim.steps_per_epoch is None
    assert cfg.validate() is cfg
    # the published ViT-S recipe
    assert cfg.massl.memory_size == 131072 and cfg.block_size == 16384 and cfg.num_blocks == 8
    assert cfg.num_views == 12
    assert cfg.global_batch_size == 64
    assert cfg.peak_lr == pytest.approx(5e-4 * 64 / 256)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        cfg.total_steps()


def test_load_config_without_file_is_defaults():
    assert load_config() == Config()


def test_tiny_config_fixture(tiny_config):
    cfg = tiny_config()
    assert cfg.model.arch == "vit_micro" and cfg.model.patch_size == 4
    assert (cfg.crops.global_size, cfg.crops.local_size, cfg.crops.num_local_crops) == (32, 16, 2)
    assert (cfg.model.head_hidden_dim, cfg.model.head_out_dim) == (64, 32)
    assert (cfg.massl.memory_size, cfg.block_size, cfg.num_blocks) == (256, 64, 4)
    assert cfg.global_batch_size == 8 and cfg.total_steps() == 20
    assert cfg.model.drop_path_rate == 0.1
    # overrides go through the same path
    assert tiny_config("massl.memory_size=512").massl.memory_size == 512


# ---- YAML and overrides ----------------------------------------------------------------

def test_yaml_overrides_defaults(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(
        "massl:\n  memory_size: 65536\n  block_size: 8192\n"
        "optim:\n  lr: 0.001\n  steps_per_epoch: 100\n  betas: [0.8, 0.99]\n"
        "run:\n  name: exp1\n"
        "data:\n"  # an empty section is allowed
    )
    cfg = load_config(p)
    assert cfg.massl.memory_size == 65536 and cfg.massl.block_size == 8192
    assert cfg.optim.lr == 0.001 and cfg.optim.steps_per_epoch == 100
    assert cfg.optim.betas == (0.8, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.run.name == "exp1"
    assert cfg.crops == Config().crops  # untouched sections keep their defaults


def test_cli_overrides_beat_yaml(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("massl:\n  memory_size: 65536\noptim:\n  lr: 0.001\n")
    cfg = load_config(p, ["massl.memory_size=32768", "optim.lr=2e-3"])
    assert cfg.massl.memory_size == 32768
    assert cfg.optim.lr == 0.002


def test_override_type_coercion():
    cfg = apply_overrides(Config(), [
        "massl.memory_size=65536",          # int
        "optim.steps_per_epoch=12.0",       # integral float -> int
        "optim.lr=1e-3",                    # YAML 1.1 reads this as a string
        "optim.min_lr=0",                   # int -> float
        "run.use_gpu=true",                 # bool
        "run.final_knn=no",                 # bool (YAML 1.1 "no")
        "crops.global_scale=[0.4,1.0]",     # tuple
        "crops.blur_p=[1, 0, 0.5]",         # tuple of floats from ints
        "data.label_column=null",           # Optional -> None
        "model.init_from=None",             # Optional -> None
        "model.depth=6",                    # Optional[int]
        "run.name=run-1",                   # str
        "run.resume=never",
    ])
    assert cfg.massl.memory_size == 65536 and type(cfg.massl.memory_size) is int
    assert cfg.optim.steps_per_epoch == 12 and type(cfg.optim.steps_per_epoch) is int
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.optim.min_lr == 0.0 and type(cfg.optim.min_lr) is float
    assert cfg.run.use_gpu is True
    assert cfg.run.final_knn is False
    assert cfg.crops.global_scale == (0.4, 1.0) and isinstance(cfg.crops.global_scale, tuple)
    assert cfg.crops.blur_p == (1.0, 0.0, 0.5) and all(type(x) is float for x in cfg.crops.blur_p)
    assert cfg.data.label_column is None
    assert cfg.model.init_from is None
    assert cfg.model.depth == 6
    assert cfg.run.name == "run-1" and cfg.run.resume == "never"


@pytest.mark.parametrize("override, words", [
    ("massl.memory_size=abc", ["massl.memory_size", "integer", "abc"]),
    ("massl.memory_size=1.5", ["massl.memory_size", "integer"]),
    ("massl.memory_size=true", ["massl.memory_size", "integer"]),
    ("optim.lr=fast", ["optim.lr", "number", "fast"]),
    ("optim.lr=.inf", ["optim.lr", "finite"]),
    ("run.use_gpu=maybe", ["run.use_gpu", "true or false"]),
    ("crops.global_scale=[0.4]", ["crops.global_scale", "2 values"]),
    ("crops.global_scale=0.4", ["crops.global_scale", "2 values"]),
    ("crops.global_scale=[0.4,big]", ["crops.global_scale[1]", "number"]),
    ("run.name=[a, b]", ["run.name", "string"]),
])
def test_override_type_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as ei:
        apply_overrides(Config(), [override])
    for w in words:
        assert w in str(ei.value)


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError) as ei:
        apply_overrides(Config(), ["trainer.lr=1"])
    msg = str(ei.value)
    assert "unknown config section" in msg and "'trainer'" in msg
    assert "massl" in msg and "optim" in msg  # lists the known sections


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError) as ei:
        apply_overrides(Config(), ["massl.out_dim=65536"])
    msg = str(ei.value)
    assert "unknown config key massl.out_dim" in msg
    assert "memory_size" in msg  # lists the known keys of that section


def test_unknown_key_in_yaml_is_refused(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("massl:\n  partition_size: 16384\n")
    with pytest.raises(ConfigError, match=r"massl\.partition_size"):
        load_config(p)
    p.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'optimizer'"):
        load_config(p)
    p.write_text("massl: 3\n")
    with pytest.raises(ConfigError, match="'massl' must be a mapping"):
        load_config(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


@pytest.mark.parametrize("bad", ["massl.memory_size", "massl.memory_size=1=2x", "memory_size=1",
                                 "a.b.c=1"])
def test_malformed_override_is_refused(bad):
    with pytest.raises(ConfigError):
        apply_overrides(Config(), [bad])


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("massl:\n  memory_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_load_config_validates(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("massl:\n  student_temp: 0\n")
    with pytest.raises(ConfigError, match="student_temp"):
        load_config(p)
    cfg = load_config(p, validate=False)  # opt-out still loads
    assert cfg.massl.student_temp == 0.0


# ---- validation messages ---------------------------------------------------------------

def test_memory_not_divisible_by_global_batch():
    msg = invalid("run.num_workers=3", "optim.batch_size_per_worker=64")
    assert "massl.memory_size (131072) must be divisible by the global batch" in msg
    assert "3 workers x 64 = 192" in msg


def test_memory_smaller_than_global_batch():
    msg = invalid("massl.memory_size=64", "massl.block_size=32", "optim.batch_size_per_worker=128")
    assert "massl.memory_size (64)" in msg and "128" in msg


def test_memory_not_divisible_by_block_size():
    msg = invalid("massl.block_size=3")
    assert "massl.memory_size (131072) must be divisible by massl.block_size (3)" in msg


def test_block_size_times_num_blocks_must_equal_memory():
    msg = invalid("massl.block_size=16384", "massl.num_blocks=4")
    assert "massl.block_size (16384) x massl.num_blocks (4)" in msg
    assert "massl.memory_size (131072)" in msg


def test_block_size_and_num_blocks_may_agree():
    cfg = apply_overrides(Config(), ["massl.block_size=16384", "massl.num_blocks=8"]).validate()
    assert cfg.block_size == 16384 and cfg.num_blocks == 8


def test_num_blocks_only_derives_block_size():
    cfg = apply_overrides(Config(), ["massl.block_size=null", "massl.num_blocks=4"]).validate()
    assert cfg.massl.block_size is None
    assert cfg.block_size == 131072 // 4 and cfg.num_blocks == 4


def test_num_blocks_must_divide_memory():
    msg = invalid("massl.block_size=null", "massl.num_blocks=3")
    assert "massl.memory_size (131072) must be divisible by massl.num_blocks (3)" in msg


def test_neither_block_size_nor_num_blocks():
    msg = invalid("massl.block_size=null", "massl.num_blocks=null")
    assert "massl.block_size" in msg and "massl.num_blocks" in msg


@pytest.mark.parametrize("override, expected", [
    ("crops.global_size=200", "crops.global_size (200) must be a multiple of model.patch_size (16)"),
    ("crops.local_size=90", "crops.local_size (90) must be a multiple of model.patch_size (16)"),
    ("model.patch_size=0", "model.patch_size (0) must be positive"),
])
def test_crop_size_multiple_of_patch(override, expected):
    assert expected in invalid(override)


@pytest.mark.parametrize("key, value", [
    ("student_temp", "0"), ("student_temp", "-0.1"),
    ("teacher_temp", "0"), ("teacher_temp", "-0.07"),
    ("warmup_teacher_temp", "0"),
])
def test_non_positive_temperatures(key, value):
    msg = invalid(f"massl.{key}={value}")
    assert f"massl.{key} ({float(value)}) must be positive" in msg


@pytest.mark.parametrize("value", ["-0.01", "1.5"])
def test_momentum_outside_unit_interval(value):
    msg = invalid(f"massl.momentum_teacher={value}")
    assert f"massl.momentum_teacher ({float(value)}) must be in [0, 1]" in msg


@pytest.mark.parametrize("value", ["0", "1"])
def test_momentum_bounds_are_inclusive(value):
    apply_overrides(Config(), [f"massl.momentum_teacher={value}"]).validate()


@pytest.mark.parametrize("override, expected", [
    ("crops.flip_p=1.5", "crops.flip_p (1.5) must be a probability in [0, 1]"),
    ("crops.jitter_p=-0.1", "crops.jitter_p (-0.1) must be a probability"),
    ("crops.grayscale_p=2", "crops.grayscale_p (2.0) must be a probability"),
    ("crops.blur_p=[1.0,0.1,1.5]", "crops.blur_p[2] (1.5) must be a probability"),
    ("crops.solarize_p=[-0.5,0.2,0.0]", "crops.solarize_p[0] (-0.5) must be a probability"),
])
def test_probabilities_outside_unit_interval(override, expected):
    assert expected in invalid(override)


def test_bad_precision():
    msg = invalid("optim.precision=fp8")
    assert "optim.precision ('fp8') must be one of fp32, bf16, fp16" in msg


def test_fp16_needs_gpu():
    msg = invalid("optim.precision=fp16", "run.use_gpu=false")
    assert "optim.precision fp16 needs run.use_gpu=true" in msg
    # with a GPU requested it validates; bf16 is fine on CPU
    apply_overrides(Config(), ["optim.precision=fp16", "run.use_gpu=true"]).validate()
    apply_overrides(Config(), ["optim.precision=bf16"]).validate()


@pytest.mark.parametrize("override, expected", [
    ("crops.global_scale=[0.8,0.3]", "crops.global_scale (0.8, 0.3) must satisfy 0 < low <= high"),
    ("crops.local_scale=[0.0,0.3]", "crops.local_scale (0.0, 0.3) must satisfy 0 < low <= high"),
    ("crops.blur_sigma=[2.0,0.1]", "crops.blur_sigma (2.0, 0.1) must satisfy 0 < low <= high"),
    ("crops.global_scale=[0.5,1.5]", "crops.global_scale upper bound must be <= 1"),
])
def test_bad_scale_tuples(override, expected):
    assert expected in invalid(override)


def test_init_from_must_exist(tmp_path):
    missing = tmp_path / "w.pt"
    msg = invalid(f"model.init_from={missing}")
    assert f"model.init_from ({missing}) is not a file" in msg


def test_all_errors_are_listed():
    msg = invalid("massl.student_temp=0", "massl.momentum_teacher=2", "crops.flip_p=3",
                  "optim.precision=fp8", "crops.global_size=200")
    assert msg.startswith("invalid configuration:")
    for part in ("massl.student_temp (0.0)", "massl.momentum_teacher (2.0)", "crops.flip_p (3.0)",
                 "optim.precision ('fp8')", "crops.global_size (200)"):
        assert part in msg
    assert len(re.findall(r"^  - ", msg, flags=re.M)) == 5


# ---- round trips -----------------------------------------------------------------------

def test_to_dict_round_trips(tiny_config):
    for cfg in (Config(), tiny_config("crops.global_scale=[0.4,1.0]", "optim.precision=bf16",
                                      "massl.block_size=null", "massl.num_blocks=2")):
        d = cfg.to_dict()
        # plain data only: tuples became lists
        assert d["crops"]["global_scale"] == list(cfg.crops.global_scale)
        back = config_from_dict(d, validate=False)
        assert back == cfg
        assert isinstance(back.crops.mean, tuple)
        assert back.to_dict() == d


def test_dump_config_round_trips(tmp_path, tiny_config):
    cfg = tiny_config("run.name=dumped", "crops.local_scale=[0.1,0.3]")
    p = tmp_path / "resolved.yaml"
    dump_config(cfg, p)
    assert load_config(p) == cfg


def test_the_removed_stream_order_is_refused_saying_why():
    msg = invalid("data.order=stream")
    assert "data.order=stream" in msg and "removed" in msg and "section 11" in msg

