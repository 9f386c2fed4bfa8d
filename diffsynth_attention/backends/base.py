"""The backend base class: capabilities declared as attributes, one list of checks that both
selects backends and explains why one cannot serve a problem (the way PyTorch's sdp_utils does).

Availability has two levels, so that a process imports only the kernel packages it uses:

- *declared*: the package is installed (its distribution metadata, or a module that can be
  found without importing it) and the machine can run it. This is what selects candidates and
  builds the key (:meth:`Backend.declared_reason`, :meth:`Backend.declared_version`): no import.
- *loaded*: the package imported. That happens on first use (a plan that will call the
  backend, a tuning that will time it, ``available_backends()``): a broken install is found
  then, and the backend becomes unavailable with the reason (:meth:`Backend.unavailable_reason`).

Each backend also declares a rough cost model (:meth:`Backend.predicted_bytes`,
:meth:`Backend.predicted_ms`) that lets the tuner skip candidates that cannot fit or cannot win
without running them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .. import process
from . import loading
from ..callsite import dtype_name
from ..problem import Problem
from ..states import MaskKind

logger = logging.getLogger("diffsynth_attention")


@dataclass(frozen=True)
class DeviceInfo:
    """A device's identity for selection and for the key: its model, never its index."""

    type: str
    name: str
    capability: Optional[tuple] = None  # (major, minor) on CUDA
    sm_count: Optional[int] = None

    def as_dict(self) -> dict:
        out = {"type": self.type, "name": self.name}
        if self.capability is not None:
            out["capability"] = f"{self.capability[0]}.{self.capability[1]}"
            out["sm_count"] = self.sm_count
        return out


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo("cuda", props.name, (props.major, props.minor), props.multi_processor_count)


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_info(index)
    if device.type == "cpu":
        return DeviceInfo("cpu", f"{_cpu_name()} ({torch.get_num_threads()} threads)")
    return DeviceInfo(device.type, device.type)


def package_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_present(name: str) -> bool:
    """Whether module ``name`` could be imported, found without importing it (nor its parents).

    A module already in ``sys.modules`` counts; a submodule is looked for in its top-level
    package's folders (finding its spec would import the parent package)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    top, _, rest = name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    locations = list(spec.submodule_search_locations or [])
    first = rest.split(".")[0]
    return any(os.path.isdir(os.path.join(loc, first)) or os.path.isfile(os.path.join(loc, first + ".py")) for loc in locations)


# -- cost models ------------------------------------------------------------------------------
# Dense 16-bit tensor-core FLOP/s per SM and ms, by compute capability major (H100/H200 SXM:
# 989 TFLOP/s over 132 SMs; A100: 312 over 108; B200: 2250 over 148; Ada/consumer parts lower).
_FLOPS_PER_SM_MS = {7: 0.95e9, 8: 2.9e9, 9: 7.5e9, 10: 15.2e9, 11: 15.2e9, 12: 1.2e9}
_AMPERE_CONSUMER = 1.3e9  # 8.6 / 8.9 (RTX 30/40, L40S)


def peak_flops_per_ms(dev: Optional[DeviceInfo], dtype: torch.dtype) -> Optional[float]:
    """The device's dense peak in FLOP per ms for ``dtype`` (None where no model is known)."""
    if dev is None or dev.type != "cuda" or dev.capability is None or not dev.sm_count:
        return None
    major, minor = dev.capability
    per_sm = _AMPERE_CONSUMER if (major == 8 and minor > 0) else _FLOPS_PER_SM_MS.get(major)
    if per_sm is None:
        return None
    peak = per_sm * dev.sm_count
    if dtype == torch.float32:
        peak /= 16  # no TF32 in SDPA's kernels: CUDA-core FP32 is ~1/16 of 16-bit tensor cores
    elif dtype == torch.float64:
        peak /= 32
    return peak


def attention_flops(p: Problem) -> float:
    """Forward FLOPs of attention: 2 matmuls of 2*b*n*s_q*s_kv*d (halved when causal)."""
    flops = 2.0 * p.batch * p.heads_q * p.seq_q * p.seq_kv * (p.head_dim + p.head_dim_v)
    if p.causal:
        flops /= 2
    if p.window is not None:
        flops *= min(1.0, (2 * p.window + 1) / max(p.seq_kv, 1))
    if p.requires_grad:
        flops *= 3.5  # forward + backward (recomputation included)
    return flops


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Backend:
    """One attention kernel. Subclasses declare capabilities; ``forward`` takes ``b n s d`` views.

    ``forward(q, k, v, mask, scale, causal, window, need_grad)`` returns the output as a
    ``b n s d`` tensor (a view of the kernel's own layout). It must not modify q, k or v.
    """

    name: ClassVar[str]
    package: ClassVar[Optional[str]] = None  # the distribution to pip-install, if any
    extra: ClassVar[Optional[str]] = None  # this project's optional extra that installs it
    devices: ClassVar[frozenset] = frozenset({"cuda"})
    dtypes: ClassVar[frozenset] = frozenset({torch.float16, torch.bfloat16})
    head_dims: ClassVar[Optional[frozenset]] = None  # an explicit set, or None for a range
    min_head_dim: ClassVar[int] = 1
    max_head_dim: ClassVar[int] = 256
    head_dim_multiple: ClassVar[int] = 1
    same_head_dim_v: ClassVar[bool] = True  # head dim of v must equal that of q and k
    masks: ClassVar[frozenset] = frozenset()  # of MaskKind: bool, additive, additive_float32
    # Its backward gives a float attn_mask's gradient. A call that needs gradients with a float mask
    # is served only by such a backend: its key does not tell a learned mask from a constant one.
    mask_grad: ClassVar[bool] = False
    warm_devices: ClassVar[frozenset] = frozenset({"cuda"})  # first launches on the loading thread (.warmup)
    causal: ClassVar[bool] = True
    causal_any_lengths: ClassVar[bool] = True  # False: causal only when seq_q == seq_kv
    gqa: ClassVar[bool] = False
    window: ClassVar[bool] = False
    window_any_lengths: ClassVar[bool] = True
    backward: ClassVar[bool] = True
    min_capability: ClassVar[Optional[tuple]] = None
    capabilities: ClassVar[Optional[frozenset]] = None  # allowed major versions, if restricted
    output_layout: ClassVar[str] = "b n s d"  # the layout of the tensor behind forward's b n s d result
    exact: ClassVar[bool] = True  # False for quantized kernels (documented, not used to select)
    # 8-bit / FP8 kernels: candidates only in the balanced and fast quality tiers, gated there
    # by the tier's bound (quality.py); the exact tier never gates, times or chooses them.
    low_precision: ClassVar[bool] = False
    # The module that ``_load`` imports (found without importing it to tell "installed"); None:
    # nothing to import (PyTorch's own kernels).
    module: ClassVar[Optional[str]] = None
    # Cost model. ``efficiency``: the fraction of the device's 16-bit peak the kernel reaches on
    # long sequences; ``launch_ms``: host and launch cost of one call, the floor on short ones.
    # Calibrated on an H200 (shared/gpu/README.md) and kept generous: a candidate is skipped by
    # time only when its prediction is several times the best one (the tuner's SKIP_FACTOR).
    efficiency: ClassVar[float] = 0.3
    launch_ms: ClassVar[float] = 0.02
    # Compiled into a graph as PyTorch's own operators (the others: through one thin operator,
    # dispatch/compiled.py); and DiffSynth-Studio's fixed priority (1 first; None: not one of its routes).
    inlined_under_compile: ClassVar[bool] = False
    # Inlined as the very operator an eager call runs (not decomposed and fused by inductor, as
    # the math kernel's composite operator is): its eager time prices it in a graph (tuning/confirm.py).
    same_op_in_graph: ClassVar[bool] = False
    diffsynth_priority: ClassVar[Optional[int]] = None
    # The major CUDA capabilities the kernel was designed for (None: none in particular). In a tie
    # a kernel package native to the device ranks before the other packages (preference_on).
    native_majors: ClassVar[Optional[frozenset]] = None

    def __init__(self) -> None:
        self._loaded = False
        self._unavailable: Optional[str] = None
        self._version: Optional[str] = None
        self._declared: Optional[tuple] = None  # (reason or None, version or None), no import
        self._load_lock = process.new_rlock()  # one import per backend, also with a background load (loading.py)

    # -- availability -------------------------------------------------------------------
    def _load(self) -> None:
        """Import the kernel package; raise anything on failure. Set attributes for forward."""

    def _metadata_version(self) -> Optional[str]:
        """The installed distribution's version from its metadata (no import); None if absent."""
        return package_version(self.package) if self.package else None

    def _import_kernel(self, module_name: str, func_name: str, version: Optional[str] = None):
        """Import ``module_name`` and keep its ``func_name`` as the kernel (``self._func``) and the
        version: ``version``, else the declared one, else the module's own. Returns the module."""
        module = importlib.import_module(module_name)
        self._func = getattr(module, func_name)
        if version is None:
            declared = self.declared_version()
            version = declared if declared not in (None, "unknown") else None
        self._version = version or getattr(module, "__version__", "unknown")
        return module

    def _configure(self, version: Optional[str]) -> None:
        """Set version-dependent capabilities from the installed version (no import)."""

    def _install_hint(self) -> str:
        return f"pip install {self.package}" if not self.extra else f"pip install 'diffsynth-attention[{self.extra}]'"

    def _declare(self) -> tuple:
        if self._declared is None:
            reason, version = None, None
            if self.package is not None:
                version = self._metadata_version()
                if version is None and self.module is not None and module_present(self.module):
                    version = "unknown"
                if version is None:
                    reason = f"package {self.package} is not installed ({self._install_hint()})"
            if reason is None:
                self._configure(version)
                reason = self._machine_reason()
            self._declared = (reason, version)
        return self._declared

    def declared_reason(self) -> Optional[str]:
        """None if this backend is installed (by its metadata) and this machine can run it, else
        why not; imports nothing. A broken install is found later, by :meth:`unavailable_reason`
        (and does not change this answer: keys stay the same in every process of a machine)."""
        return self._declare()[0]

    def declared_version(self) -> Optional[str]:
        """The installed version from package metadata, without importing the package."""
        return self._declare()[1]

    def _machine_reason(self) -> Optional[str]:
        if "cuda" in self.devices and self.devices == frozenset({"cuda"}) and not torch.cuda.is_available():
            return "needs a CUDA GPU, and torch.cuda.is_available() is False"
        return None

    def _ensure_loaded(self) -> bool:
        """Import the package once. Another thread's load in progress is waited for (a background
        one until its deadline: False if it still runs then); ``_loaded`` is set only when the
        import has finished (successfully or not)."""
        if self._loaded:
            return True
        timeout = loading.lock_timeout(self)  # a background import of it: waited for until its deadline
        if not self._load_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False  # still importing past DIFFSYNTH_ATTENTION_LOAD_WAIT: unavailable_reason says so
        try:
            if self._loaded or getattr(self, "_in_load", False):  # done meanwhile, or re-entered by _load
                return True
            self._in_load = True
            try:
                self._load()
            except BaseException as exc:  # any failure of an installed package, not only ImportError
                if loading.interrupts_caller(exc):
                    raise  # a Ctrl-C during the import: left unloaded (finally), the next use tries again
                text = str(exc).strip().splitlines()
                detail = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
                if isinstance(exc, ModuleNotFoundError) and self.package:
                    self._unavailable = f"package {self.package} is not installed ({self._install_hint()}); import said {detail}"
                else:
                    self._unavailable = f"installed but unusable: import failed with {detail}"
                logger.debug("backend %s unavailable: %s", self.name, self._unavailable)
            finally:
                self._in_load = False
            self._loaded = True
            return True
        finally:
            self._load_lock.release()

    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run on this machine, else why not (package, import, GPU).
        Imports the kernel package (once) when it is installed: a broken install is found here."""
        if self._declare()[1] is None and self.package is not None:  # not installed: nothing to import
            return self._declared[0]
        if not self._ensure_loaded():  # a background import ran past its deadline
            return loading.late_reason(self)
        if self._unavailable is not None:
            return self._unavailable
        return self._machine_reason()

    def is_loaded(self) -> bool:
        """Whether the kernel package was imported (successfully or not) in this process."""
        return self._loaded

    def version(self) -> Optional[str]:
        self._ensure_loaded()
        return self._version or self.declared_version()

    # -- cost model ---------------------------------------------------------------------
    def predicted_bytes(self, p: Problem) -> int:
        """Device memory one call allocates beyond its inputs: the output (and its row
        statistics) for kernels that never materialise the scores."""
        out = p.batch * p.heads_q * p.seq_q * p.head_dim_v * element_size(p.dtype)
        return out + p.batch * p.heads_q * p.seq_q * 4

    def predicted_ms(self, p: Problem, dev: Optional[DeviceInfo]) -> Optional[float]:
        """A rough time per call: the launch floor plus FLOPs at this backend's efficiency of
        the device's peak. None where no model is known (CPU, unknown GPUs)."""
        peak = peak_flops_per_ms(dev, p.dtype)
        if peak is None:
            return None
        return self.launch_ms + attention_flops(p) / (self.efficiency * peak)

    # -- capabilities -------------------------------------------------------------------
    def not_supported_reasons(self, p: Problem, dev: Optional[DeviceInfo] = None) -> list:
        """Every reason this backend cannot serve problem ``p`` on device ``dev``; [] if it can."""
        self._declare()  # version-dependent capabilities, from the installed version's metadata
        reasons = []
        if p.device_type not in self.devices:
            reasons.append(f"runs on {'/'.join(sorted(self.devices))}, not {p.device_type}")
        if p.dtype not in self.dtypes:
            names = ", ".join(sorted(dtype_name(t) for t in self.dtypes))
            reasons.append(f"dtype {p.dtype_name} not supported (supports {names})")
        dims = {p.head_dim, p.head_dim_v}
        if self.head_dims is not None:
            bad = sorted(d for d in dims if d not in self.head_dims)
            if bad:
                reasons.append(f"head dim {bad[0]} not supported (supports {', '.join(map(str, sorted(self.head_dims)))})")
        else:
            for d in sorted(dims):
                if not (self.min_head_dim <= d <= self.max_head_dim) or d % self.head_dim_multiple:
                    rule = f"{self.min_head_dim}..{self.max_head_dim}"
                    if self.head_dim_multiple > 1:
                        rule += f", a multiple of {self.head_dim_multiple}"
                    reasons.append(f"head dim {d} not supported (needs {rule})")
                    break
        if self.same_head_dim_v and p.head_dim_v != p.head_dim:
            reasons.append(f"head dim of v ({p.head_dim_v}) must equal that of q and k ({p.head_dim})")
        if p.mask != MaskKind.NONE and p.mask not in self.masks:
            takes = " or ".join(sorted(self.masks)) + " masks" if self.masks else "no attn_mask"
            reasons.append(f"{p.mask} attn_mask not supported (takes {takes})")
        elif p.requires_grad and p.mask in (MaskKind.ADDITIVE, MaskKind.ADDITIVE_FLOAT32) and not self.mask_grad:
            reasons.append(f"{p.mask} attn_mask in a call that needs gradients not supported (its backward gives no "
                           f"gradient for the mask, which may require one)")
        if p.causal and not self.causal:
            reasons.append("is_causal not supported")
        elif p.causal and not self.causal_any_lengths and p.seq_q != p.seq_kv:
            reasons.append(
                f"is_causal with seq_q ({p.seq_q}) != seq_kv ({p.seq_kv}) not supported: its causal mask is aligned "
                "differently from PyTorch's top-left alignment"
            )
        if p.heads_q != p.heads_kv and not self.gqa:
            reasons.append(f"grouped-query attention ({p.heads_q} query heads, {p.heads_kv} key/value heads) not supported")
        if p.window is not None and not self.window:
            reasons.append("window_size not supported")
        elif p.window is not None and not self.window_any_lengths and p.seq_q != p.seq_kv:
            reasons.append(f"window_size with seq_q ({p.seq_q}) != seq_kv ({p.seq_kv}) not supported")
        if p.requires_grad and not self.backward:
            reasons.append("no backward: cannot serve calls that need gradients")
        if dev is not None and dev.type == "cuda" and dev.capability is not None:
            if self.min_capability is not None and dev.capability < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                reasons.append(f"GPU {dev.name} (compute capability {dev.capability[0]}.{dev.capability[1]}) is too old; needs {need} or newer")
            elif self.capabilities is not None and dev.capability[0] not in self.capabilities:
                allowed = ", ".join(f"{m}.x" for m in sorted(self.capabilities))
                reasons.append(f"GPU {dev.name} (compute capability {dev.capability[0]}.{dev.capability[1]}) not supported (supports {allowed})")
        reasons.extend(self.extra_reasons(p, dev))
        return reasons

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        """Backend-specific limits that the declared attributes cannot express."""
        return []

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):  # pragma: no cover - abstract
        raise NotImplementedError

    # Training under torch.compile (dispatch/compiled.py): a backend that has both of these saves
    # its output and log-sum-exp in the forward and runs its own backward on them, on tensors in
    # its native layout (``output_layout``). Without them the backward recomputes the forward.
    forward_native_lse = None  # (q, k, v, scale, causal, window) -> (out, lse)
    backward_native = None  # (grad_out, q, k, v, out, lse, scale, causal, window) -> (dq, dk, dv)

    def supports_lse_backward(self) -> bool:
        """Whether the loaded package offers the forward/backward pair above."""
        return False

    def bind(self, p: Problem, need_grad: bool, scale_is_none: bool = False):
        """``run(q, k, v, mask, scale)`` on ``b n s d`` tensors for calls of problem ``p``: what a
        plan calls on every hit. Backends override it to decide at plan time what ``forward``
        decides per call (``scale_is_none``: every call of the plan passes scale=None, which the
        signature guarantees)."""
        forward, causal, window = self.forward, p.causal, p.window

        def run(q, k, v, mask, scale):
            return forward(q, k, v, mask, scale, causal, window, need_grad)
        return run

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


# The registered backends by name (one instance each), in the order their modules were imported:
# :data:`diffsynth_attention.backends.REGISTRY` orders them by the catalogue (BackendName).
REGISTERED: dict = {}


def register(cls):
    """Class decorator: register one instance of a backend class under its ``name``, which must
    be a line of the catalogue (:class:`diffsynth_attention.backend_names.BackendName`)."""
    from ..backend_names import BACKEND_NAMES

    if cls.name not in BACKEND_NAMES:
        raise ValueError(f"backend {cls.__name__} is named {cls.name!r}, which is not in backend_names.BackendName: add it there")
    if cls.name in REGISTERED and type(REGISTERED[cls.name]).__qualname__ != cls.__qualname__:  # a module reload re-registers
        raise ValueError(f"backend name {cls.name!r} is registered twice ({type(REGISTERED[cls.name]).__name__}, {cls.__name__})")
    cls.name = BACKEND_NAMES[BACKEND_NAMES.index(cls.name)]  # plain text, as stored in decisions
    REGISTERED[cls.name] = cls()
    return cls
