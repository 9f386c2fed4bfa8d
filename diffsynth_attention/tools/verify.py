"""``diffsynth-attention cache verify``: re-time stored decisions against the default and the
runner-up, list the ones that no longer hold, and (``--fix``) tune those again.

A decision is re-timed on random inputs of its key's problem, on this machine's device, through
the hot path with each backend forced (the same host cost for every candidate), interleaved in a
new order every round (:func:`~diffsynth_attention.tuning.timing.interleaved`). It *holds* when no
re-timed candidate is more than ``margin`` (3%) faster than the stored choice. A provisional
decision (too noisy when it was tuned) is listed as such; ``--fix`` tunes it again, like one that
no longer holds, with the confirmation step of the tuner deciding what is stored.

Each decision is re-timed and tuned again at its own quality tier (its key's), whatever
``DIFFSYNTH_ATTENTION_QUALITY`` says. A decision of a low-precision tier is cleared by ``--fix``, not
tuned again here: its gate runs only on a pipeline's own activations (docs/quality.md), and the
next real call of its key gates it.
"""

from __future__ import annotations

import json
import logging
import sys

from .cli_common import Failure, Usage

logger = logging.getLogger("diffsynth_attention")

MARGIN = 0.03


def _shape_of(key: dict) -> tuple:
    """(shape-suite row, layout) rebuilding ``key``'s calls, or (None, why not)."""
    p = key["problem"]
    if p.get("memory") is not None or p.get("tf32"):
        return None, "tensors in another memory order, or TF32 on: verified by the pipeline's own calls"
    if p.get("mask") != "none":
        return None, "masked problems are verified by the pipeline's own calls (the mask's values matter)"
    if p.get("head_dim_v") != p.get("head_dim"):
        return None, "head_dim_v differs from head_dim"
    patterns = [x.strip() for x in p["layout"].replace("->", ",").split(",")]
    if len(set(patterns)) != 1 or "(" in patterns[0]:
        return None, f"layout {p['layout']!r} is not one plain pattern"
    shape = {f: p[f] for f in ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim", "dtype", "causal", "window")}
    return shape, patterns[0]


def verify(dispatcher, decisions: list, device, fix: bool = False, samples: int = 15, clock=None) -> list:
    """One row per decision of ``decisions`` (those tuned on ``device``'s kind of device):
    {key_id, problem, backend, provisional, times, verdict, holds, fixed}."""
    import torch

    from ..backends import device_info
    from ..describe import describe_key
    from ..overrides import use_backend
    from ..store.decision import DEFAULT_BACKEND, decision_filter
    from ..tiers import EXACT, quality
    from ..tuning.timing import interleaved
    from .inputs import make_inputs

    here = device_info(device)
    rows = []
    for decision in decisions:
        row = {"key_id": decision.key_id, "problem": describe_key(decision.key), "backend": decision.backend,
               "provisional": decision.provisional, "times": {}, "holds": None, "fixed": None}
        rows.append(row)
        dev = decision.key.get("device", {})
        if dev.get("type") != here.type or dev.get("name") != here.name:
            row["verdict"] = f"skipped: tuned on {dev.get('name')}, not this {here.name}"
            continue
        shape, layout = _shape_of(decision.key)
        if shape is None:
            row["verdict"] = f"skipped: {layout}"
            continue
        q, k, v, kwargs = make_inputs(shape, device, None, layout)
        names = [decision.backend] + [n for n in (DEFAULT_BACKEND, decision.runner_up()) if n and n != decision.backend]

        tier = decision.key.get("quality", EXACT)  # the decision's own tier, not the environment's

        def forced(name):
            def call():
                with use_backend(name):
                    return dispatcher.forward(q, k, v, **kwargs)
            return call

        def serves(name):  # a forced backend that cannot serve the call falls back to torch: never timed under its name
            with use_backend(name):
                return dispatcher.explain(q, k, v, **kwargs).backend == name
        try:
            with quality(tier):  # the key the calls are timed under (their plans: forced backends)
                if not serves(decision.backend):
                    raise RuntimeError(f"{decision.backend} cannot serve this call here")
                names = [n for n in names if n == decision.backend or serves(n)]
            with torch.no_grad(), quality(tier):
                times = interleaved({n: forced(n) for n in names}, device, samples=samples,
                                    **({} if clock is None else {"clock": clock}))
        except Exception as exc:  # a backend that cannot run here now: that is the finding
            row["verdict"] = f"no longer holds: re-timing raised {type(exc).__name__}: {str(exc)[:200]}"
            row["holds"] = False
        else:
            row["times"] = times
            chosen = times[decision.backend]
            best = min(times, key=times.get)
            if times[best] < chosen / (1 + MARGIN):
                row["holds"] = False
                row["verdict"] = f"no longer holds: {best} {chosen / times[best]:.2f}x faster"
            else:
                row["holds"] = True
                row["verdict"] = "holds" + (" (provisional)" if decision.provisional else "")
        if fix and (row["holds"] is False or decision.provisional):
            dispatcher.store.clear(decision_filter(key=decision.key_id))  # its listeners drop the plans
            if tier != EXACT:  # never gated on random inputs: the pipeline's next call of the key gates it
                row["fixed"] = f"cleared (the next real call at the {tier} tier tunes and gates it)"
                continue
            with quality(EXACT):
                info = dispatcher.explain(q, k, v, **kwargs)
            row["fixed"] = info.backend + (" (provisional)" if info.decision is not None and info.decision.provisional else "")
    return rows


def cmd_cache_verify(args) -> int:
    from ..dispatch import default_dispatcher
    from ..store.decision import decision_filter
    from .devices import resolve_device
    from .verify import verify

    device = resolve_device(args.device)
    dispatcher = default_dispatcher()
    if args.shapes:
        from .shapes import load_shapes_file
        from .warm import known

        found = [known(s, device) for s in load_shapes_file(args.shapes)]
        decisions = [info.decision for info in found if info is not None]
    else:
        match = decision_filter(key=args.key)
        decisions = [d for d in dispatcher.store.entries().values() if match is None or match(d)]
    if args.key and not decisions:
        raise Failure(f"no decision has a key id starting with {args.key}")
    if args.key and len(decisions) > 1:  # one problem: a prefix of several ids is ambiguous
        raise Usage(f"--key {args.key} is the start of {len(decisions)} key ids ("
                    + ", ".join(sorted(d.key_id for d in decisions)[:5]) + (", ..." if len(decisions) > 5 else "")
                    + "): give more of the one to verify")
    rows = verify(dispatcher, decisions, device, fix=args.fix)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        for r in rows:
            times = ", ".join(f"{n} {ms:.4g}" for n, ms in r["times"].items())
            print(f"{r['key_id']} {r['problem']}: {r['backend']}: {r['verdict']}" + (f" [{times} ms]" if times else "")
                  + (f" -> tuned again: {r['fixed']}" if r["fixed"] else ""))
    failing = sum(1 for r in rows if r["holds"] is False)
    provisional = sum(1 for r in rows if r["provisional"])
    print(f"{len(rows)} decision(s) verified: {sum(1 for r in rows if r['holds'])} hold, {failing} no longer hold, "
          f"{provisional} provisional" + (f"; {sum(1 for r in rows if r['fixed'])} tuned again" if args.fix else ""),
          file=sys.stderr if args.json else sys.stdout)
    return 0
