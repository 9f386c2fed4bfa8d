"""A backend that fails on demand, installed as a key's decision (run-time failure tests)."""
from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.backends.torch_sdpa import TorchSDPA
from diffsynth_attention.store.decision import Candidate

from .store_helpers import decided_for


class Flaky(TorchSDPA):
    """A CPU backend that fails its first ``failures`` calls after ``arm()``."""

    devices = frozenset({"cpu"})

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.failures = 0

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("launch failed")
        return super().forward(q, k, v, mask, scale, causal, window, need_grad)


def force_flaky(disp, monkeypatch, q, k, v):
    """Make a :class:`Flaky` ``flash_attention_4`` the stored decision for q, k, v (as a real
    decision for it: chosen, the others accepted); returns it and the key id."""
    flaky = Flaky("flash_attention_4")
    monkeypatch.setitem(REGISTRY, "flash_attention_4", flaky)
    info = disp.explain(q, k, v)
    decision = decided_for(info.decision, "flash_attention_4")  # as a real decision for it: chosen, its error through the gate
    decision = decision.replace(candidates={**decision.candidates, "flash_attention_4": Candidate("chosen", 0.01, 0.0, reps=3)})
    disp.store.put(decision)
    assert disp.explain(q, k, v).backend == "flash_attention_4"
    return flaky, info.key_id
