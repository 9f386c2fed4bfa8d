"""A torch.compile backend for tests: counts compiles and compiled runs, keeps AOTAutograd's
forward graphs (where diffsynth_attention::attention has been decomposed into what it runs)."""
import contextlib
import functools

import pytest
import torch

from support.harness import bench

CompileRecorder = bench.CompileRecorder


Recorder = CompileRecorder  # counts compiles and compiled runs, keeps AOTAutograd's forward graphs


def recompile_limit(n: int):
    """Set Dynamo's per-frame recompile limit (its name changed across torch versions)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    old = getattr(config, name)
    setattr(config, name, n)
    return name, old


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (imported by the compile test modules)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()



def _probe(fn, *args) -> bool:
    """Whether Dynamo compiles ``fn`` with fullgraph=True and runs it."""
    torch._dynamo.reset()
    try:
        torch.compile(fn, fullgraph=True, backend="eager")(*args)
        return True
    except Exception:  # noqa: BLE001 - this torch's Dynamo cannot: the feature is missing
        return False
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def _scope():
    yield 1


def _with_scope(x):
    with _scope():
        return x + 1


def _inner_raise(x):
    raise ValueError("probe message")


def _raises(x):
    return _inner_raise(x) + 1  # raised in an inlined function, as the library's validation raises


def _message_kept(x):
    try:
        torch.compile(_raises, fullgraph=True, backend="eager")(x)
    except Exception as exc:  # noqa: BLE001
        return "probe message" in str(exc)
    return False


def _module_of(x, n):
    return x + 1 if type(n).__module__ == "builtins" else x


def _closure_probe():
    table = {}

    def f(t):
        if t.dim() > 0:  # always: Dynamo never reaches the read of table below
            return t + 1
        return t + len(table)
    f.table = table
    return f


_INLINED = {}


def _calls_closure(t):
    return _INLINED["f"](t)  # inlined, as a compiled model inlines attention_forward


def _closure_probe_recompiled() -> bool:
    """Whether filling a closure's dict that the traced code never read recompiles its caller."""
    torch._dynamo.reset()
    f = _INLINED["f"] = _closure_probe()
    seen = []
    g = torch.compile(_calls_closure, fullgraph=True, backend=lambda gm, _: seen.append(1) or gm.forward)
    try:
        g(torch.ones(2))
        f.table[1] = 1
        g(torch.ones(2))
    finally:
        torch._dynamo.reset()
    return len(seen) > 1


@functools.lru_cache(maxsize=None)
def dynamo_can(feature: str) -> bool:
    """Whether this torch's Dynamo has ``feature``, asked of it once per process (torch 2.5 lacks
    each): ``bake`` (a decision baked into the graph: a has_static_value handler), ``contextmanager``
    (a @contextmanager block such as use_backend inside a compiled function), ``messages`` (an
    exception raised in traced code keeps its message under fullgraph), ``type_module`` (comparing
    a type's ``__module__``: how the trace tells a NumPy value, with no NumPy import),
    ``specialize`` (a symbolic number made a constant by ``float(s).__float__()``), ``numpy_bool``
    (a NumPy bool argument), ``lazy_closure`` (a closure cell the trace never reads is not guarded), ``added_enum_member``
    (diffusers' ``AttentionBackendName(backend)`` on the member the library adds to it)."""
    x = torch.ones(2)
    if feature == "bake":
        from diffsynth_attention.dispatch import baked

        return baked.BAKES
    if feature == "contextmanager":
        return _probe(_with_scope, x)
    if feature == "messages":
        torch._dynamo.reset()
        try:
            return _message_kept(x)
        finally:
            torch._dynamo.reset()
    if feature == "type_module":
        return _probe(lambda t: _module_of(t, 3), x)
    if feature == "specialize":
        torch._dynamo.reset()
        try:
            f = torch.compile(lambda t, s: t * float(s).__float__(), fullgraph=True, backend="eager", dynamic=True)
            f(x, 2), f(x, 3)
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            torch._dynamo.reset()
    if feature == "numpy_bool":
        import numpy as np

        torch._dynamo.reset()
        try:
            torch.compile(lambda t, s: t * 2 if s else t, backend="eager")(x, np.bool_(True))
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            torch._dynamo.reset()
    if feature == "added_enum_member":  # diffusers' enum(backend) on the member the library adds
        import enum

        from diffsynth_attention.integrations.diffusers import _add_member

        names = enum.Enum("Names", {"NATIVE": "native"}, type=str)
        member = _add_member(names, "probe_backend")
        return _probe(lambda t: t + 1 if names(member) is member else t, x)
    if feature == "lazy_closure":  # a closure's cell that the trace never reads is not guarded
        return not _closure_probe_recompiled()
    raise ValueError(f"unknown feature {feature!r}")


_WHY = {"bake": "no has_static_value handler: compiled calls run the run-time operator diffsynth_attention::dispatch, "
                "nothing is baked (docs/compile.md)",
        "contextmanager": "it cannot trace a @contextmanager (use_backend, quality) inside a compiled function",
        "messages": "under fullgraph it reports an exception raised in traced code as 'Observed exception', "
                    "without the message",
        "type_module": "it cannot compare a type's __module__, which the trace reads to tell a NumPy value",
        "specialize": "under dynamic=True it cannot specialize a symbolic number by float(s).__float__(), as the trace does",
        "numpy_bool": "it fails internally on a NumPy bool argument",
        "lazy_closure": "it guards every cell of an inlined function's closure, read or not",
        "added_enum_member": "it cannot trace diffusers' AttentionBackendName(backend) on the member the library adds "
                             "('Enum variable is constructed with non constant values')"}


def require(feature: str) -> None:
    """Skip the test where this torch's Dynamo lacks ``feature`` (:func:`dynamo_can`), saying why."""
    if not dynamo_can(feature):
        pytest.skip(f"torch {torch.__version__}'s Dynamo: {_WHY[feature]}")


def requires_bake():
    """Skip a test of what a trace bakes (a decision in the graph's arguments, the backend's own
    operators in the graph) where this torch's Dynamo cannot bake (torch 2.5)."""
    require("bake")
