"""A virtual clock for the tuner, and fake backends that spend virtual time.

The tuner reads ``time.perf_counter`` for its budget and the CPU :class:`Timer` for its samples;
both are pointed at one :class:`VirtualClock`, which only the fake backends advance. Timings,
noise included, are then a deterministic function of the fakes' cost schedules and seeds:
tests assert on decisions without depending on this machine's speed or load.
"""
import random
import types

from diffsynth_attention.backends import PREFERENCE, REGISTRY
from diffsynth_attention.backends.torch_sdpa import TorchSDPA


class VirtualClock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def advance(self, ms):
        self.now += ms / 1e3


class VFake(TorchSDPA):
    """A CPU backend under a reserved name whose every call costs ``cost`` virtual ms times a
    noise factor drawn from a seeded generator (uniform in [1 - noise, 1 + noise]), or what
    ``schedule(call_index)`` says."""

    devices = frozenset({"cpu"})

    def __init__(self, name, clock, cost=1.0, noise=0.0, seed=0, schedule=None, predicted_ms=None,
                 predicted_bytes=None, inaccurate=False):
        super().__init__()
        self.name = name
        self.clock = clock
        self.cost = cost
        self.noise = noise
        self.rng = random.Random(f"{name}-{seed}")
        self.schedule = schedule
        self.calls = 0
        self._pred_ms = predicted_ms
        self._pred_bytes = predicted_bytes
        self.inaccurate = inaccurate

    def predicted_ms(self, p, dev):
        return self._pred_ms

    def predicted_bytes(self, p):
        return 0 if self._pred_bytes is None else self._pred_bytes

    def bind(self, p, need_grad, scale_is_none=False):  # the generic runner: every call goes through forward
        forward, causal, window = self.forward, p.causal, p.window

        def run(q, k, v, mask, scale):
            return forward(q, k, v, mask, scale, causal, window, need_grad)
        return run

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        cost = self.schedule(self.calls) if self.schedule else self.cost
        self.calls += 1
        self.clock.advance(cost * (1 + self.noise * (2 * self.rng.random() - 1)))
        out = super().forward(q, k, v, mask, scale, causal, window, need_grad)
        if self.inaccurate:
            out = out + 0.05 * out.abs().mean()
        return out


class Off(TorchSDPA):
    """A registry entry that is never a candidate here."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def declared_reason(self):
        return "switched off by the test"

    def unavailable_reason(self):
        return "switched off by the test"


def only(monkeypatch, clock, budget=5.0, **fakes):
    """Make the registry hold exactly ``fakes`` ({name: VFake kwargs}) as candidates, all timed on
    ``clock``; return {name: VFake}."""
    from diffsynth_attention.tuning import timing, tuner

    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(tuner, "time", fake_time)
    monkeypatch.setattr(timing, "time", fake_time)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING_BUDGET", str(budget))
    made = {}
    for name in PREFERENCE:
        if name in fakes:
            made[name] = VFake(name, clock, **fakes[name])
            monkeypatch.setitem(REGISTRY, name, made[name])
        else:
            monkeypatch.setitem(REGISTRY, name, Off(name))
    return made
