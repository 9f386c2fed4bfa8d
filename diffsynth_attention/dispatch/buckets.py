"""One backend for a bucket of sequence lengths: what a graph with symbolic lengths bakes
(:func:`diffsynth_attention.dispatch.baked.bake_bucket`) from the stored decisions of the lengths
it has seen."""

from __future__ import annotations

from typing import Optional

from ..states import TIMED

BUCKET_SLACK = 0.05  # a bucket's backend runs every known length within this of that length's own pick


def bucket_backend(decisions: list, mode: str, slack: float = BUCKET_SLACK) -> Optional[str]:
    """The backend one graph bakes for a bucket of lengths whose stored ``decisions`` are these:
    their common pick for ``mode``; where the picks differ (near-ties between kernels, common on a
    GPU), the backend whose worst cost over the decisions, each against its own pick's, is lowest,
    if that worst is within ``slack`` and the backend passed the gate in every one of them (their
    candidates were timed in the same rounds); else None (the run-time operator)."""
    picks = {dd.backend_for(mode) for dd in decisions}
    if len(picks) == 1:
        return picks.pop()
    best = None
    for name in sorted(set.intersection(*(set(dd.candidates) for dd in decisions))):
        worst = 0.0
        for dd in decisions:
            cand, own = dd.candidates[name], dd.candidates.get(dd.backend_for(mode))
            cost, own_cost = cand.cost(mode), None if own is None else own.cost(mode)
            if cand.status not in TIMED or cost is None or not own_cost:
                break
            worst = max(worst, cost / own_cost)
        else:
            if best is None or worst < best[0]:
                best = (worst, name)
    return best[1] if best is not None and best[0] <= 1 + slack else None
