"""The whole paged step of the tiny architectures through the cuda/rocm Triton kernels, under
TRITON_INTERPRET=1: a mixed schedule of prefill chunks and decode tokens of four sequences
(blocks scattered over the pool; all-decode steps take the split-KV kernels) gives each
sequence the logits the reference interpreter gives it alone."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from llmc.compiler.codegen.triton.plan import PlanOptions, lower_to_plan  # noqa: E402
from llmc.compiler.frontend import import_hf_model  # noqa: E402
from llmc.compiler.ir import parse_module, print_module  # noqa: E402
from llmc.compiler.passes import PassManager, build_pipeline, get_pass  # noqa: E402
from llmc.runtime.executor_triton import TritonExecutor  # noqa: E402
from llmc.runtime.step import StepBatch  # noqa: E402
from tests.paged import check_mixed_batches, pool_args  # noqa: E402
from tests.tiny_models import TINY_ARCHS, tiny_model  # noqa: E402

STEP_ARGS = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start", "logits_index")
DEFAULT = {"llama", "gemma2"}  # GQA; window + softcaps + GeGLU + (1 + w) norms (the rest: --runslow)


def executor_step(executor, module):
    """Adapt an executor to tests/paged.py's step function (the executor keeps its own pools)."""

    def run(inputs):
        batch = StepBatch(*(inputs[k].numpy().astype(np.int64) for k in STEP_ARGS))
        return [torch.from_numpy(executor.step(batch))] + [inputs[a.name] for a in pool_args(module)]

    return run


def optimized(imported, block_size=16):
    module = parse_module(print_module(imported.module))
    module.attrs["kv_block_size"] = block_size
    return PassManager([get_pass("select-logits")] + list(build_pipeline("cuda", 2))).run(module)


def reference(imported):
    before = parse_module(print_module(imported.module))
    get_pass("select-logits").run(before)
    return before


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-4), ("bf16", 3e-2)])
@pytest.mark.parametrize("arch", [a if a in DEFAULT else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(TINY_ARCHS)])
def test_mixed_batches_through_triton_kernels(arch, dtype, atol, tmp_path):
    if dtype == "bf16" and arch != "llama":
        pytest.skip("bf16 on llama only (the fp32 runs cover every kernel's logic)")
    model = tiny_model(arch)
    imported = import_hf_model(model)
    paged = optimized(imported)
    plan = lower_to_plan(paged, PlanOptions(arch="interpret", dtype=dtype))
    plan.write_sources(str(tmp_path / "src"))
    executor = TritonExecutor(plan.to_json(), str(tmp_path / "src"), imported.weights, num_blocks=64,
                              max_model_len=128, vocab_size=model.config.vocab_size, interpret=True)
    worst = check_mixed_batches(reference(imported), paged, imported.weights, model.config.vocab_size, atol=atol,
                                run=executor_step(executor, paged), num_blocks=64)
    assert worst <= atol
    kinds = {plan.kernels[e["kernel"]].template for e in plan.launches}
    assert {"attention_prefill.py.j2", "attention_decode.py.j2", "gemm.py.j2", "gemv.py.j2"} <= kinds


def test_unsupported_block_size_is_refused():
    from llmc.compiler.codegen.triton.emit import CodegenError

    paged = optimized(import_hf_model(tiny_model("llama")), block_size=8)
    with pytest.raises(CodegenError, match="--kv-block-size 16"):
        lower_to_plan(paged)


def test_engine_shares_a_partly_filled_block_on_the_triton_executor(tmp_path):
    """PlanRunner.copy_blocks (the cuda and Triton executors): a repeated prompt is served from
    a copy of its partly filled last block, with the first run's tokens and log-probabilities."""
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampler import SamplingParams

    model = tiny_model("llama")
    imported = import_hf_model(model)
    plan = lower_to_plan(optimized(imported), PlanOptions(arch="interpret", dtype="f32"))
    plan.write_sources(str(tmp_path / "src"))
    executor = TritonExecutor(plan.to_json(), str(tmp_path / "src"), imported.weights, num_blocks=16,
                              max_model_len=128, vocab_size=model.config.vocab_size, interpret=True)
    engine = Engine(executor)
    prompt = [(5 * i) % 90 + 4 for i in range(21)]  # a full block of 16 + 5

    def run():
        engine.add_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True, logprobs=3))
        samples = []
        while engine.has_unfinished():
            samples += [x for o in engine.iterate() for x in o.new_samples]
        return [x.token for x in samples], [dict(x.top_logprobs) for x in samples]

    tokens1, top1 = run()
    tokens2, top2 = run()
    assert engine.blocks.partial_hits == 1 and tokens1 == tokens2
    for a, b in zip(top1, top2):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
