"""Recurrent-state models compiled for cpu and served by the batching engine: concurrent greedy
requests of different prompt lengths (chunked prefill, decode tokens of several sequences in
one step, state slots reused) each return exactly transformers' greedy tokens, also with a
pool so small that requests are preempted and recomputed."""

import os

import pytest
import torch

from llmc.compiler.frontend import import_hf_model
from llmc.runtime import Engine
from llmc.runtime.sampler import SamplingParams
from tests.codegen.helpers import compile_cpu, hf_greedy
from tests.frontend.arch_sweep import tiny_model
from tests.runtime.test_engine import run_all


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lfm2", "falcon_mamba", "qwen3_next"])
def test_batched_requests_match_transformers(arch, tmp_path):
    model = tiny_model(arch)
    compile_cpu(import_hf_model(model), tmp_path / "artifact", max_seq_len=64, cache_dir=tmp_path / "cache",
                kv_block_size=8)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12)]
    want = [hf_greedy(model, p, 8)[0] for p in prompts]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = Engine.load(str(tmp_path / "artifact"), max_num_seqs=4, max_num_batched_tokens=16)
    got, _ = run_all(engine, prompts, params)
    assert got == want
    small = Engine.load(str(tmp_path / "artifact"), max_num_seqs=4, max_num_batched_tokens=16, num_blocks=8)
    got, _ = run_all(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert got == want
    assert os.path.exists(tmp_path / "artifact" / "manifest.json")
