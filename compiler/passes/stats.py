"""Op and fused-region counts per decoder layer, for `llmc compile --verbose` and the docs."""

from __future__ import annotations

import re
import statistics
from collections import Counter

from ..ir import Function

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _param_layer(op) -> int:
    m = _LAYER.search(op.attrs["name"]) if op.kind == "param" else None
    return int(m.group(1)) if m else -1


def layer_stats(fn: Function) -> dict:
    """Top-level ops and fused regions per decoder layer (median over the layers but the last).

    An op belongs to the highest layer whose weights (``layers.N.``) it depends on, directly or
    through its operands; the last layer also collects the final norm and LM head, so it is
    left out of the median. Param reads count with their layer."""
    layer_of: dict[int, int] = {}
    ops_per, fused_per = Counter(), Counter()
    for op in fn.body.ops:
        layer = max([_param_layer(op)] + [layer_of.get(id(v), -1) for v in op.operands])
        for r in op.results:
            layer_of[id(r)] = layer
        ops_per[layer] += 1
        fused_per[layer] += op.kind == "fused"
    ops = fn.body.ops
    layers = sorted(k for k in ops_per if k >= 0)
    inner = layers[:-1] or layers
    return {
        "ops": len(ops),
        "fused": sum(op.kind == "fused" for op in ops),
        "ops_in_regions": sum(len(op.region.ops) for op in ops if op.region is not None),
        "layers": len(layers),
        "ops_per_layer": statistics.median(ops_per[k] for k in inner) if inner else None,
        "fused_per_layer": statistics.median(fused_per[k] for k in inner) if inner else None,
    }
