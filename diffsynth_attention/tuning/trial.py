"""The state one tuning works on: a :class:`Trial` (the call, the policy, the fp32 reference,
private copies of the inputs, every candidate's result) and a :class:`Run` per candidate that
passed the gate. The steps of :mod:`.tuner` read and fill these; nothing else is shared."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..store.decision import Candidate
from .policy import TuningPolicy
from .timing import Timer

logger = logging.getLogger("diffsynth_attention")


@dataclass
class TuneInputs:
    """What the tuner needs about the call that triggered it."""

    q: torch.Tensor  # the caller's tensors, in the caller's layout
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]  # the caller's attn_mask
    mask4: Optional[torch.Tensor]  # the same, viewed with 4 dims
    canonical: tuple  # (q, k, v) as b n s d views of the caller's tensors
    scale: Optional[float]
    causal: bool
    window: Optional[int]
    out_pattern: str
    heads_q: int
    head_dim_v: int
    requires_grad: bool
    to_canonical: Optional[tuple] = None  # three callables: caller layout -> b n s d (to gate on random inputs)


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

    def sample_cost_s(self) -> float:
        """Seconds one round sample of it takes (with its untimed warm call when short), from its
        latest sample: when the machine slows down mid-way, the rounds stop sooner."""
        last = self.rounds[-1] if self.rounds else self.probe_ms
        return (self.calls + (1 if self.calls > 1 else 0)) * last / 1e3


@dataclass
class Trial:
    inputs: TuneInputs
    key: object
    policy: TuningPolicy
    make_runner: Callable
    timer: Timer
    started: float  # policy.clock() when tuning began
    tolerance: float
    floor_s: float  # the budget's floor
    ref: torch.Tensor  # fp32 reference on the gate slice
    heads: list  # the gate slice's query heads
    copies: list  # private copies of q, k, v (the caller's are never touched)
    problem: object = None
    dev: object = None
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
    def grad(self) -> bool:
        return self.inputs.requires_grad

    @property
    def device(self) -> torch.device:
        return self.inputs.q.device

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


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` with NaN equal to NaN (a candidate that leaves a NaN input alone did not modify it)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not (a.is_floating_point() or a.is_complex()):
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


def random_like(t: torch.Tensor) -> torch.Tensor:
    """Random values of ``t``'s shape, dtype, device and strides."""
    try:
        r = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        r.normal_()
    except RuntimeError:  # overlapping strides (an expanded tensor): a dense one
        r = torch.randn(t.shape, dtype=t.dtype, device=t.device)
    return r.requires_grad_(t.requires_grad)


def finite_inputs(inputs: TuneInputs) -> TuneInputs:
    """The inputs to gate on: the caller's if finite; else random ones of the same shape, dtype
    and layout (a NaN or Inf in the caller's data would reject every candidate)."""
    if inputs.to_canonical is None or all(bool(torch.isfinite(t.detach()).all()) for t in (inputs.q, inputs.k, inputs.v)):
        return inputs
    logger.info("the tuning call's q/k/v are not finite: gating the candidates on random inputs of the same layout")
    q, k, v = (random_like(t) for t in (inputs.q, inputs.k, inputs.v))
    canonical = tuple(f(t) for f, t in zip(inputs.to_canonical, (q, k, v)))
    return dataclasses.replace(inputs, q=q, k=k, v=v, canonical=canonical)


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


def restore(copies: list, inputs: TuneInputs) -> None:
    with torch.no_grad():
        for c, t in zip(copies, (inputs.q, inputs.k, inputs.v)):
            if not same(c, t):
                c.copy_(t)


def recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - a sticky CUDA error; nothing more to do here
            pass
