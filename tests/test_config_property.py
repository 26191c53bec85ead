"""Property test: any mix of config values is either a valid config or a ConfigError that names
a key and a rule; never a traceback from deep inside."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from massl_ray.config import Config, ConfigError, apply_overrides

NUMERIC_KEYS = [
    "massl.memory_size", "massl.block_size", "massl.num_blocks", "massl.student_temp",
    "massl.teacher_temp", "massl.momentum_teacher", "massl.warmup_teacher_temp",
    "model.patch_size", "model.drop_path_rate", "model.embed_dim", "model.num_heads",
    "crops.global_size", "crops.local_size", "crops.num_local_crops", "crops.flip_p",
    "crops.hue", "optim.lr", "optim.min_lr", "optim.epochs", "optim.batch_size_per_worker",
    "optim.warmup_epochs", "optim.clip_grad", "run.num_workers", "run.log_every_steps",
    "data.decode_cpus", "data.decode_batch_size",
]
values = st.one_of(
    st.integers(-10, 300000), st.floats(-10, 1e6), st.sampled_from(["nan", "inf", "-inf"]),
    st.sampled_from(["abc", "null", "", "[1, 2]", "true"]),
)
KEY_RE = re.compile(r"\b(massl|model|crops|optim|run|data)\.[a-z_]+")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(NUMERIC_KEYS), values), min_size=1, max_size=6))
def test_random_configs_are_valid_or_refused_naming_a_key(pairs):
    cfg = Config()
    try:
        apply_overrides(cfg, [f"{k}={v}" for k, v in pairs])
        cfg.validate()
    except ConfigError as e:
        msg = str(e)
        assert KEY_RE.search(msg) or "one of" in msg, msg
        return
    # Valid: the derived quantities the trainer uses are consistent.
    assert cfg.massl.memory_size % cfg.global_batch_size == 0
    assert cfg.massl.memory_size % cfg.block_size == 0
    assert cfg.crops.global_size % cfg.model.patch_size == 0
    assert cfg.massl.student_temp > 0 and 0 <= cfg.massl.momentum_teacher <= 1
