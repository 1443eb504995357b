"""GPU schedules (threadgroups and threads) for the TE kernels of ``kernels.py`` / ``lower.py``,
used by the metal target. The cpu schedules of ``schedule.py`` are untouched.

- linear (and quantized linear, whose GGUF blocks are dequantized in registers where the
  kernel reads them): decode rows (a static row count of at most 4) get a GEMV schedule, one
  thread per output column (consecutive threads read consecutive columns of the packed
  ``[N/32, K, 32]`` weight, so every step over K is one coalesced read), the sum over K split
  across ``threadIdx.y`` lanes (rfactor, then a cross-thread reduction into threadgroup
  memory, from which the epilogue stores the tile in the same kernel); prefill rows get a
  shared-memory tiled GEMM (BM x BN output tile per threadgroup, BK-deep slabs of the
  activations and weights staged in threadgroup memory by all threads, a VM x VN register tile
  per thread). dlight's ``gpu.Matmul`` is not used: it crashes for Metal at M >= 16.
  Epilogues (glu, residual add, bias, the fp16 store) go into the register write-back.
- reductions (RMSNorm, softmax, layer_norm, sums): dlight's ``GeneralReduction`` /
  ``Reduction`` (one threadgroup per row, cross-thread reductions).
- everything else: dlight's ``Fallback`` (spatial loops over threads).

A kernel no rule schedules raises :class:`GpuScheduleError` naming the kernel and its blocks.
"""

from __future__ import annotations

import logging
from typing import Optional

import tvm
from tvm import tirx as tir
from tvm.s_tir import Schedule

log = logging.getLogger("llmc.codegen")

# Metal limits on every Apple GPU family (M1..M4): 1024 threads and 32 KiB of threadgroup
# memory per threadgroup, SIMD groups of 32.
METAL_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 32768,
                "max_thread_x": 1024, "max_thread_y": 1024, "max_thread_z": 64, "max_vthread": 1,
                "max_vector_bytes": 16, "max_local_memory_per_block": 2 ** 31 - 1}

GEMV_MAX_ROWS = 4            # static row counts up to this take the GEMV schedule
GEMV_COLUMNS = 64            # output columns per threadgroup (threadIdx.x)
GEMV_SPLIT_K = 4             # threadIdx.y lanes sharing one column's sum over K
GEMM_TILE = (32, 32, 16)     # BM, BN, BK
GEMM_THREADS = (8, 8)        # threadIdx.y, threadIdx.x: each thread a (BM/8) x (BN/8) register tile


class GpuScheduleError(RuntimeError):
    """A kernel that no GPU schedule covers."""


def _is_reduction(sch: Schedule, block) -> bool:
    return any(iv.iter_type == tir.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _root(sch: Schedule):
    try:
        return sch.get_sblock("root")
    except Exception:
        return None


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # a primitive refusing is normal: keep the simpler schedule
        return False


def _extent(sch: Schedule, loop) -> Optional[int]:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tir.IntImm) else None


def _bound(sch: Schedule, block) -> bool:
    return any(sch.get(loop).thread_binding is not None for loop in sch.get_loops(block))


def _inline(sch: Schedule) -> None:
    """Inline every injective block (widening loads, unpacking, elementwise chains) into its
    consumers; linears and reductions stay."""
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(_root(sch)):
            name = sch.get(block).name_hint
            if name.startswith("linear") or _is_reduction(sch, block):
                continue
            if _try(sch.compute_inline, block):
                changed = True
                break


def _rows(sch: Schedule, block) -> Optional[int]:
    """Static row count of a linear block (product of its leading spatial loops), else None."""
    loops = sch.get_loops(block)
    total = 1
    for loop in loops[:-2]:
        ext = _extent(sch, loop)
        if ext is None:
            return None
        total *= ext
    return total


def _epilogues_into(sch: Schedule, block, write) -> None:
    for consumer in sch.get_consumers(block):
        if consumer != write:
            _try(sch.reverse_compute_inline, consumer)
    for consumer in sch.get_consumers(write):  # an fp16 store after an inlined epilogue
        _try(sch.reverse_compute_inline, consumer)


def schedule_gemv(sch: Schedule, block) -> None:
    """Decode rows: one thread per (row, output column), the K sum split over threadIdx.y lanes
    (rfactor) and combined by a cross-thread reduction into threadgroup memory, from which the
    epilogue (glu, residual add, the fp16 store) writes the tile in the same kernel (TVM puts
    the barrier between them). An epilogue that does not fit stays a kernel of its own."""
    loops = sch.get_loops(block)
    *lead, n, k = loops
    m = sch.fuse(*lead) if len(lead) > 1 else (lead[0] if lead else sch.add_unit_loop(block))
    n_ext = _extent(sch, n)
    cols = GEMV_COLUMNS if n_ext is None or n_ext >= GEMV_COLUMNS else 32
    consumers = list(sch.get_consumers(block))
    no, nx = sch.split(n, [None, cols])
    ko, ky = sch.split(k, [None, GEMV_SPLIT_K])
    sch.reorder(m, no, nx, ky, ko)
    rf = sch.rfactor(ky, factor_axis=0)  # partial sums per lane
    m_, no_, nx_, ky_, ko_ = sch.get_loops(rf)
    sch.bind(m_, "blockIdx.y")
    sch.bind(no_, "blockIdx.x")
    sch.bind(nx_, "threadIdx.x")
    sch.bind(ky_, "threadIdx.y")
    sch.set_scope(rf, 0, "local")
    sch.reverse_compute_at(block, nx_, preserve_unit_loops=True)
    # the sum over the lanes: its loop (extent GEMV_SPLIT_K; the unit loops of the reduced
    # block's spatial axes follow it) on threadIdx.y, so TVM lowers it to a cross-thread
    # reduction instead of one thread reading the other lanes' registers
    inner = sch.get_loops(block)[3:]
    lanes = [lp for lp in inner if _extent(sch, lp) == GEMV_SPLIT_K]
    if len(lanes) != 1:
        raise ValueError("the GEMV's lane reduction loop was not found")
    others = [lp for lp in inner if _extent(sch, lp) != GEMV_SPLIT_K]
    if others:  # a cross-thread reduction's loop must be the innermost
        sch.reorder(*others, lanes[0])
    sch.bind(lanes[0], "threadIdx.y")
    sch.decompose_reduction(rf, ko_)
    if len(consumers) == 1:
        _epilogue_in_gemv(sch, block, consumers[0], cols)


def _epilogue_in_gemv(sch: Schedule, block, consumer, cols: int) -> bool:
    """The single consumer of a GEMV's result computed per threadgroup tile from threadgroup
    memory (tried on a copy first: a consumer that does not read the tile elementwise keeps
    its own kernel)."""
    def apply(s: Schedule) -> None:
        s.set_scope(block, 0, "shared")
        tile_loop = s.get_loops(block)[1]  # blockIdx.y (rows), blockIdx.x (column tiles), ...
        s.reverse_compute_at(consumer, tile_loop, preserve_unit_loops=True)
        inner = s.get_loops(consumer)[2:]
        spatial = [lp for lp in inner if _extent(s, lp) != 1] or inner[-1:]
        fused = s.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if _extent(s, fused) != cols:
            raise ValueError("the epilogue does not cover one tile of columns")
        s.bind(fused, "threadIdx.x")

    trial = sch.copy()
    try:
        apply(trial)
    except Exception:
        return False
    apply(sch)
    return True


def schedule_gemm(sch: Schedule, block) -> None:
    """Prefill rows: a BM x BN tile per threadgroup, BK-deep slabs of every operand staged in
    threadgroup memory by all threads, a register tile per thread, fp32 accumulators."""
    bm, bn, bk = GEMM_TILE
    ty, tx = GEMM_THREADS
    loops = sch.get_loops(block)
    *lead, n, k = loops
    m = sch.fuse(*lead) if len(lead) > 1 else (lead[0] if lead else sch.add_unit_loop(block))
    reads = len(sch.get(block).reads)
    consumers = list(sch.get_consumers(block))
    mo, my, mi = sch.split(m, [None, ty, bm // ty])
    no, nx, ni = sch.split(n, [None, tx, bn // tx])
    ko, ki = sch.split(k, [None, bk])
    sch.reorder(mo, no, my, nx, ko, ki, mi, ni)
    sch.bind(mo, "blockIdx.y")
    sch.bind(no, "blockIdx.x")
    sch.bind(my, "threadIdx.y")
    sch.bind(nx, "threadIdx.x")
    write = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write, nx)
    for consumer in consumers:
        _try(sch.reverse_compute_inline, consumer)
    for consumer in sch.get_consumers(write):
        _try(sch.reverse_compute_inline, consumer)
    for index in range(reads):
        _stage_in_shared(sch, block, index, ko, ty, tx)
    sch.unroll(ki)
    sch.decompose_reduction(block, ko)


def _stage_in_shared(sch: Schedule, block, index: int, ko, ty: int, tx: int) -> bool:
    """Stage read ``index`` of ``block`` in threadgroup memory at loop ``ko``, loaded by all
    threads. Skipped (the operand is read from device memory) where the staged region has no
    static size: Metal allocations need one, and the padded-row clamp of a dynamic-row linear
    (kernels._padded_linear) hides it from TVM's region analysis."""
    trial = sch.copy()
    try:
        shared = trial.cache_read(block, index, "shared")
        trial.compute_at(shared, ko)
        written = trial.get(shared).writes[0]
        buffer = written.source if hasattr(written, "source") else written.buffer  # 0.27: TensorRegion
        if any(not isinstance(d, tir.IntImm) for d in buffer.shape):
            return False
        fused = trial.fuse(*trial.get_loops(shared)[5:])  # below mo, no, my, nx, ko
        _, fy, fx = trial.split(fused, [None, ty, tx])
        trial.bind(fy, "threadIdx.y")
        trial.bind(fx, "threadIdx.x")
    except Exception:
        return False
    shared = sch.cache_read(block, index, "shared")
    sch.compute_at(shared, ko)
    fused = sch.fuse(*sch.get_loops(shared)[5:])
    _, fy, fx = sch.split(fused, [None, ty, tx])
    sch.bind(fy, "threadIdx.y")
    sch.bind(fx, "threadIdx.x")
    return True


def _bind_spatial(sch: Schedule, block, threads: int = 256) -> None:
    """Spatial loops fused and spread over threadgroups of ``threads``; a reduction inside
    stays serial per thread (the last resort for a block no rule covered)."""
    loops = sch.get_loops(block)
    spatial = [lp for lp, iv in zip(loops, sch.get(block).iter_vars) if iv.iter_type == tir.IterVar.DataPar]
    if not spatial:
        spatial = [sch.add_unit_loop(block)]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, txl = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(txl, "threadIdx.x")


def _dlight(func: tir.PrimFunc, target) -> Optional[tir.PrimFunc]:
    from tvm.s_tir import dlight as dl

    for rule in (dl.gpu.GeneralReduction(), dl.gpu.Reduction(), dl.gpu.Fallback()):
        try:
            out = rule.apply(func, target, False)
        except Exception as exc:  # a rule that does not fit; try the next
            log.debug("dlight %s: %s", type(rule).__name__, exc)
            continue
        if out is None:
            continue
        sch = out[0] if isinstance(out, list) else out
        return sch.mod["main"]
    return None


def schedule_gpu_primfunc(func: tir.PrimFunc, decode: bool, target, name: str = "kernel") -> tir.PrimFunc:
    """Thread/block bindings for one TE kernel (see the module docstring)."""
    func = func.with_attr("target", target) if "target" not in (func.attrs or {}) else func
    sch = Schedule(func)
    _inline(sch)
    blocks = list(sch.get_child_blocks(_root(sch)))
    linears = [b for b in blocks if sch.get(b).name_hint.startswith("linear")]
    if not linears:
        out = _dlight(sch.mod["main"], target)
        if out is None:
            raise GpuScheduleError(_no_schedule(name, sch))
        return out
    for b in linears:
        rows = _rows(sch, b)
        if rows is not None and (rows <= GEMV_MAX_ROWS or decode):
            try:
                schedule_gemv(sch, b)
                continue
            except Exception as exc:
                raise GpuScheduleError(f"kernel {name}: the GEMV schedule failed on block "
                                       f"{sch.get(b).name_hint}: {exc}") from None
        try:
            schedule_gemm(sch, b)
        except Exception as exc:
            raise GpuScheduleError(f"kernel {name}: the tiled GEMM schedule failed on block "
                                   f"{sch.get(b).name_hint}: {exc}") from None
    for b in sch.get_child_blocks(_root(sch)):
        if not _bound(sch, b) and sch.get_loops(b):
            _bind_spatial(sch, b)
    return sch.mod["main"]


def _no_schedule(name: str, sch: Schedule) -> str:
    blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(_root(sch))]
    return (f"kernel {name} (blocks {', '.join(blocks)}) has no GPU schedule: no rule of "
            f"compiler/codegen/tvm/gpu_schedule.py fits it; add one there")


def _called_only_by(mod: tvm.IRModule, entry: str) -> set[str]:
    callers: dict[str, set[str]] = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tvm.relax.Function):
            def visit(expr, fname=gvar.name_hint):
                if isinstance(expr, tvm.ir.GlobalVar):
                    callers.setdefault(expr.name_hint, set()).add(fname)
            tvm.relax.analysis.post_order_visit(func, visit)
    return {name for name, who in callers.items() if who == {entry}}


def schedule_gpu_module(mod: tvm.IRModule, target, kinds: Optional[dict] = None) -> tvm.IRModule:
    """Schedule every TE kernel of a lowered module for the GPU; hand-written kernels (with an
    ``llmc.kind`` attribute: kv_append, paged_attention) come already bound. ``kinds`` maps a
    kernel name to the IR op/node it came from, for error messages."""
    decode_only = _called_only_by(mod, "decode")
    out = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tir.PrimFunc) and "llmc.kind" not in (func.attrs or {}):
            name = gvar.name_hint
            try:
                func = schedule_gpu_primfunc(func, name in decode_only, target, name)
            except GpuScheduleError as exc:
                where = f" (IR {kinds[name]})" if kinds and name in kinds else ""
                raise GpuScheduleError(f"{exc}{where}") from None
        out[gvar] = func
    return tvm.IRModule(out, attrs=mod.attrs)


GRID_STANDIN = 512  # value of every symbolic scalar (token, sequence, block counts) while verifying


def constant_grid(func: tir.PrimFunc) -> tir.PrimFunc:
    """A device kernel with its integer scalar parameters (the symbolic token, sequence and
    block counts its grid is sized by) bound to a stand-in: VerifyGPUCode needs constant launch
    extents, and the threadgroup shape and memory it checks do not depend on the grid."""
    scalars = {}
    for p in func.params:
        dtype = str(getattr(p.ty, "dtype", ""))  # pointers have none
        if dtype.startswith("int"):
            scalars[p] = tir.IntImm(dtype, GRID_STANDIN)
    if not scalars:
        return func
    mod = tvm.IRModule({"main": func.specialize(scalars)})
    return tvm.tirx.transform.StmtSimplify()(mod)["main"]


BLOCK_LOWERING = None


def _block_lowering():
    """TVM's lowering of s_tir blocks to plain loops (the passes of its TIR pipeline that remove
    blocks, match buffers and loop pragmas)."""
    from tvm import s_tir

    return tvm.transform.Sequential([
        s_tir.transform.LowerCrossThreadReduction(), s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.LowerOpaqueBlock(), tvm.tirx.transform.FlattenBuffer(),
        tvm.tirx.transform.UnrollLoop()])  # consumes the unroll pragmas that precede their loops


def lower_for_verification(func: tir.PrimFunc, target) -> tvm.IRModule:
    """The scheduled kernel through TVM's TIR lowering up to the host/device split (blocks gone,
    buffers flattened, cross-thread reductions lowered; TVM's VerifyMemory pass runs in it and
    raises on any buffer access outside thread-bound loops)."""
    from tvm.s_tir import pipeline

    func = func.with_attr("global_symbol", "main").with_attr("target", target)
    lower = pipeline.default_s_tir_pipeline()[0]
    with target:
        return lower(tvm.IRModule({"main": func}))


def verify_gpu_kernel(func: tir.PrimFunc, target, limits: Optional[dict] = None) -> int:
    """Raise GpuScheduleError unless the scheduled kernel is well formed (s_tir's verifier on
    the block form, tirx's on the loop nest it lowers to), every buffer access is bound to
    threads (verify_memory) and every device kernel fits Metal's limits (VerifyGPUCode: threads
    per group, threadgroup memory). Returns the number of device kernels checked."""
    from tvm.s_tir.analysis import verify_gpu_code, verify_well_formed

    func = func.with_attr("global_symbol", "main").with_attr("target", target)
    if not verify_well_formed(func, assert_mode=False):
        raise GpuScheduleError("kernel is not well formed (s_tir verify_well_formed)")
    try:
        with target:
            loops = _block_lowering()(tvm.IRModule({"main": func}))["main"]
    except Exception as exc:
        raise GpuScheduleError(f"kernel does not lower: {str(exc).strip().splitlines()[-1]}") from None
    if not tvm.tirx.analysis.verify_well_formed(loops, assert_mode=False):
        raise GpuScheduleError("lowered kernel is not well formed (tirx verify_well_formed)")
    if not tvm.tirx.analysis.verify_memory(loops):
        raise GpuScheduleError("kernel touches memory outside thread-bound loops (verify_memory)")
    try:
        lowered = lower_for_verification(func, target)
    except Exception as exc:  # VerifyMemory and the lowering passes raise
        raise GpuScheduleError(f"kernel does not lower for the GPU: {str(exc).strip().splitlines()[-1]}") from None
    devices = 0
    for gvar, f in lowered.functions.items():
        if int((f.attrs or {}).get("calling_conv", 0)) == 2:  # a device kernel
            devices += 1
            if not verify_gpu_code(constant_grid(f), dict(limits or METAL_LIMITS)):
                raise GpuScheduleError(f"device kernel {gvar.name_hint} exceeds the GPU limits (VerifyGPUCode: "
                                       f"threads per group, threadgroup memory)")
    if devices == 0:
        raise GpuScheduleError("kernel has no device part (nothing is bound to threads)")
    return devices
