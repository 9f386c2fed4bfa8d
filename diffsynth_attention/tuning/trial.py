"""The state one tuning works on: a :class:`Trial` (the call, the policy, the fp32 reference,
the inputs the candidates run on, every candidate's result) and a :class:`Run` per candidate
that passed the gate. The steps of :mod:`.tuner` read and fill these; nothing else is shared.

The call is the dispatcher's :class:`~diffsynth_attention.problem.Call`, as :func:`prepare` made
it. Its tensors are the caller's: the candidates run on private copies (the caller's are never
touched), and a change to a copy is found by comparing it with the caller's. Or they are random
stand-ins made for the tuning (``Call.synthetic``: a trace's shapes, or a non-finite call's):
then the candidates run on them, with no second copy, and a change is found from row sums taken
before the first candidate ran (:func:`fingerprint`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..store.decision import Candidate
from .policy import TuningPolicy
from .reference import reference_slice
from .timing import Timer

logger = logging.getLogger("diffsynth_attention")


@dataclass
class Result:
    """A candidate's result while it is being tuned (mutable; :meth:`freeze` gives the stored
    :class:`~diffsynth_attention.store.decision.Candidate`)."""

    status: str
    time_ms: Optional[float] = None
    error: Optional[float] = None
    reason: Optional[str] = None
    first_call_ms: Optional[float] = None
    reps: int = 0
    predicted_ms: Optional[float] = None
    host_ms: Optional[float] = None
    device_ms: Optional[float] = None

    def freeze(self) -> Candidate:
        return Candidate(**dataclasses.asdict(self))


@dataclass
class Run:
    """A candidate that passed the gate: its bound call and every time measured of it (ms per call)."""

    backend: object
    cand: object  # its store.decision.Candidate, filled as the steps go
    call: Callable  # what a hit runs, bound to the private copies (forward and backward when grads are needed)
    calls: int = 1  # back-to-back calls per sample (1: a long call)
    probe_ms: Optional[float] = None  # the warm probe: the lower of the two samples that ended warm-up
    settled: bool = False  # two consecutive warm-up samples agreed (else warm-up stopped at the cap)
    warm: list = field(default_factory=list)
    second_look: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    host: list = field(default_factory=list)  # host ms per call of each round sample (GPU only)
    device: list = field(default_factory=list)  # device ms per call of each round sample (GPU only)

    def take(self, sample) -> float:
        """Record one round :class:`~.timing.Sample`; its back-to-back ms per call."""
        self.rounds.append(sample.ms)
        if sample.host_ms is not None and sample.device_ms is not None:
            self.host.append(sample.host_ms)
            self.device.append(sample.device_ms)
        return sample.ms

    @property
    def name(self) -> str:
        return self.backend.name

    def sample_cost_s(self, cuda: bool = False) -> float:
        """Seconds one round sample of it takes (with its untimed warm call when short), from its
        latest sample: when the machine slows down mid-way, the rounds stop sooner. On a GPU
        (``cuda``: :meth:`~.timing.Timer.measure`) a sample is two bursts: the eager one, then the GPU
        held for 1.5x the burst's host time (+ 0.05 ms) and the burst again (its device time); before
        any round sample, host and device are taken as the eager time (a host-bound call's cost)."""
        last = self.rounds[-1] if self.rounds else self.probe_ms
        eager = (self.calls + (1 if self.calls > 1 else 0)) * last
        if not cuda:
            return eager / 1e3
        host = self.host[-1] if self.host else last
        device = self.device[-1] if self.device else last
        return (eager + 1.5 * host * self.calls + 0.05 + device * self.calls) / 1e3


@dataclass
class Trial:
    call: object  # the problem.Call being tuned: problem, layout, scale, its tensors
    key: object
    policy: TuningPolicy
    make_runner: Callable
    timer: Timer
    started: float  # policy.clock() when tuning began
    tolerance: float
    floor_s: float  # the budget's floor
    ref: torch.Tensor  # fp32 reference on the gate slice
    heads: list  # the gate slice's query heads
    copies: list  # what the candidates run on: private copies of q, k, v, or a synthetic call's own
    dev: object = None
    fingerprints: Optional[list] = None  # a synthetic call: row sums of q, k, v before any candidate ran
    predictions: dict = field(default_factory=dict)  # name -> predicted ms
    memory_skips: dict = field(default_factory=dict)  # name -> reason
    results: dict = field(default_factory=dict)  # name -> Result, every candidate
    runs: dict = field(default_factory=dict)  # name -> Run, those that passed the gate and warmed up
    setup_s: float = 0.0  # imports, compilation (first calls, a backward's first call) and warm-up: outside the budget
    timing_from: Optional[float] = None  # policy.clock() when the probe step began: the budget counts from here
    # Low-precision candidates of a quality tier: name -> check(output slice, reference, whole output
    # as b n s d) -> None or why it fails the tier's bound; it replaces the dtype's tolerance for them
    # (dispatch/lowprec.py).
    bounds: dict = field(default_factory=dict)

    @property
    def problem(self):
        return self.call.problem

    @property
    def grad(self) -> bool:
        return self.call.grad

    @property
    def device(self) -> torch.device:
        return self.call.q.device

    @functools.cached_property
    def order(self) -> tuple:
        """The tie-break order on this trial's device (``backends.preference_on``)."""
        from ..backends import device_info, preference_on

        return preference_on((self.dev or device_info(self.device)).capability)  # the key's device where set

    def changed(self) -> list:
        """The names of the inputs a candidate modified in place (``"q"``, ``"k"``, ``"v"``)."""
        if self.fingerprints is not None:
            now = [fingerprint(c) for c in self.copies]
            return [n for n, a, b in zip("qkv", now, self.fingerprints) if not same(a, b)]
        originals = (self.call.q, self.call.k, self.call.v)
        return [n for n, c, t in zip("qkv", self.copies, originals) if not same(c.detach(), t.detach())]

    def restore(self) -> None:
        """The inputs as they were before a candidate raised or modified them: the caller's values
        copied back, or, for a synthetic call (whose values were never kept), new random values
        and the reference computed again on them."""
        with torch.no_grad():
            if self.fingerprints is None:
                for c, t in zip(self.copies, (self.call.q, self.call.k, self.call.v)):
                    if not same(c, t):
                        c.copy_(t)
                return
            if not self.changed():
                return
            for c in self.copies:
                fill_random(c)
            self.fingerprints = [fingerprint(c) for c in self.copies]
            self.ref = self.reference()

    def reference(self) -> torch.Tensor:
        """The fp32 reference on the gate slice, from the inputs the candidates run on."""
        c, p = self.call, self.call.problem
        with torch.no_grad():
            return reference_slice(*c.canonical, c.mask4, c.scale, p.causal, p.window, self.heads)

    def spent(self) -> float:
        """Seconds of tuning so far that count against the budget: the timing after every candidate
        is warm (second looks and rounds). Setup before it (the reference, kernel-package imports,
        first calls, warm-up) never counts, however long: a 7 s import must not crowd out the rounds."""
        if self.timing_from is None:
            return 0.0
        return self.policy.clock() - self.timing_from

    def best_probe(self) -> Optional[float]:
        return min((r.probe_ms for r in self.runs.values()), default=None)

    def limit(self, fastest_ms: Optional[float]) -> float:
        return self.policy.limit(self.floor_s, fastest_ms)

    def timings(self) -> dict:
        """Every candidate's times, for listeners: name -> first call, warm-up samples, second
        look, round samples (ms per call) and the time recorded in the decision."""
        out = {}
        for name, cand in self.results.items():
            run = self.runs.get(name)
            out[name] = {"status": cand.status, "time_ms": cand.time_ms, "first_call_ms": cand.first_call_ms,
                         "warm": list(run.warm) if run else [], "second_look": list(run.second_look) if run else [],
                         "rounds": list(run.rounds) if run else []}
        return out


def decision_timings(decision) -> dict:
    """A known decision's times in the shape of :meth:`Trial.timings` (samples are not stored)."""
    return {name: {"status": c.status, "time_ms": c.time_ms, "first_call_ms": c.first_call_ms, "warm": [],
                   "second_look": [], "rounds": []} for name, c in decision.candidates.items()}


# -- helpers of the gate ----------------------------------------------------------------------------------
def copy_input(t: torch.Tensor, grad: bool) -> torch.Tensor:
    c = t.detach().clone()  # preserve_format: a dense tensor keeps the caller's strides
    return c.requires_grad_(grad and t.requires_grad)


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Row sums of ``t`` (over its last dim, in its dtype): what tells a modified input from an
    intact one where no copy of it is kept, at a fraction of its size."""
    return t.detach().sum(dim=-1)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` with NaN equal to NaN (a candidate that leaves a NaN input alone did not modify it)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not (a.is_floating_point() or a.is_complex()):
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


def random_like(t: torch.Tensor) -> torch.Tensor:
    """Random values of ``t``'s shape, dtype, device, strides and ``requires_grad`` (``t`` may be a
    fake tensor of a trace: only its metadata is read). The random stand-ins of a trace and of a
    non-finite call."""
    shape, stride = tuple(t.shape), tuple(t.stride())
    if _overlaps(shape, stride):  # an expanded tensor cannot be filled in place: a dense one
        r = torch.randn(shape, dtype=t.dtype, device=t.device)
    else:
        r = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device).normal_()
    return r.requires_grad_(t.requires_grad)


def _overlaps(shape: tuple, stride: tuple) -> bool:
    """Whether two elements of a tensor of ``shape`` and ``stride`` share memory."""
    size = 1
    for n, st in sorted(zip(shape, stride), key=lambda x: x[1]):
        if n > 1 and st < size:
            return True
        size = max(size, st * n)
    return False


def fill_random(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.normal_()


def finite_inputs(call):
    """The call to gate on: the caller's if its q, k, v are finite; else the same call on random
    stand-ins of the same shape, dtype and layout (a NaN or Inf in the caller's data would reject
    every candidate). A float mask with NaN or +inf (-inf masks a key) is gated with those entries
    as 0: its every candidate was rejected, so no decision was stored and each call tuned again."""
    mask = call.mask
    if mask is not None and mask.is_floating_point():
        m = mask.detach()
        if bool((torch.isnan(m) | (m == float("inf"))).any()):
            logger.info("the tuning call's attn_mask has NaN or +inf: gating the candidates with those entries as 0")
            mask = m.nan_to_num(nan=0.0, posinf=0.0, neginf=float("-inf")).requires_grad_(mask.requires_grad)
    if call.synthetic or all(bool(torch.isfinite(t.detach()).all()) for t in (call.q, call.k, call.v)):
        return call if mask is call.mask else call.on(call.q, call.k, call.v, mask, synthetic=call.synthetic)
    logger.info("the tuning call's q/k/v are not finite: gating the candidates on random inputs of the same layout")
    return call.on(random_like(call.q), random_like(call.k), random_like(call.v), mask)


def describe_exception(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"out of memory: {text}"
    return f"raised {type(exc).__name__}: {text}"


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can still get on ``device``: the driver's free memory plus what
    PyTorch's caching allocator holds unused (None where unknown)."""
    try:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:  # no driver, no /proc: no memory skip
        return None
    return None


def recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - a sticky CUDA error; nothing more to do here
            pass
