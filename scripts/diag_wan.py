"""Diagnosis (GPU): which backend a compiled diffusers Wan's attention calls bake in at trace time."""
import os
import sys
import tempfile

import torch

os.environ.setdefault("DIFFSYNTH_ATTENTION_CACHE_DIR", tempfile.mkdtemp())
import diffusers  # noqa: E402

for p in os.environ.get("DA_LATE_PATH", "").split(":"):
    if p:
        sys.path.append(p)
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import diffsynth_attention as da  # noqa: E402

dev, dt = torch.device("cuda", 0), torch.bfloat16
m = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1).to(dev, dt).eval()
x = torch.randn(1, 16, 1, 60, 104, device=dev, dtype=dt)
t = torch.tensor([10], device=dev)
enc = torch.randn(1, 512, 4096, device=dev, dtype=dt)
h = da.patch_sdpa()
d = da.dispatch.default_dispatcher()
orig, seen = d.trace_decision, []
d.trace_decision = lambda *a, **k: seen.append(orig(*a, **k)) or seen[-1]
print(torch.__version__, torch._dynamo.config.automatic_dynamic_shapes, torch._dynamo.config.assume_static_by_default)
with torch.no_grad():
    m(x, t, enc)
    cnt = CompileCounterWithBackend("eager")
    c = torch.compile(m, dynamic=False, backend=cnt)
    c(x, t, enc)
    c(x, t, enc)
print("frames", cnt.frame_count, "trace decisions", seen)
for g in cnt.graphs:
    print([str(n.target) for n in g.graph.nodes if n.op == "call_function" and ("attention" in str(n.target) or "scaled" in str(n.target))])
