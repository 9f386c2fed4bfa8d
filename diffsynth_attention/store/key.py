"""The problem key: what a decision is valid for.

A key holds the problem, the device's identity (model, compute capability, SM count; never its
index, so two GPUs of one model share decisions), and the versions of torch, CUDA (runtime and
driver), cuDNN, this library and every kernel package that was a candidate, so an upgrade of
any of them never reuses an old decision. Versions come from package metadata: building a key
imports no kernel package.

Neighbours: :func:`neighbour_group` and :func:`seq_bucket` say which keys differ only in
sequence lengths that fall in the same bucket (about four per octave), so that
``DIFFSYNTH_ATTENTION_NEW_SHAPES=nearest`` can serve a new length from a known decision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import torch

from .._version import __version__
from ..problem import Problem
from .decision import key_id  # noqa: F401 - the hash lives with decisions (the store checks ids without torch)


@dataclass(frozen=True)
class Key:
    fields: dict
    id: str

    def __hash__(self) -> int:
        return hash(self.id)


@functools.lru_cache(maxsize=None)
def _runtime_versions() -> tuple:
    cudnn = None
    driver = None
    if torch.cuda.is_available():
        try:
            cudnn = torch.backends.cudnn.version()
        except Exception:
            cudnn = None
        get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        if get_driver is not None:
            try:
                driver = get_driver()
            except Exception:
                driver = None
    return (
        ("diffsynth_attention", __version__),
        ("torch", torch.__version__),
        ("cuda", torch.version.cuda),
        ("cuda_driver", None if driver is None else str(driver)),
        ("cudnn", None if cudnn is None else str(cudnn)),
    )


def problem_fields(p: Problem) -> dict:
    return p.fields()


def make_key(problem: Problem, dev, candidates, tier: str = "exact") -> Key:
    """The key of ``problem`` on ``dev`` (a :class:`~diffsynth_attention.backends.DeviceInfo`,
    read through its ``type`` and ``as_dict()``: the store does not import the backends) over
    ``candidates`` (every backend declared able to serve it, whatever the quality tier). A low-precision tier (``balanced``, ``fast``) is a field of
    the key; the exact tier adds none, so its keys are those made before tiers existed."""
    versions = {name: value for name, value in _runtime_versions() if value is not None}
    if dev.type != "cuda":
        for name in ("cuda", "cuda_driver", "cudnn"):
            versions.pop(name, None)
    for backend in candidates:  # from package metadata: building a key imports no kernel package
        if backend.package:
            versions[backend.package] = backend.declared_version() or "unknown"
    fields = {"problem": problem_fields(problem), "device": dev.as_dict(), "versions": versions}
    if tier != "exact":
        fields["quality"] = tier
    return Key(fields, key_id(fields))


# Neighbours live in .neighbours (no torch); re-exported here for existing callers.
from .neighbours import BUCKETS_PER_OCTAVE, neighbour_distance, neighbour_group, seq_bucket  # noqa: E402,F401
