"""The loading state of the kernel packages, and their loads on background threads.

A kernel package (FlashAttention-3/4, SageAttention, xFormers) costs from a fraction of a second
to several seconds to import. A process whose cached decision names one should not wait for
that before its first result, so a load can run on a background thread:

- :func:`state` is a :class:`~diffsynth_attention.states.LoadState`: ``ready`` (imported, usable;
  always for PyTorch's own kernels), ``loading`` (a background import is under way), ``failed``
  (installed but unusable, or not installed) or ``unloaded``;
- :func:`start_loading` starts the background import (once per backend; idempotent);
- :func:`add_listener` registers ``listener(name, state)``, called on the loading thread when a
  load ends, ready or failed: the dispatcher drops the provisional plans of the keys that waited;
- :func:`preload` starts the loads of the kernel packages that this machine's cached decisions
  name (``import diffsynth_attention`` does it on a thread of its own unless
  ``DIFFSYNTH_ATTENTION_PRELOAD=0``).

A synchronous use of a backend (tuning, ``available_backends()``, a trace under
``torch.compile``) that meets a background load waits for it (the backend's load lock), but
never past ``DIFFSYNTH_ATTENTION_LOAD_WAIT`` seconds counted from the start of that import
(:func:`lock_timeout`): an import that hangs leaves that backend out of this process (with the
reason, :func:`late_reason`) instead of hanging the caller. Tuning a new key first starts the
loads of its candidates' packages and waits for them, bounded, before it takes the key's lease
(:func:`settle`): a hung import never holds a lease, and the next process imports it again.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import weakref
from typing import Callable, Iterable, Optional

from .. import process
from ..states import LoadState

logger = logging.getLogger("diffsynth_attention")

READY, LOADING, FAILED, UNLOADED, DEFERRED = (
    LoadState.READY, LoadState.LOADING, LoadState.FAILED, LoadState.UNLOADED, LoadState.DEFERRED)
PENDING = (LOADING, DEFERRED)  # states in which a decision is served by another backend meanwhile

_lock = process.new_lock()
_threads: dict = {}  # backend name -> the thread importing it now
_started: dict = {}  # backend name -> time.monotonic() when its background import started
_listeners: list = []  # weak references (WeakMethod or ref) to callables(name, state)
_preloaded: Optional[list] = None  # the names preload() started, once it ran


def needs_loading(backend) -> bool:
    """Whether ``backend`` has a package to import (PyTorch's own kernels have none)."""
    return backend.package is not None


def state(backend) -> LoadState:
    """``ready``, ``loading`` (importing, or launching its kernels for the first time: see
    :mod:`.warmup`), ``failed`` or ``unloaded``; imports nothing, takes no lock."""
    if not needs_loading(backend):
        return READY
    if backend.name in _threads:
        return LOADING
    if backend._loaded:
        return READY if backend._unavailable is None and backend._machine_reason() is None else FAILED
    if backend.name in _threads:
        return LOADING
    if backend.declared_reason() is not None:  # not installed, or not for this machine: nothing to load
        return FAILED
    return UNLOADED


def done(backend) -> bool:
    """Whether ``backend``'s load (import and first launches) has ended; a dict lookup (a call's check)."""
    return backend._loaded and backend.name not in _threads


def interrupts_caller(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a kernel package's import, is the user interrupting this thread
    (a KeyboardInterrupt on the main thread, where Python delivers Ctrl-C) rather than the package
    failing. Anything else, SystemExit and other BaseExceptions included (a package that calls
    ``sys.exit()`` or raises its own BaseException at import), makes the backend unavailable with
    the reason: a broken package never breaks an attention call."""
    return isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread()


def is_ready(backend) -> bool:
    return state(backend) == READY


def add_listener(listener: Callable) -> None:
    """Call ``listener(name, state)`` when a background load ends. Held weakly (a bound method
    of a dispatcher does not keep the dispatcher alive)."""
    ref = weakref.WeakMethod(listener) if hasattr(listener, "__self__") else weakref.ref(listener)
    with _lock:
        _listeners.append(ref)


def _notify(name: str, result: LoadState) -> None:
    with _lock:
        alive = [r for r in _listeners if r() is not None]
        _listeners[:] = alive
    for ref in alive:
        fn = ref()
        if fn is None:
            continue
        try:
            fn(name, result)
        except Exception:  # a listener never breaks the load or the other listeners
            logger.debug("a load listener for %s failed", name, exc_info=True)


# While a package loads on a background thread (FlashAttention-4's import: 6.7-8 s of Python), a
# caller's thread that gives the GIL up (a synchronize, any blocking call) waits up to the
# interpreter's switch interval (5 ms) to get it back, every time: ten times a 0.5 ms call. The
# interval is lowered while any background load runs, and put back after the last one (unless
# someone changed it meanwhile).
#
# The cyclic garbage collector is paused over the same span. FlashAttention-4's import creates
# millions of objects (torch._dynamo, quack, the CuTe DSL), and each one that crosses a
# generation's threshold starts a collection that scans the whole heap, on whichever thread
# allocated: on an H100, 431 collections in its 6 s load, up to 147 ms each, stalled the
# caller's 0.4 ms calls 639 times (benchmarks/results/H100-80GB-HBM3-2026-12-07-s3-first-result.md).
# Reference counting still frees everything that is not in a cycle. The collector is switched
# back on after the last load, if this module switched it off; an application that runs with it
# off keeps it off. A load that never ends (a hung import) holds it off for LOAD_GC_PAUSE_MAX_S at
# most: a timer switches it back on then, and puts the switch interval back.
LOAD_SWITCH_INTERVAL_S = 0.0005
LOAD_GC_PAUSE_MAX_S = 30.0
_switch: dict = {"loads": 0, "saved": None, "set": None, "gc_paused": False, "pause": 0}


def _gc_resume_locked(pause: Optional[int] = None) -> None:
    """Switch the collector back on if this module paused it (``pause``: only that pause); under ``_lock``."""
    if _switch["gc_paused"] and (pause is None or pause == _switch["pause"]):
        _switch["gc_paused"] = False
        if not gc.isenabled():
            gc.enable()


def _gc_pause_expired(pause: int) -> None:
    """A load has run LOAD_GC_PAUSE_MAX_S (hung, or very slow): the collector and the switch interval
    are put back now, not after a last load that may never end."""
    with _lock:
        if not (_switch["gc_paused"] and pause == _switch["pause"]):
            return
        logger.info("a background load has run %.0f s: the garbage collector is on again", LOAD_GC_PAUSE_MAX_S)
        _gc_resume_locked(pause)
        if _switch["saved"] is not None:
            if sys.getswitchinterval() == _switch["set"]:
                sys.setswitchinterval(_switch["saved"])
            _switch.update(saved=None, set=None)


def _switch_begin() -> None:
    with _lock:
        if _switch["loads"] == 0:
            current = sys.getswitchinterval()
            if current > LOAD_SWITCH_INTERVAL_S:
                sys.setswitchinterval(LOAD_SWITCH_INTERVAL_S)
                _switch.update(saved=current, set=sys.getswitchinterval())
            if gc.isenabled():
                gc.disable()
                _switch["pause"] += 1
                _switch["gc_paused"] = True
                timer = threading.Timer(LOAD_GC_PAUSE_MAX_S, _gc_pause_expired, (_switch["pause"],))
                timer.daemon = True
                timer.start()
        _switch["loads"] += 1


def _switch_end() -> None:
    with _lock:
        _switch["loads"] = max(0, _switch["loads"] - 1)
        if _switch["loads"] == 0 and _switch["saved"] is not None:
            if sys.getswitchinterval() == _switch["set"]:
                sys.setswitchinterval(_switch["saved"])
            _switch.update(saved=None, set=None)
        if _switch["loads"] == 0:
            _gc_resume_locked()


def _load(backend, keys=()) -> None:
    name = backend.name
    result = FAILED
    _switch_begin()
    try:
        reason = backend.unavailable_reason()  # the import, under the backend's load lock
        result = READY if reason is None else FAILED
        if reason is None:
            logger.info("backend %s loaded on a background thread", name)
            from .warmup import warm

            warm(backend, keys)  # its kernels' first launches for the decided variants, still "loading"
        else:
            logger.info("backend %s did not load: %s", name, reason)
    except BaseException:  # never escapes the thread
        logger.debug("loading backend %s failed", name, exc_info=True)
    finally:
        with _lock:
            _threads.pop(name, None)
            _started.pop(name, None)
        _switch_end()
        _notify(name, result)


_deferred = False


def defer(on: bool = True) -> bool:
    """Start no background loads (``on``) or start them again (the command line's ``explain``:
    a cached decision is reported without importing its package, which the command would never
    call). :func:`start_loading` then answers ``deferred``; a synchronous use still imports.
    Returns the previous setting."""
    global _deferred
    previous, _deferred = _deferred, on
    return previous


def start_loading(backend, keys=(), even_deferred: bool = False) -> LoadState:
    """Start importing ``backend``'s package on a background thread unless it is loaded, being
    loaded or cannot load here; after the import, the thread launches its kernel once for each
    variant that ``keys`` (decisions' keys) name (:mod:`.warmup`). Returns the state after the
    call (``deferred`` after :func:`defer`, unless ``even_deferred``: a use that imports anyway)."""
    current = state(backend)
    if current != UNLOADED:
        return current
    if _deferred and not even_deferred:
        return DEFERRED
    return _spawn(backend, keys)


def _spawn(backend, keys=()) -> LoadState:
    with _lock:
        if backend.name in _threads or backend._loaded:
            return state(backend)
        thread = threading.Thread(target=_load, args=(backend, list(keys)), daemon=True,
                                  name=f"diffsynth-attention-load-{backend.name}")
        thread.backend = backend
        _threads[backend.name] = thread
        _started[backend.name] = time.monotonic()
    thread.start()
    return LOADING


def wait(backend, timeout: Optional[float] = None) -> LoadState:
    """Wait until ``backend``'s background load (if any) ends; returns its state."""
    thread = _threads.get(backend.name)
    if thread is not None:
        thread.join(timeout)
    return state(backend)


def _deadline(name: str) -> float:
    from .. import config

    return _started.get(name, time.monotonic()) + config.load_wait()


def lock_timeout(backend) -> Optional[float]:
    """How long a synchronous use of ``backend`` may wait for its load lock: None (as long as it
    takes) unless a background import of it is under way on another thread; then the seconds
    left until ``DIFFSYNTH_ATTENTION_LOAD_WAIT`` after that import started (0 once past)."""
    thread = _threads.get(backend.name)
    if thread is None or thread is threading.current_thread():
        return None
    return max(0.0, _deadline(backend.name) - time.monotonic())


def late_reason(backend) -> str:
    """Why ``backend`` is left out while its import runs past the deadline."""
    from .. import config

    started = _started.get(backend.name)
    since = "" if started is None else f" {time.monotonic() - started:.1f} s after it started"
    return (f"not loaded: the import of its package {backend.package} was still running{since} "
            f"({config.LOAD_WAIT}={config.load_wait():g}); left out in this process until it ends "
            f"(a later process imports it again)")


def busy() -> tuple:
    """The backends whose package loads on a background thread now (sorted names)."""
    return tuple(sorted(name for name, thread in list(_threads.items()) if thread.is_alive()))


def settle(backends: Iterable) -> dict:
    """Before tuning (never under a key's lease): start the background loads of ``backends``'
    packages not loaded yet, then wait for every load under way, each until its deadline
    (``DIFFSYNTH_ATTENTION_LOAD_WAIT`` after it started): no import competes with the timed
    calls, and none hangs the tuning. Returns {name: reason} for the ``backends`` still loading."""
    backends = list(backends)
    for backend in backends:
        if needs_loading(backend) and not backend._loaded:  # (also after defer(): the tuning imports them
            start_loading(backend, even_deferred=True)     # anyway, and only a background import is bounded)
    for name, thread in list(_threads.items()):
        if thread is not threading.current_thread():
            thread.join(max(0.0, _deadline(name) - time.monotonic()))
    return {b.name: late_reason(b) for b in backends if state(b) == LOADING}


def reasons(backends: Iterable) -> dict:
    """{name: ``unavailable_reason()``} for ``backends``, each import not done yet run on a
    background thread and waited for until its deadline: what a synchronous question about them
    (``available_backends()``, the ``backends`` command, a forced backend) asks, so that a hung
    import answers with its reason instead of hanging the caller."""
    backends = list(backends)
    for backend in backends:  # (installed on a machine that cannot run it too: its reason names a broken install)
        if needs_loading(backend) and not backend._loaded and backend.declared_version() is not None:
            _spawn(backend)
    for backend in backends:
        thread = _threads.get(backend.name)
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, _deadline(backend.name) - time.monotonic()))
    return {b.name: b.unavailable_reason() for b in backends}


def settle_candidates(usable: list, unsupported: dict, what: str) -> tuple:
    """Before tuning ``what`` (and before its key's lease): :func:`settle` the candidates; those
    still importing are moved from ``usable`` to ``unsupported`` with the reason (one warning
    per backend). No import competes with the timed calls (issue 24), and none is waited for
    while the key's lease is held (issue 31). Returns (usable, unsupported)."""
    late = settle(usable)
    if not late:
        return usable, unsupported
    for name, why in late.items():
        if name not in _warned_late:
            _warned_late.add(name)
            logger.warning("backend %s is left out of tuning %s: %s", name, what, why)
    return [b for b in usable if b.name not in late], {**unsupported, **{name: [why] for name, why in late.items()}}


_warned_late: set = set()


@process.after_fork
def _after_fork_in_child() -> None:
    """A fork while a package loads leaves the child without the loading thread, with that
    backend's load lock (and the package's half-imported modules) held by a thread that does not
    exist there: the backend becomes unavailable in the child, with the reason, instead of
    waiting forever (:mod:`diffsynth_attention.process` has unlocked every lock by now). The
    parent is untouched. No load runs in the child: the GIL switch interval and the garbage
    collector are put back."""
    if _switch["saved"] is not None and sys.getswitchinterval() == _switch["set"]:
        sys.setswitchinterval(_switch["saved"])
    if _switch["gc_paused"] and not gc.isenabled():
        gc.enable()
    _switch.update(loads=0, saved=None, set=None, gc_paused=False)
    interrupted = [thread for thread in _threads.values()]
    _threads.clear()
    _started.clear()
    for thread in interrupted:
        backend = getattr(thread, "backend", None)
        if backend is None:
            continue
        backend._unavailable = "its package was loading on a background thread when this process was forked"
        backend._loaded = True


def decided_packages(decisions: Iterable, registry: dict) -> list:
    """The kernel-package backends that ``decisions`` name and that can load on this machine:
    installed (per metadata), runnable here, and decided with the installed version. Where CUDA
    is already initialised, only decisions for this machine's GPU models count (the test does
    not initialise CUDA itself: that would break a caller that forks later)."""
    gpu_names = None
    try:
        import torch

        if torch.cuda.is_initialized():
            gpu_names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    except Exception:
        gpu_names = None
    names = []
    for decision in decisions:
        backend = registry.get(decision.backend)
        if backend is None or not needs_loading(backend) or backend.name in names:
            continue
        try:
            device = decision.key.get("device", {})
            version = decision.key.get("versions", {}).get(backend.package)
        except AttributeError:  # a foreign entry
            continue
        if backend.declared_reason() is not None or backend.declared_version() != version:
            continue
        if gpu_names is not None and device.get("type") == "cuda" and device.get("name") not in gpu_names:
            continue
        names.append(backend.name)
    return names


def preload(decisions: Iterable, registry: dict) -> list:
    """Start loading every kernel package of ``registry`` that ``decisions`` name on this machine
    (once per process). Returns the backend names whose loads were started or found under way."""
    global _preloaded
    with _lock:
        if _preloaded is not None:
            return list(_preloaded)
        _preloaded = []
    decisions = list(decisions)
    names = decided_packages(decisions, registry)
    for name in names:
        keys = [d.key for d in decisions if d.backend == name and isinstance(d.key, dict)]
        if start_loading(registry[name], keys) in (LOADING, READY):
            _preloaded.append(name)
    if names:
        logger.info("loading %s on background threads (cached decisions name them)", ", ".join(names))
    return list(_preloaded)
