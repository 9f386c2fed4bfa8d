"""DiffSynth-Studio's attention module, the reference the drop-in tests compare against."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def load_diffsynth_attention():
    """DiffSynth-Studio's attention module (``diffsynth.core.attention.attention``), loaded on its
    own when the package's import fails (it is installed without its heavy dependencies); skips the
    test when DiffSynth-Studio is not installed."""
    loaded = sys.modules.get("diffsynth.core.attention.attention")
    if loaded is not None and hasattr(loaded, "torch_sdpa"):
        return loaded
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("DiffSynth-Studio is not installed (pip install --no-deps diffsynth==2.1.12)")
    path = Path(list(spec.submodule_search_locations)[0]) / "core" / "attention" / "attention.py"
    for name in ("diffsynth", "diffsynth.core", "diffsynth.core.attention"):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules.setdefault(name, mod)
    spec = importlib.util.spec_from_file_location("diffsynth.core.attention.attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["diffsynth.core.attention.attention"] = module
    spec.loader.exec_module(module)
    sys.modules["diffsynth.core.attention"].attention_forward = module.attention_forward
    return module
