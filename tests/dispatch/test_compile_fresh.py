"""torch.compile as the first thing a fresh process does.

Each case runs in a new interpreter, so nothing of the library has been used before the
compiled call: the default dispatcher, the SDPA wrapper and the compile support are all first
reached by Dynamo. Every compile uses fullgraph=True, so a graph break fails the case."""
import json
import os
import subprocess
import sys

import pytest

from diffsynth_attention.store.neighbours import seq_bucket

from support.compile_helpers import requires_bake
from support.subprocesses import prespawn, results

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = f"""
import json, sys
sys.path.insert(0, {TESTS!r})
import torch
import torch.nn.functional as F
import diffsynth_attention as da
from support.compile_helpers import Recorder, recompile_limit, requires_bake
"""

FORMS = {
    "global": """
da.patch_sdpa()
f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), fullgraph=True, backend=rec)
outs = [f(q), f(q)]
""",
    "with_around": """
f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), fullgraph=True, backend=rec)
with da.patch_sdpa():
    outs = [f(q), f(q)]
""",
    "with_inside": """
def g(q):
    with da.patch_sdpa():
        return F.scaled_dot_product_attention(q, q, q)
f = torch.compile(g, fullgraph=True, backend=rec)
outs = [f(q), f(q)]
""",
    "attention_forward": """
f = torch.compile(lambda q: da.attention_forward(q, q, q), fullgraph=True, backend=rec)
outs = [f(q), f(q)]
""",
}


def run(code: str, env) -> dict:
    r = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def form_code(form: str) -> str:
    return """
rec = Recorder()
q = torch.randn(1, 2, 32, 16)
with torch.no_grad():
""" + "\n".join("    " + line for line in FORMS[form].strip().splitlines()) + """
ref = torch.ops.aten._scaled_dot_product_attention_math(q, q, q)[0]
err = max(float((o - ref).abs().max()) for o in outs)
print(json.dumps({"compiles": rec.compiles, "runs": rec.runs, "tunings": da.stats()["tunings"],
                  "dispatcher_in_graph": "diffsynth" in str(rec.forward_graphs[-1].code), "err": err}))
"""


@pytest.fixture(scope="module")
def children():
    """Every selected case's fresh process (started in the background when collection ended)."""
    return results(__name__)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_first_thing_a_process_does_compiles_fullgraph_and_routes(form, children):
    requires_bake()
    got = children["form", form].get()
    assert got["compiles"] == 1 and got["runs"] == 2, got  # compiled once, both calls compiled
    assert got["tunings"] == 1, got  # routed: the key was tuned (at trace time, in this fresh cache)
    assert not got["dispatcher_in_graph"], got  # and the decision baked into the graph
    assert got["err"] < 1e-5, got


LENGTHS = [24, 40, 56, 72, 88, 104, 120, 136, 152, 168]


MODES = ["default", "static", "dynamic"]


def lengths_code(mode: str) -> str:
    return f"""
mode = {mode!r}
kw = {{"default": {{}}, "static": {{"dynamic": False}}, "dynamic": {{"dynamic": True}}}}[mode]
if mode == "static":
    recompile_limit(16)
BSND = ("b s n d",) * 4

def ours(q, k, v):
    return da.attention_forward(q, k, v, *BSND)

def plain(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

def run(fn):
    rec = Recorder()
    model = torch.compile(fn, fullgraph=True, backend=rec, **kw)
    err = 0.0
    with torch.no_grad():
        for s in {LENGTHS!r}:
            q, k, v = (torch.randn(1, s, 2, 8) for _ in range(3))
            for _ in range(2):
                err = max(err, float((model(q, k, v) - plain(q, k, v)).abs().max()))
    torch._dynamo.reset()
    return rec, err

mine, err = run(ours)
theirs, _ = run(plain)
print(json.dumps({{"compiles": mine.compiles, "runs": mine.runs, "plain_compiles": theirs.compiles,
                  "plain_runs": theirs.runs, "tunings": da.stats()["tunings"], "err": err}}))
"""


@pytest.mark.parametrize("mode", MODES)
def test_ten_sequence_lengths_compile_like_plain_sdpa_and_never_run_uncompiled(mode, children):
    """A module called over 10 sequence lengths (twice each): no call left uncompiled, and no
    more compiles than the same module calling SDPA. ``static`` raises Dynamo's recompile limit
    (8 by default) to 16, as a user compiling 10 static shapes must for plain SDPA too."""
    requires_bake()
    got = children["mode", mode].get()
    calls = 2 * len(LENGTHS)
    assert got["runs"] == calls, got  # every call served by a compiled graph
    assert got["tunings"] <= len(LENGTHS), got  # at most one tuning per key, at trace time or at its first call
    if mode == "default":  # symbolic lengths baked per bucket (issue 30): a graph per bucket, within the recompile limit
        buckets = len({seq_bucket(s) for s in LENGTHS})
        assert got["plain_compiles"] < got["compiles"] <= min(got["plain_compiles"] + buckets, 8), got
    else:  # static: a graph per length, as plain SDPA; dynamic=True: every size symbolic, the run-time operator
        assert got["compiles"] == got["plain_compiles"], got  # a new decision recompiles nothing
        assert got["tunings"] == len(LENGTHS), got
        assert {"static": got["compiles"] == len(LENGTHS), "dynamic": got["compiles"] == 1}[mode], got
    assert got["err"] < 1e-5, got


RESOLUTIONS = [40, 64, 96, 160, 256, 400]  # six buckets apart: a pipeline rendering several resolutions


def buckets_code(tuning: str) -> str:
    return f"""
import os
os.environ["DIFFSYNTH_ATTENTION_TUNING"] = {tuning!r}
BSND = ("b s n d",) * 4
rec, plain = Recorder(), Recorder()
ours = torch.compile(lambda q, k, v: da.attention_forward(q, k, v, *BSND), fullgraph=True, backend=rec)
sdpa = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                     v.transpose(1, 2)).transpose(1, 2),
                     fullgraph=True, backend=plain)
err = 0.0
with torch.no_grad():
    for rounds in range(2):  # the second pass over the same lengths compiles nothing more
        for s in {RESOLUTIONS!r}:
            q, k, v = (torch.randn(1, s, 2, 8) for _ in range(3))
            err = max(err, float((ours(q, k, v) - sdpa(q, k, v)).abs().max()))
        if rounds == 0:
            first_pass = rec.compiles
print(json.dumps({{"compiles": rec.compiles, "first_pass": first_pass, "runs": rec.runs, "plain_compiles": plain.compiles,
                  "runtime_op": ["diffsynth_attention.dispatch" in str(g.code) for g in rec.forward_graphs],
                  "tunings": da.stats()["tunings"], "err": err}}))
"""


def test_resolutions_under_the_default_compile_bake_a_backend_per_bucket(children):
    """Six resolutions under the default compile: every graph after the first (symbolic lengths)
    holds a backend baked for its bucket, behind a guard on the bucket; none holds the run-time
    operator (before: all of them did)."""
    requires_bake()
    got = children["buckets", "on"].get()
    assert got["runs"] == 2 * len(RESOLUTIONS), got
    assert got["compiles"] == got["first_pass"] <= got["plain_compiles"] + len(RESOLUTIONS), got
    assert not any(got["runtime_op"]), got
    assert got["tunings"] == len(RESOLUTIONS), got  # each traced length tuned once, at trace time
    assert got["err"] < 1e-5, got


def test_where_nothing_is_known_symbolic_lengths_keep_the_run_time_operator(children):
    got = children["buckets", "off"].get()  # tuning off, an empty cache: no decision for any bucket
    assert got["runs"] == 2 * len(RESOLUTIONS) and got["tunings"] == 0, got
    assert got["compiles"] == got["plain_compiles"], got  # no bucket guards: one symbolic graph, as plain
    assert got["runtime_op"][-1], got
    assert got["err"] < 1e-5, got


SPLIT_CODE = """
import dataclasses
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store.neighbours import seq_bucket
BSND = ("b s n d",) * 4
lengths = [n for n in range(200, 400) if seq_bucket(n) == seq_bucket(256)][:3]
store = default_dispatcher().store
with torch.no_grad():
    for i, s in enumerate(lengths):  # each length tuned; then torch and torch_flash level, the picks split
        q, k, v = (torch.randn(1, s, 2, 8) for _ in range(3))
        d = da.explain(q, k, v, *BSND).decision
        times = {"torch": 1.0, "torch_flash": 0.99 if i else 1.02}
        cands = {n: dataclasses.replace(c, status="accepted", time_ms=times.get(n, c.time_ms), host_ms=None, device_ms=None)
                 for n, c in d.candidates.items() if n in times}
        pick = "torch_flash" if i else "torch"
        cands[pick] = dataclasses.replace(cands[pick], status="chosen")
        store.put(d.replace(backend=pick, candidates=cands, modes={}, provisional=False))  # these two alone
da.reset_counters() if hasattr(da, "reset_counters") else None
rec = Recorder()
ours = torch.compile(lambda q, k, v: da.attention_forward(q, k, v, *BSND), fullgraph=True, backend=rec)
with torch.no_grad():
    for s in [40] + lengths:
        q, k, v = (torch.randn(1, s, 2, 8) for _ in range(3))
        ours(q, k, v)
print(json.dumps({"lengths": lengths, "compiles": rec.compiles,
                  "runtime_op": ["diffsynth_attention.dispatch" in str(g.code) for g in rec.forward_graphs],
                  "baked": [s for g in rec.forward_graphs for s in ("torch_flash", "math", "flash") if s in str(g.code)][:3]}))
"""


def test_a_bucket_whose_lengths_picked_different_backends_bakes_one_near_all(children):
    """Three lengths of one bucket, their picks split between torch and torch_flash at 1-2% apart
    (a GPU's near-ties between kernels): the symbolic graph bakes the backend within 5% of every
    length's own pick, where it held the run-time operator."""
    requires_bake()
    got = children["buckets", "split"].get()
    assert len(got["lengths"]) == 3, got
    assert got["compiles"] == 2 and not got["runtime_op"][-1], got


# One fresh process per case, each with a cache folder of its own, started when collection ends.
UNPARAMETRIZED = {"test_resolutions_under_the_default_compile_bake_a_backend_per_bucket": ("buckets", "on"),
                  "test_where_nothing_is_known_symbolic_lengths_keep_the_run_time_operator": ("buckets", "off"),
                  "test_a_bucket_whose_lengths_picked_different_backends_bakes_one_near_all": ("buckets", "split")}
prespawn(__name__, lambda item: UNPARAMETRIZED.get(item.name) or next(iter(item.callspec.params.items())),
         {**{("form", f): (lambda env, f=f: run(form_code(f), env)) for f in FORMS},
          **{("mode", m): (lambda env, m=m: run(lengths_code(m), env)) for m in MODES},
          **{("buckets", t): (lambda env, t=t: run(buckets_code({"on": "1", "off": "0"}[t]), env)) for t in ("on", "off")},
          ("buckets", "split"): lambda env: run(SPLIT_CODE, env)})
