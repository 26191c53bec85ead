"""Object storage proven against a real S3 server (moto's, on loopback), as a user runs it.

Also, Ray-free: the control points' own time (``control_s`` in metrics.jsonl), which the
production runs on object storage report.
"""

from __future__ import annotations

import pytest

from massl_ray.train.loop import ControlPoints, LoopContext


# ---- control_s: the seconds of the control points themselves (Ray-free) --------------------

class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _PollCtx(LoopContext):
    """Rank 0 at a control point: each poll (the barrier) takes ``poll_s`` on ``clock``."""

    def __init__(self, clock: _Clock, poll_s: float):
        self.clock, self.poll_s, self.polls = clock, poll_s, 0

    def batches(self, epoch, skip):  # pragma: no cover - not used here
        raise NotImplementedError

    def latest_state(self):  # pragma: no cover
        return None

    def report(self, metrics, state):  # pragma: no cover
        pass

    def preemption_notice(self):
        self.polls += 1
        self.clock.t += self.poll_s
        return None


@pytest.mark.parametrize("poll_s", [0.0, 4.0])
def test_control_seconds_count_the_polls_not_the_steps_between_them(poll_s):
    # 300 steps of 0.5 s, a poll about every 5 s taking poll_s each: control_s is the polls'
    # time only (the old code summed the intervals between polls: ~150 s here)
    clock = _Clock()
    cp = ControlPoints(0, every_s=5.0, poll=True, checkpoint_every_s=0, clock=clock)
    ctx = _PollCtx(clock, poll_s)
    for step in range(300):
        if cp.due(step):
            cp.decide(step, ctx)
        clock.t += 0.5
    assert cp.polls == ctx.polls > 20
    assert cp.seconds == pytest.approx(poll_s * ctx.polls, abs=1e-9)


# ---- the checkpoint code on S3, in this process (Ray-free) ---------------------------------

def _tiny_state(step: int) -> dict:
    import torch

    return {"format": 1, "global_step": step, "w": torch.arange(1000, dtype=torch.float32) + step}


def test_checkpoint_code_reads_s3_like_a_local_directory(s3_server, tmp_path, caplog):
    from massl_ray.method.checkpoint import (CheckpointError, copy_checkpoint,
                                            latest_valid_checkpoint, list_checkpoints,
                                            load_checkpoint, load_latest_valid_checkpoint,
                                            read_meta, save_checkpoint, verify_checkpoint)

    bucket = s3_server.bucket("ckpt-code")
    root = f"s3://{bucket}/runs/r"
    assert list_checkpoints(root) == [] and latest_valid_checkpoint(root) is None
    for step in (2, 4, 6):
        local = save_checkpoint(_tiny_state(step), tmp_path / f"c{step}")
        copy_checkpoint(local, f"{root}/checkpoint_{step:09d}")
    names = [f"{root}/checkpoint_{s:09d}" for s in (6, 4, 2)]
    assert list_checkpoints(root) == names  # newest first, URIs in, URIs out
    assert read_meta(names[0])["global_step"] == 6 and verify_checkpoint(names[1])["bytes"] > 0
    assert load_checkpoint(names[2])["global_step"] == 2
    # the newest corrupt (one flipped byte), the next incomplete (no meta.json): the third wins
    key6 = f"runs/r/checkpoint_{6:09d}/state.pt"
    data = bytearray(s3_server.get(bucket, key6))
    data[len(data) // 2] ^= 0xFF
    s3_server.put(bucket, key6, bytes(data))
    s3_server.client.delete_object(Bucket=bucket, Key=f"runs/r/checkpoint_{4:09d}/meta.json")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(names[0])
    caplog.clear()
    assert latest_valid_checkpoint(root) == names[2]
    found, state = load_latest_valid_checkpoint(root)
    assert found == names[2] and state["global_step"] == 2
    said = caplog.text
    assert f"skipping broken checkpoint: checkpoint {names[0]}: state.pt fails its sha256" in said
    assert f"skipping broken checkpoint: checkpoint {names[1]} is incomplete" in said
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(f"{root}/checkpoint_never")


def test_write_probe_refuses_a_missing_bucket_in_one_line(s3_server):
    from massl_ray.method.checkpoint import probe_writable

    bucket = s3_server.bucket("probe-ok")
    probe_writable(f"s3://{bucket}/runs/r")
    assert not [k for k in s3_server.keys(bucket) if ".write_probe_" in k]  # deleted again
    with pytest.raises(OSError, match="bucket") as ei:
        probe_writable("s3://no-such-bucket-here/runs/r")
    assert "\n" not in str(ei.value)
