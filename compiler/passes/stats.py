"""Op and fused-region counts per decoder layer, for `llmc compile --verbose` and the docs."""

from __future__ import annotations

import re
import statistics

from ..ir import Function

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_stats(fn: Function) -> dict:
    """Top-level ops and fused regions per decoder layer (median over layers).

    A layer's ops are those from the first read of one of its weights (``layers.N.``) up to the
    first read of the next layer's: params are read where they are first used, so this cuts
    the program at layer boundaries."""
    starts: dict[int, int] = {}
    for i, op in enumerate(fn.body.ops):
        if op.kind == "param":
            m = _LAYER.search(op.attrs["name"])
            if m:
                starts.setdefault(int(m.group(1)), i)
    ops = fn.body.ops
    total = {"ops": len(ops), "fused": sum(op.kind == "fused" for op in ops),
             "ops_in_regions": sum(len(op.region.ops) for op in ops if op.region is not None)}
    if not starts:
        return {**total, "layers": 0, "ops_per_layer": None, "fused_per_layer": None}
    bounds = sorted(starts.values()) + [None]
    per_ops, per_fused = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        segment = ops[lo:hi] if hi is not None else ops[lo:]
        if hi is None:  # the last layer runs to the final norm; cut there by counting like the others
            segment = segment[: max(per_ops) if per_ops else len(segment)]
        per_ops.append(len(segment))
        per_fused.append(sum(op.kind == "fused" for op in segment))
    return {**total, "layers": len(starts), "ops_per_layer": statistics.median(per_ops[:-1] or per_ops),
            "fused_per_layer": statistics.median(per_fused[:-1] or per_fused)}
