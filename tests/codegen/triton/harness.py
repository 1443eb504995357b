"""Run one IR function (an op, a fused region, a paged step) through the Triton kernels the
cuda/rocm code generator renders, under TRITON_INTERPRET=1 on CPU tensors."""

import tempfile

import pytest
import torch

pytest.importorskip("triton")

from llmc.compiler.codegen.triton.plan import PlanOptions, lower_to_plan  # noqa: E402
from llmc.compiler.ir import parse_module  # noqa: E402
from llmc.runtime.executor_triton import load_kernels  # noqa: E402
from llmc.runtime.launch_plan import PlanRunner  # noqa: E402

TOL = {"f32": 2e-5, "f16": 4e-3, "bf16": 3e-2}  # relative to the reference's largest magnitude


def run_ir(text: str, inputs: dict, dims: dict, weights: dict = None, dtype: str = "f32", arch: str = "interpret"):
    """Lower ``text``'s @forward to a plan (step=False), run it, return (results, plan)."""
    module = parse_module(text)
    plan = lower_to_plan(module, PlanOptions(arch=arch, dtype=dtype), step=False)
    with tempfile.TemporaryDirectory(prefix="llmc-triton-test-") as src:
        plan.write_sources(src)
        kernels = load_kernels(src, sorted(plan.kernels), interpret=True)
        runner = PlanRunner(plan.to_json(), weights or {}, 1, "cpu", lambda n, g, a: kernels[n][g](*a))
        outs = runner.run(inputs, dims)
    return outs, plan


def rounded(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """x as the kernels see it: stored in ``dtype``, read back as fp32."""
    from llmc.runtime.launch_plan import TORCH_DTYPES

    return x.to(TORCH_DTYPES[dtype]).float() if x.is_floating_point() else x


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: str, what: str = ""):
    got = got.float().reshape(want.shape)
    scale = float(want.abs().max()) or 1.0
    err = float((got - want.float()).abs().max())
    assert err <= TOL[dtype] * max(scale, 1.0), f"{what}: max error {err} (scale {scale}, dtype {dtype})"
    return err
