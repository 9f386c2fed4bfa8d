"""The backend catalogue (backend_names.BackendName) is the one list of backends: the registry,
the preference order, DiffSynth's priority and the compile family derive from it, and adding a
backend changes two files of the package (its module and the catalogue line)."""

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffsynth_attention
from diffsynth_attention import config
from diffsynth_attention.backend_names import BACKEND_NAMES, BackendName, check_backend
from diffsynth_attention.backends import DIFFSYNTH_PRIORITY, PREFERENCE, REGISTRY, TORCH_FAMILY, normalize, register
from diffsynth_attention.backends.base import Backend

PACKAGE = Path(diffsynth_attention.__file__).parent


def test_everything_derives_from_the_catalogue():
    assert PREFERENCE == BACKEND_NAMES == tuple(m.value for m in BackendName)
    assert tuple(REGISTRY) == BACKEND_NAMES
    assert all(type(b.name) is str and b.name == name for name, b in REGISTRY.items())
    assert DIFFSYNTH_PRIORITY == ("customized_fa_kernel", "flash_attention_4", "flash_attention_3", "flash_attention_2",
                                  "sage_attention", "xformers", "torch")
    assert TORCH_FAMILY == {"torch", "torch_cudnn", "torch_flash", "torch_efficient", "torch_math"}
    assert str(BackendName.TORCH) == f"{BackendName.TORCH}" == "torch" == BackendName.TORCH


def test_one_validator_for_every_entry_point(monkeypatch):
    assert normalize(" Torch_Flash ", "x") == "torch_flash" and normalize("AUTO", "x") == "auto"
    assert check_backend("xformers") == "xformers"
    with pytest.raises(ValueError, match=r"^x='nosuch' is not a backend; valid names: auto, torch, "):
        normalize("nosuch", "x")
    with pytest.raises(TypeError):
        normalize(3, "x")
    with pytest.raises(ValueError, match=r"^backend='Torch' is not a backend; valid names: torch, "):
        check_backend("Torch")
    monkeypatch.setenv(config.IMPLEMENTATION, " XFormers")
    assert config.implementation() == "xformers"


def test_register_refuses_a_name_outside_the_catalogue():
    class Stray(Backend):
        name = "not_in_the_catalogue"

    with pytest.raises(ValueError, match="not in backend_names.BackendName"):
        register(Stray)
    assert "not_in_the_catalogue" not in REGISTRY


FAKE_MODULE = '''
from ..backend_names import BackendName
from .torch_sdpa import TorchBackend, TorchSDPA
from .base import register


@register
class FakeAttention(TorchBackend):
    name = BackendName.FAKE_ATTENTION
    devices = TorchSDPA.devices
    dtypes = TorchSDPA.dtypes
    forward = TorchSDPA.forward
    diffsynth_priority = 8
'''


def test_a_new_backend_changes_two_package_files(tmp_path):
    copy = tmp_path / "diffsynth_attention"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    names = copy / "backend_names.py"
    text = names.read_text()
    line = '    TORCH_MATH = "torch_math"\n'
    assert text.count(line) == 1
    names.write_text(text.replace(line, '    FAKE_ATTENTION = "fake_attention"\n' + line))  # the catalogue line
    (copy / "backends" / "fake_attention.py").write_text(FAKE_MODULE)  # its own module

    changed = []
    for root, dirs, files in os.walk(copy):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            new = Path(root) / f
            old = PACKAGE / new.relative_to(copy)
            if not old.exists() or not filecmp.cmp(old, new, shallow=False):
                changed.append(str(new.relative_to(copy)))
    assert sorted(changed) == ["backend_names.py", os.path.join("backends", "fake_attention.py")]

    probe = (
        "import torch, diffsynth_attention as d\n"
        "from diffsynth_attention import backends as b, config\n"
        "from diffsynth_attention.backend_names import check_backend\n"
        "assert d.__file__.startswith(%r), d.__file__\n"
        "assert b.PREFERENCE[-2:] == ('fake_attention', 'torch_math'), b.PREFERENCE\n"
        "assert b.DIFFSYNTH_PRIORITY[-1] == 'fake_attention' and 'fake_attention' in b.TORCH_FAMILY\n"
        "assert b.normalize('Fake_Attention', 's') == check_backend('fake_attention') == 'fake_attention'\n"
        "assert b.available_backends()['fake_attention'] is None\n"
        "q = torch.randn(1, 2, 8, 16)\n"
        "with d.use_backend('fake_attention'):\n"
        "    out = d.attention_forward(q, q, q, q_pattern='b n s d', k_pattern='b n s d', v_pattern='b n s d', out_pattern='b n s d')\n"
        "assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=1e-5)\n"
        "print('ok')\n" % str(copy)
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), DIFFSYNTH_ATTENTION_CACHE_DIR=str(tmp_path / "cache"),
               DIFFSYNTH_ATTENTION_PRELOAD="0")
    run = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
