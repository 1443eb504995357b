"""CPU schedules for the kernels of ``kernels.py`` / ``lower.py``.

TVM leaves a compute as naive loop nests (100x slower than scheduled, see TOOLCHAIN.md), so
every PrimFunc gets a schedule here:

- packed linear (the hot path, >95% of decode time): output columns in blocks of PACK = 32
  (two AVX-512 vectors), blocks in parallel, the reduction over K streaming the packed weight
  contiguously, accumulators in registers (cache_write to "local"), 4 token rows at a time in
  prefill so each weight block is reused from cache; epilogues (glu, residual add, bias) are
  inlined into the write-back.
- everything else: injective producers inlined, the outer spatial loops fused and run in
  parallel, the innermost spatial loop vectorized where it is not a reduction.
"""

from __future__ import annotations

import logging

import tvm
from tvm import tirx as tir
from tvm.s_tir import Schedule

from .kernels import PACK

log = logging.getLogger("llmc.codegen")

from .kernels import ROW_TILE as ROWS
VECTOR = 16
SERIAL_EXTENT = 1 << 15  # elements of a decode-step kernel below which it runs without the thread pool


def _is_reduction(sch: Schedule, block) -> bool:
    return any(iv.iter_type == tir.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _spatial_loop_count(sch: Schedule, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == tir.IterVar.DataPar)


def _extent(sch: Schedule, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tir.IntImm) else None


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # a schedule primitive refusing is normal: keep the simpler schedule
        return False


def _inline_injective(sch: Schedule) -> None:
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(_root(sch)):
            name = sch.get(block).name_hint
            if name.startswith(("linear", "kv_write", "attn_")) or _is_reduction(sch, block):
                continue
            if _try(sch.compute_inline, block):
                changed = True
                break


def _root(sch: Schedule):
    """The root block (None where a PrimFunc has none: its blocks are then top level)."""
    try:
        return sch.get_sblock("root")
    except Exception:
        return None


def _parallel_vectorize(sch: Schedule, block, decode: bool = False) -> None:
    """Fuse the spatial loops, run the outer part in parallel and vectorize the inner part.
    ``decode``: a kernel of the one-token step whose static extent is at most SERIAL_EXTENT
    runs on the calling thread (waking the pool costs 1-8 us a launch, the work well under 1)."""
    loops = sch.get_loops(block)
    n_spatial = _spatial_loop_count(sch, block)
    if n_spatial == 0:
        return
    spatial = loops[:n_spatial]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    extent = _extent(sch, fused)
    serial = decode and extent is not None and extent <= SERIAL_EXTENT
    if _is_reduction(sch, block):
        if not serial:
            sch.parallel(fused)
        return
    outer, inner = sch.split(fused, [None, VECTOR])
    if not serial:
        sch.parallel(outer)
    _try(sch.vectorize, inner)


def _schedule_linear(sch: Schedule, block, decode: bool) -> None:
    loops = sch.get_loops(block)
    *lead, n, k = loops
    if _extent(sch, n) is None or _extent(sch, n) % PACK:
        _parallel_vectorize(sch, block)
        return
    m = sch.fuse(*lead) if len(lead) > 1 else (lead[0] if lead else None)
    if m is not None and _extent(sch, m) == 1:
        decode = True
    no, ni = sch.split(n, [None, PACK])
    consumers = sch.get_consumers(block)
    if decode or m is None:
        sch.reorder(*([no, m] if m is not None else [no]), k, ni)
        anchor = m if m is not None else no
    else:
        mo, mi = sch.split(m, [None, ROWS])
        sch.reorder(no, mo, k, mi, ni)
        sch.unroll(mi)
        anchor = mo
    sch.parallel(no)
    write = sch.cache_write(block, 0, "local")  # accumulators in registers
    sch.reverse_compute_at(write, anchor)
    for consumer in consumers:  # epilogues (glu, residual add, bias) into the write-back
        _try(sch.reverse_compute_inline, consumer)
    sch.vectorize(ni)  # before decompose_reduction: only a complete reduction block may be vectorized
    sch.decompose_reduction(block, k)
    _try(sch.vectorize, sch.get_loops(write)[-1])


def _schedule_attention(sch: Schedule) -> None:
    """Scores vectorized over 16 key positions (the key cache is [Hkv, D, S]) with register
    accumulators; probabilities x values vectorized over the value dim, accumulators in
    registers; exp materialized once (not per value column); every stage parallel over
    (token, head). The position extent is a multiple of 16 (the step counts it in blocks)."""
    score = sch.get_sblock("attn_score")
    i, h, j, kd = sch.get_loops(score)
    sch.parallel(sch.fuse(i, h))
    jo, ji = sch.split(j, [None, VECTOR])
    sch.reorder(jo, kd, ji)
    write = sch.cache_write(score, 0, "local")
    sch.reverse_compute_at(write, jo)
    sch.vectorize(ji)
    sch.decompose_reduction(score, kd)
    _try(sch.vectorize, sch.get_loops(write)[-1])
    for name in ("attn_max", "attn_sum", "attn_exp", "attn_out"):
        b = sch.get_sblock(name)
        sch.parallel(sch.fuse(*sch.get_loops(b)[:2]))
    exp = sch.get_sblock("attn_exp")
    _, inner = sch.split(sch.get_loops(exp)[-1], [None, VECTOR])
    _try(sch.vectorize, inner)
    pv = sch.get_sblock("attn_pv")
    i, h, e, j = sch.get_loops(pv)
    sch.reorder(j, e)
    outer = sch.fuse(i, h)
    sch.parallel(outer)
    write = sch.cache_write(pv, 0, "local")
    sch.reverse_compute_at(write, outer)
    sch.vectorize(sch.get_loops(pv)[-1])
    sch.decompose_reduction(pv, sch.get_loops(pv)[1])


def schedule_primfunc(func: tir.PrimFunc, decode: bool) -> tir.PrimFunc:
    sch = Schedule(func)
    _inline_injective(sch)
    root = _root(sch)
    blocks = list(sch.get_child_blocks(root))
    if any(sch.get(b).name_hint == "attn_score" for b in blocks):
        _schedule_attention(sch)
        return sch.mod["main"]
    linears = [b for b in blocks if sch.get(b).name_hint.startswith("linear")]
    for b in linears:
        _schedule_linear(sch, b, decode)
    for b in sch.get_child_blocks(root):
        name = sch.get(b).name_hint
        if name.startswith("linear") or sch.get_loops(b) == [] or _scheduled(sch, b):
            continue
        _try(_parallel_vectorize, sch, b, decode)
    return sch.mod["main"]


def _scheduled(sch: Schedule, block) -> bool:
    return any(sch.get(loop).kind != tir.ForKind.SERIAL for loop in sch.get_loops(block))


def schedule_module(mod: tvm.IRModule) -> tvm.IRModule:
    """Schedule every PrimFunc; those only the decode entry point calls get the GEMV schedule."""
    decode_only = _called_only_by(mod, "decode")
    out = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tir.PrimFunc) and "llmc.kind" not in (func.attrs or {}):
            try:
                func = schedule_primfunc(func, gvar.name_hint in decode_only)
            except Exception as exc:  # keep the function correct, if slower, and say so
                log.warning("kernel %s left unscheduled: %s", gvar.name_hint, exc)
        out[gvar] = func
    return tvm.IRModule(out, attrs=mod.attrs)


def _called_only_by(mod: tvm.IRModule, entry: str) -> set[str]:
    callers: dict[str, set[str]] = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tvm.relax.Function):
            def visit(expr, fname=gvar.name_hint):
                if isinstance(expr, tvm.ir.GlobalVar):
                    callers.setdefault(expr.name_hint, set()).add(fname)
            tvm.relax.analysis.post_order_visit(func, visit)
    return {name for name, who in callers.items() if who == {entry}}
