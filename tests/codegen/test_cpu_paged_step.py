"""The compiled cpu step serves a batch: a mixed schedule of prefill chunks and decode tokens of
four sequences (blocks scattered over the pool) through the executor gives each sequence the
logits the reference interpreter gives it alone, on every tiny architecture; and the executor
refuses inconsistent batches instead of reading outside its pools."""

import numpy as np
import pytest
import torch

from llmc.compiler.frontend import import_hf_model
from llmc.compiler.ir import parse_module, print_module
from llmc.compiler.passes import get_pass
from llmc.compiler.passes.paged_kv import PagedKV
from llmc.runtime.artifact import read_manifest
from llmc.runtime.executor_cpu import CpuExecutor
from llmc.runtime.step import StepBatch
from tests.codegen.helpers import compile_cpu
from tests.paged import check_mixed_batches, pool_args
from tests.tiny_models import TINY_ARCHS, tiny_model


def executor_step(executor, module):
    """Adapt the executor to tests/paged.py's step function (the executor keeps its own pools)."""
    n_pools = len(pool_args(module))

    def run(inputs):
        batch = StepBatch(*(inputs[k].numpy().astype(np.int64) for k in (
            "input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start", "logits_index")))
        logits = torch.from_numpy(executor.step(batch))
        return [logits] + [inputs[a.name] for a in pool_args(module)][:n_pools]

    return run


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_mixed_batches_through_the_compiled_step(arch, block_size, tmp_path):
    model = tiny_model(arch)
    imported = import_hf_model(model)
    before = parse_module(print_module(imported.module))
    get_pass("select-logits").run(before)
    paged = parse_module(print_module(before))
    PagedKV(block_size).run(paged)
    compile_cpu(imported, tmp_path / "artifact", max_seq_len=128, cache_dir=tmp_path / "cache",
                kv_block_size=block_size)
    manifest = read_manifest(str(tmp_path / "artifact"))
    assert manifest.kv_cache["dtype"] == "f32"  # --kv-dtype auto: float weights keep float32 KV (exact)
    executor = CpuExecutor(manifest, num_blocks=64)
    assert executor.block_size == block_size
    worst = check_mixed_batches(before, paged, imported.weights, model.config.vocab_size, atol=1e-4,
                                run=executor_step(executor, paged), num_blocks=64)
    assert worst <= 1e-4


def test_inconsistent_batches_are_refused(tmp_path):
    compile_cpu(import_hf_model(tiny_model("llama")), tmp_path / "artifact", max_seq_len=64,
                cache_dir=tmp_path / "cache")
    executor = CpuExecutor(read_manifest(str(tmp_path / "artifact")), num_blocks=4)
    ok = dict(input_ids=np.array([5, 6]), positions=np.array([0, 1]), slot_mapping=np.array([0, 1]),
              block_tables=np.array([[2]]), seq_lens=np.array([2]), query_start=np.array([0, 2]),
              logits_index=np.array([1]))
    assert executor.step(StepBatch(**ok)).shape == (1, 128)
    for field, bad, message in (("block_tables", np.array([[4]]), "outside the KV pool"),
                                ("slot_mapping", np.array([0, 4 * 32]), "outside the KV pool"),
                                ("query_start", np.array([0, 1]), "does not cover"),
                                ("seq_lens", np.array([1]), "more tokens than its seq_len")):
        with pytest.raises(ValueError, match=message):
            executor.step(StepBatch(**{**ok, field: bad}))


def test_a_copied_partly_filled_block_serves_a_repeated_prompt(tmp_path):
    """The engine shares a prompt's partly filled last block by copying it (copy_blocks over
    every layer's pools): the repeat computes only its last token, and its logits equal the
    first run's."""
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampler import SamplingParams

    compile_cpu(import_hf_model(tiny_model("llama")), tmp_path / "artifact", max_seq_len=128,
                cache_dir=tmp_path / "cache", kv_block_size=8)
    engine = Engine(CpuExecutor(read_manifest(str(tmp_path / "artifact")), num_blocks=32))
    prompt = [(7 * i) % 100 + 3 for i in range(21)]  # 2 full blocks of 8 + 5

    def run():
        req = engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3))
        outs = []
        while engine.has_unfinished():
            outs += engine.iterate()
        samples = [x for o in outs for x in o.new_samples]
        return req, [x.token for x in samples], [dict(x.top_logprobs) for x in samples]

    first, tokens1, logprobs1 = run()
    second, tokens2, logprobs2 = run()
    assert engine.blocks.partial_hits == 1 and second.num_cached_prompt == 20
    assert tokens1 == tokens2
    for a, b in zip(logprobs1, logprobs2):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
