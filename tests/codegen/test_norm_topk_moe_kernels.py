"""The cpu kernels of layer_norm, topk, moe and the newer unary ops, scheduled as the target
schedules them, against the interpreter's meanings on fresh random inputs."""

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from llmc.compiler.codegen.tvm.kernels import BUILDERS, DimMap
from llmc.compiler.codegen.tvm.lower import _KernelCtx
from llmc.compiler.codegen.tvm.schedule import schedule_primfunc
from llmc.compiler.ir import TensorType
from llmc.compiler.ir.interpreter import IMPLS, moe_reference
from llmc.runtime.cpu_features import host_mcpu


def _run(kind, attrs, inputs, out_types, dtypes=None):
    """Build the kind's TE kernel over placeholders shaped like ``inputs``, schedule, compile, run."""
    places = [te.placeholder(tuple(x.shape), dtype=str(x.dtype).replace("torch.", ""), name=f"in{i}")
              for i, x in enumerate(inputs)]
    outs = BUILDERS[kind](places, attrs, out_types[0], _KernelCtx(kind, DimMap({})))
    outs = outs if isinstance(outs, list) else [outs]
    func = schedule_primfunc(te.create_prim_func(places + outs), decode=False)
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": 2})
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(x.numpy()) for x in inputs]
    results = [tvm.runtime.tensor(np.zeros([int(d) for d in o.shape], dtype=str(o.dtype))) for o in outs]
    lib["main"](*args, *results)
    return [torch.from_numpy(r.numpy()) for r in results]


class _Frame:
    op = None


@pytest.mark.parametrize("affine", [0, 1, 2])
def test_layer_norm(affine):
    torch.manual_seed(affine)
    x = torch.randn(9, 48) * 3 + 1
    params = [torch.randn(48), torch.randn(48)][:affine]
    (got,) = _run("layer_norm", {"eps": 1e-5}, [x] + params, [TensorType((9, 48), "f32")])
    want = IMPLS["layer_norm"]([x] + params, {"eps": 1e-5}, _Frame())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_with_ties():
    torch.manual_seed(3)
    x = torch.randn(11, 8)
    x[4] = 0.25
    x[5, 2] = x[5, 6] = x[5].max() + 1
    values, index = _run("topk", {"k": 3}, [x], [TensorType((11, 3), "f32")])
    want_v, want_i = IMPLS["topk"]([x], {"k": 3}, _Frame())
    torch.testing.assert_close(values, want_v)
    assert torch.equal(index, want_i)


@pytest.mark.parametrize("gated, bias, activation, extra_attrs", [
    (True, False, "silu", {}), (False, True, "gelu_tanh", {}),
    (True, True, "swish_alpha", {"alpha": 1.702, "limit": 0.5, "up_offset": 1.0}),  # GPT-OSS's gate
    (True, False, "silu", {"limit": 0.3}),  # DeepSeek-V4's clamped SwiGLU
])
def test_moe_selected_experts(gated, bias, activation, extra_attrs):
    torch.manual_seed(5)
    t, d, inner, e, k = 6, 32, 20, 5, 2
    x, ids, w = torch.randn(t, d), torch.randint(0, e, (t, k)), torch.rand(t, k)
    up, down = torch.randn(e, 2 * inner if gated else inner, d) * 0.2, torch.randn(e, d, inner) * 0.2
    extra = [torch.randn(e, up.shape[1]), torch.randn(e, d)] if bias else []
    (got,) = _run("moe", {"activation": activation, "gated": gated, **extra_attrs}, [x, ids, w, up, down] + extra,
                  [TensorType((t, d), "f32")])
    want = moe_reference(x, ids, w, up, down, *(extra or [None, None]), activation=activation, gated=gated,
                         **extra_attrs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["softplus", "log1p", "floor", "erf"])
def test_new_unary_ops(kind):
    torch.manual_seed(7)
    x = torch.randn(64) * 10
    if kind == "log1p":
        x = x.abs()
    (got,) = _run(kind, {}, [x], [TensorType((64,), "f32")])
    torch.testing.assert_close(got, IMPLS[kind]([x], {}, _Frame()), atol=1e-5, rtol=1e-5)
