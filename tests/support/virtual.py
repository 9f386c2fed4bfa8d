"""A virtual clock for the tuner, and fake backends that spend virtual time.

The tuner reads its :class:`TuningPolicy`'s ``clock`` for the budget and for CPU samples; the
tests give it a :class:`VirtualClock`, which only the fake backends advance. Timings, noise and
warm-up included, are then a deterministic function of the fakes' cost schedules and seeds:
tests assert on decisions without depending on this machine's speed or load. A fake computes
its output once per set of inputs and returns that prepared tensor afterwards, so a test that
makes thousands of timed calls runs no attention at all after the first.
"""
import atexit
import random
import shutil
import tempfile

from diffsynth_attention.backends import PREFERENCE, REGISTRY
from diffsynth_attention.backends.torch_sdpa import TorchSDPA
from diffsynth_attention.tuning.policy import TuningPolicy


class VirtualClock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def advance(self, ms):
        self.now += ms / 1e3


class VFake(TorchSDPA):
    """A CPU backend under a reserved name. Call i costs ``warmup[i]`` virtual ms while i is
    within ``warmup`` (compilation and first calls), then what ``schedule(i)`` says, else ``cost``;
    times a noise factor drawn from a seeded generator (uniform in [1 - noise, 1 + noise]).
    ``inaccurate``: a relative L1 error added to its output (True: 0.05). ``import_ms``: what its
    first ``unavailable_reason()`` costs (the kernel package's import, at first use)."""

    devices = frozenset({"cpu"})

    def __init__(self, name, clock, cost=1.0, noise=0.0, seed=0, schedule=None, warmup=(), predicted_ms=None,
                 predicted_bytes=None, inaccurate=0.0, import_ms=0.0):
        super().__init__()
        self.import_ms = import_ms
        self.name = name
        self.clock = clock
        self.cost = cost
        self.noise = noise
        self.rng = random.Random(f"{name}-{seed}")
        self.schedule = schedule
        self.warmup = tuple(warmup)
        self.calls = 0
        self.costs = []  # every call's virtual ms
        self._pred_ms = predicted_ms
        self._pred_bytes = predicted_bytes
        self.inaccurate = 0.05 if inaccurate is True else float(inaccurate)
        self._prepared = None  # (inputs kept alive, their identity, output)

    def predicted_ms(self, p, dev):
        return self._pred_ms

    def unavailable_reason(self):
        if self.import_ms:  # the first use imports the package
            self.clock.advance(self.import_ms)
            self.import_ms = 0.0
        return super().unavailable_reason()

    def predicted_bytes(self, p):
        return 0 if self._pred_bytes is None else self._pred_bytes

    def bind(self, p, need_grad, scale_is_none=False):  # the generic runner: every call goes through forward
        forward, causal, window = self.forward, p.causal, p.window

        def run(q, k, v, mask, scale):
            return forward(q, k, v, mask, scale, causal, window, need_grad)
        return run

    def _output(self, q, k, v, mask, scale, causal, window, need_grad):
        if need_grad:  # autograd needs a graph: really compute
            return self._compute(q, k, v, mask, scale, causal, window, need_grad)
        tensors = (q, k, v) + ((mask,) if mask is not None else ())
        ident = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t._version) for t in tensors) + (scale, causal, window)
        if self._prepared is None or self._prepared[1] != ident:  # the kept tensors pin the addresses: no reuse
            self._prepared = (tensors, ident, self._compute(q, k, v, mask, scale, causal, window, need_grad))
        return self._prepared[2]

    def _compute(self, q, k, v, mask, scale, causal, window, need_grad):
        out = super().forward(q, k, v, mask, scale, causal, window, need_grad)
        if self.inaccurate:
            out = out + self.inaccurate * out.abs().mean()
        return out

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        i = self.calls
        cost = self.warmup[i] if i < len(self.warmup) else (self.schedule(i) if self.schedule else self.cost)
        cost *= 1 + self.noise * (2 * self.rng.random() - 1)
        self.calls += 1
        self.costs.append(cost)
        self.clock.advance(cost)
        return self._output(q, k, v, mask, scale, causal, window, need_grad)


class Off(TorchSDPA):
    """A registry entry that is never a candidate here."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def declared_reason(self):
        return "switched off by the test"

    def unavailable_reason(self):
        return "switched off by the test"


def only(monkeypatch, clock, **fakes):
    """Make the registry hold exactly ``fakes`` ({name: VFake kwargs}) as candidates, all spending
    time on ``clock``; return {name: VFake}."""
    made = {}
    for name in PREFERENCE:
        if name in fakes:
            made[name] = VFake(name, clock, **fakes[name])
            monkeypatch.setitem(REGISTRY, name, made[name])
        else:
            monkeypatch.setitem(REGISTRY, name, Off(name))
    return made


def virtual_policy(clock, budget=5.0, **changes) -> TuningPolicy:
    """The default policy on ``clock`` with a budget floor of ``budget`` seconds."""
    return TuningPolicy(clock=clock.perf_counter, budget_s=budget, **changes)


class Heard:
    """A policy listener that keeps what it hears: (key id, decision, timings, cache_hit)."""

    def __init__(self):
        self.events = []

    def __call__(self, key, decision, timings, cache_hit):
        self.events.append((key.id, decision, timings, cache_hit))


def dispatcher(policy):
    """A dispatcher of its own with ``policy``, over a fresh cache folder."""
    import diffsynth_attention as da

    folder = tempfile.mkdtemp(prefix="da-virtual-")
    atexit.register(shutil.rmtree, folder, True)  # the suite makes ~80 of them: none left behind
    return da.Dispatcher(da.DecisionCache(folder), policy=policy)


def tune_virtual(monkeypatch, q, k, v, budget=5.0, policy=None, **fakes):
    """Tune (q, k, v) over ``fakes`` on a virtual clock: (explanation, {name: VFake}, Heard)."""
    clock = VirtualClock()
    made = only(monkeypatch, clock, **fakes)
    heard = Heard()
    policy = (policy or virtual_policy(clock, budget)).replace(clock=clock.perf_counter, listeners=(heard,))
    info = dispatcher(policy).explain(q, k, v)
    return info, made, heard


def confirming(monkeypatch) -> dict:
    """{"confirming": bool}, set once the tuner's confirmation (its paired re-time) starts."""
    from diffsynth_attention.tuning import tuner

    state = {"confirming": False}
    real = tuner.confirm

    def confirm(trial, winners):
        state["confirming"] = True
        return real(trial, winners)
    monkeypatch.setattr(tuner, "confirm", confirm)
    return state


def tune_rounds_then_retime(monkeypatch, in_rounds: float, in_retime: float, rival: str = "torch_math"):
    """Tune torch (cost 1.0) against a ``rival`` costing ``in_rounds`` in the rounds and ``in_retime``
    once the confirmation's re-time starts; returns the decision."""
    from support.helpers import qkv

    state = confirming(monkeypatch)
    q, k, v = qkv(sq=16)
    info, _, _ = tune_virtual(monkeypatch, q, k, v, torch={"cost": 1.0},
                              **{rival: {"schedule": lambda i: in_retime if state["confirming"] else in_rounds}})
    return info.decision


def gpu_timer(host_share: float = 0.2):
    """A tuner Timer class that samples as the GPU timer does, on the tuner's virtual clock (the
    policy's, which the fakes advance): a round sample is a burst of back-to-back calls (the eager
    time), then the GPU held for 1.5 x the host time of the burst (+ 0.05 ms) and the same burst
    again (the device time). Host time: ``host_share`` of the eager time. Install it with
    ``monkeypatch.setattr(tuner, "Timer", gpu_timer())``."""
    from diffsynth_attention.tuning.timing import Sample, Timer

    class GPUTimer(Timer):
        def __init__(self, device, clock_fn):
            super().__init__(device, clock_fn)
            self.cuda = True
            self.virtual = clock_fn.__self__  # the VirtualClock whose perf_counter the policy reads

        def sync(self):
            pass

        def sample(self, fn, calls, warm=True):
            if warm:
                fn()
            t0 = self.clock()
            for _ in range(calls):
                fn()
            return (self.clock() - t0) * 1e3 / calls

        def measure(self, fn, calls, warm=True):
            ms = self.sample(fn, calls, warm)
            self.virtual.advance(host_share * ms * calls * 1.5 + 0.05)  # the hold
            t0 = self.clock()
            for _ in range(calls):
                fn()
            return Sample(ms, host_share * ms, (self.clock() - t0) * 1e3 / calls)
    return GPUTimer
