"""The cpu fused dequantize-matmul kernels against the IR's meaning (dequantize, then linear)
on random inputs: every layout GGUF import and the quantize pass produce, as a decode GEMV
(one row) and a prefill GEMM (a dynamic row count that is no multiple of the row tile)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import te, tirx as tir

from llmc.compiler.codegen.cpu import pack_weight
from llmc.compiler.codegen.tvm.kernels import BUILDERS, PACK, DimMap, PackedWeight
from llmc.compiler.codegen.tvm.schedule import schedule_primfunc
from llmc.compiler.ir import TensorType, symbol
from llmc.compiler.ir.quant import code_range, dequantize, pack_codes
from llmc.runtime.cpu_features import host_mcpu

N, K = 64, 256
LAYOUTS = {  # bits, group, signed, mins: the GGUF block types and the quantize schemes
    "q4_0": (4, 32, True, False), "q4_1": (4, 32, False, True), "q8_0": (8, 32, True, False),
    "q5_0": (5, 32, True, False), "q5_1": (5, 32, False, True),
    "q5_k": (5, 32, False, True), "q6_k": (6, 16, True, False), "q4a_g128": (4, 128, False, True),
    "q8a_g64": (8, 64, False, True),
}


class _Ctx:
    def __init__(self, dims):
        self.dims = dims

    def shape(self, t):
        return self.dims.shape(t.shape)


def random_layout(bits, group, signed, mins, g, kquant=False):
    lo, hi = code_range(bits, signed)
    codes = pack_codes(torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int32), bits, signed)
    dtype = torch.float32 if kquant else torch.float16  # K-quant scales are fp32 products
    scales = (torch.rand(N, K // group, generator=g) * 0.02).to(dtype)
    m = (torch.randn(N, K // group, generator=g) * 0.05).to(dtype) if mins else None
    return codes, scales, m


def run_kernel(layout, x, decode, mcpu=None):
    bits, group, signed, mins = LAYOUTS[layout]
    codes, scales, m = layout_tensors = random_layout(bits, group, signed, mins, torch.Generator().manual_seed(bits * group),
                                                     layout.endswith("_k"))
    tensors = [t for t in layout_tensors if t is not None]
    rows = 1 if decode else tir.Var("T", "int64")
    xt = te.placeholder((rows, K), "float32", name="x")
    holders = [te.placeholder((N // PACK, t.shape[1], PACK), str(t.numpy().dtype), name=f"w{i}")
               for i, t in enumerate(tensors)]
    ops = [xt] + [PackedWeight(h, N, int(t.shape[1])) for h, t in zip(holders, tensors)]
    out = TensorType((1 if decode else symbol("T"), N), "f32")
    y = BUILDERS["quantized_linear"](ops, {"bits": bits, "group_size": group, "signed": signed}, out,
                                      _Ctx(DimMap({"T": rows})))
    func = schedule_primfunc(te.create_prim_func([xt] + holders + [y]), decode)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu or host_mcpu(), "num-cores": 2})
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()["main"]
    args = [tvm.runtime.tensor(x.numpy())] + [tvm.runtime.tensor(pack_weight(t.numpy(), PACK)) for t in tensors]
    result = tvm.runtime.tensor(np.full((x.shape[0], N), np.nan, np.float32))
    f(*args, result)
    want = F.linear(x, dequantize(codes, scales, m, bits=bits, group_size=group, signed=signed))
    return result.numpy(), want.numpy(), func


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_decode_gemv_matches_interpreter(layout):
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(1))
    got, want, func = run_kernel(layout, x, decode=True)
    assert "float32" in str(func) and np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())


@pytest.mark.parametrize("layout", ["q4_0", "q4_1", "q5_0", "q6_k", "q8a_g64"])
def test_prefill_gemm_matches_interpreter(layout):
    x = torch.randn(13, K, generator=torch.Generator().manual_seed(2))
    got, want, func = run_kernel(layout, x, decode=False)
    assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())
    # the weight is dequantized where it is read: the only buffer is the register accumulator tile
    assert str(func).count("alloc_buffer") == 1 and 'scope="local"' in str(func)


@pytest.mark.parametrize("layout", ["q4_1", "q6_k"])
def test_avx2_build_matches_interpreter(layout):
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    got, want, _ = run_kernel(layout, x, decode=False, mcpu="haswell")
    assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())
