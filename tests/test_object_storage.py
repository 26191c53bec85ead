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
