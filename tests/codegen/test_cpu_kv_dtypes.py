"""float16 and int8 KV pools on the cpu target (--kv-dtype): a mixed paged batch through the
compiled step gives each sequence exactly the logits it gets alone (batching must not change
results), within the storage's rounding of the float32 reference; and ``auto`` picks float16
only for quantized linears on a CPU that converts float16 in vectors. (The kernels themselves
are checked against torch references with float16 and int8 pools in test_attention_kernels.py.)"""

import numpy as np
import pytest
import torch

from llmc.compiler.codegen.cpu import kv_dtype
from llmc.compiler.codegen.registry import TargetError
from llmc.compiler.driver import quantize_pass
from llmc.compiler.frontend import import_hf_model
from llmc.compiler.ir import parse_module, print_module
from llmc.compiler.passes import get_pass
from llmc.compiler.passes.paged_kv import PagedKV
from llmc.runtime.artifact import read_manifest
from llmc.runtime.executor_cpu import CpuExecutor
from tests.codegen.helpers import compile_cpu
from tests.codegen.test_cpu_paged_step import executor_step
from tests.paged import MIXED_SCHEDULE, PagedBatcher, alone_logits
from tests.tiny_models import tiny_model


# --kv-dtype: (manifest dtype, TVM dtype, bytes per entry, entries per head added for the scale,
# bound on the logits' distance from the float32 reference: measured 2.8e-4 for float16, 5.7e-3
# for int8 (per-position scales: ~0.4% of a vector's largest entry per entry))
KV_DTYPES = {"float16": ("f16", "float16", 2, 0, 2e-3), "int8": ("i8", "int8", 1, 4, 2e-2)}


@pytest.mark.parametrize("kv", sorted(KV_DTYPES))
def test_narrow_pools_batched_equal_alone(tmp_path, kv):
    """gemma2: sliding window 6 over blocks of 8, attention softcap, grouped heads."""
    name, tvm_dtype, itemsize, extra, tolerance = KV_DTYPES[kv]
    model = tiny_model("gemma2")
    imported = import_hf_model(model)
    before = parse_module(print_module(imported.module))
    get_pass("select-logits").run(before)
    paged = parse_module(print_module(before))
    PagedKV(8).run(paged)
    compile_cpu(imported, tmp_path / "a", max_seq_len=128, cache_dir=tmp_path / "cache", kv_block_size=8,
                kv_dtype=kv)
    manifest = read_manifest(str(tmp_path / "a"))
    assert manifest.kv_cache["dtype"] == name
    # layers, BS, heads, bytes, D + Dv (+ a float32 scale each for int8)
    assert manifest.kv_cache["bytes_per_block"] == 2 * 8 * 2 * itemsize * (16 + 16 + 2 * extra)
    executor = CpuExecutor(manifest, num_blocks=64)
    assert all(str(p.dtype) == tvm_dtype for p in executor.pools)
    assert executor.pools[0].shape == (64, 2, 16 + extra, 8) and executor.pools[1].shape == (64, 8, 2, 16 + extra)

    g = torch.Generator().manual_seed(0)
    chunks_of: dict[int, list[int]] = {}
    for step in MIXED_SCHEDULE:
        for seq, n in step:
            chunks_of.setdefault(seq, []).append(n)
    tokens = {seq: torch.randint(0, model.config.vocab_size, (sum(ns),), generator=g) for seq, ns in chunks_of.items()}
    batched = {seq: [] for seq in chunks_of}
    batcher, seen = PagedBatcher(paged, 64, seed=1), {seq: 0 for seq in chunks_of}
    for step in MIXED_SCHEDULE:
        chunks = []
        for seq, n in step:
            chunks.append((seq, tokens[seq][seen[seq]:seen[seq] + n]))
            seen[seq] += n
        logits = batcher.step(chunks, run=executor_step(executor, paged))
        for b, (seq, _) in enumerate(chunks):
            batched[seq].append(logits[b].numpy())

    worst = 0.0
    for seq, ns in chunks_of.items():
        alone, at = PagedBatcher(paged, 64, seed=10 + seq), 0  # other blocks; decode tokens take the decode entry
        reference = alone_logits(before, imported.weights, tokens[seq], ns)  # float32 KV, unpaged
        for i, n in enumerate(ns):
            got = alone.step([(seq, tokens[seq][at:at + n])], run=executor_step(executor, paged))[0].numpy()
            at += n
            assert np.array_equal(got, batched[seq][i]), f"sequence {seq}, chunk {i}: batched != alone"
            worst = max(worst, float(np.abs(got - reference[i].numpy()).max()))
    assert worst <= tolerance, f"{kv} KV: logits {worst:.1e} from the float32 reference"


def test_auto_kv_dtype_follows_the_linears_and_the_cpu():
    imported = import_hf_model(tiny_model("llama"))
    float_module = imported.module
    assert kv_dtype(None, float_module, ["avx2", "f16c"], "x86_64") == "f32"
    assert kv_dtype("float16", float_module, ["avx2", "f16c"], "x86_64") == "f16"
    quantized = parse_module(print_module(float_module))
    quantize_pass("q4_g32", imported, "", "cpu").run(quantized)
    assert any(op.kind == "quantized_linear" for op in quantized.functions["forward"].body.walk())
    assert kv_dtype("auto", quantized, ["avx2", "f16c"], "x86_64") == "f16"
    assert kv_dtype(None, quantized, [], "aarch64") == "f16"
    assert kv_dtype(None, quantized, ["sse4_2"], "x86_64") == "f32"  # no F16C: a scalar convert per element
    assert kv_dtype("float32", quantized, ["avx2", "f16c"], "x86_64") == "f32"
    assert kv_dtype("int8", quantized, ["avx2"], "x86_64") == "i8"
    with pytest.raises(TargetError, match="expected auto, float32, float16 or int8"):
        kv_dtype("bf16", quantized, ["f16c"], "x86_64")


def test_int8_pools_refuse_head_dims_not_multiple_of_4(tmp_path):
    """Each position's float32 scale sits in the pool's own rows, read through a float32 view:
    head dims must be multiples of 4. Refused before anything is built or written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny_models import BASE

    config = AutoConfig.for_model("llama", **{**BASE, "hidden_size": 24, "head_dim": 6})  # 4 heads of 6
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(TargetError, match=r"multiples of 4; this model's are \[6\]: use --kv-dtype float16"):
        compile_cpu(import_hf_model(model), tmp_path / "a", max_seq_len=64, cache_dir=tmp_path / "cache",
                    kv_dtype="int8")
    assert not (tmp_path / "a").exists()
