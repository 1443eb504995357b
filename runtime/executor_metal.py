"""Runs a metal artifact's compiled step on an Apple-silicon GPU through TVM's Metal runtime.

The artifact's ``kernels/step.dylib`` holds the Relax VM executable's host code (arm64 macOS)
and the Metal Shading Language of every kernel, which TVM's Metal runtime compiles when the
library loads. Same calling convention and StepBatch contract as the cpu executor
(``runtime/executor_cpu.py``); weights and KV pools live in GPU memory. On any machine that is
not an Apple-silicon Mac with TVM's Metal runtime this refuses with an ArtifactError that says
so (never a crash inside TVM).
"""

from __future__ import annotations

import platform
import sys
from typing import Optional

import numpy as np

from .artifact import ArtifactError, Manifest
from .executor_cpu import SAFETENSORS_DTYPES, TVM_DTYPES, read_safetensors_header
from .step import StepBatch


def metal_problem(manifest: Manifest) -> Optional[str]:
    """Why this machine cannot run the metal artifact (None when it can)."""
    where = f"{manifest.root} is a metal artifact (Apple-silicon GPU, macOS >= {manifest.target.get('min_macos')})"
    fix = ("copy it to an Apple-silicon Mac with `pip install apache-tvm` (its macOS arm64 wheel ships "
           "libtvm_runtime_metal.dylib) and llmc's runtime, or compile for this machine with `--target cpu`")
    if sys.platform != "darwin" or platform.machine() not in ("arm64", "aarch64"):
        return f"{where}, but this machine is {platform.system()} {platform.machine()}: {fix}"
    try:
        import tvm
    except ImportError:
        return f"{where}, but TVM is not installed: pip install apache-tvm"
    try:
        if not tvm.metal(0).exist:
            return f"{where}, but TVM finds no Metal device on this Mac: {fix}"
    except Exception as exc:  # a TVM build without the Metal runtime
        return f"{where}, but this TVM has no Metal runtime ({exc}): {fix}"
    return None


class MetalExecutor:
    """The compiled step of a metal artifact with its weights and KV pools on the GPU."""

    def __init__(self, manifest: Manifest, num_blocks: Optional[int] = None):
        problem = metal_problem(manifest)
        if problem:
            raise ArtifactError(problem)
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.manifest = manifest
        plan = manifest.data["plan"]
        try:
            library = tvm.runtime.load_module(manifest.path(plan["library"]))
        except Exception as exc:
            raise ArtifactError(f"cannot load the kernel library of {manifest.root}: {exc}; recompile it with "
                                f"`llmc compile MODEL --target metal` and the apache-tvm version of this Mac "
                                f"({tvm.__version__}; built with {manifest.target.get('tvm_version')})") from None
        self.device = tvm.metal(0)
        self.vm = relax.VirtualMachine(library, self.device)
        self.weights = self._load_weights(manifest, plan)
        geom = manifest.kv_cache
        self.block_size = int(geom["block_size"])
        self.max_model_len = int(geom["max_model_len"])
        self.vocab_size = int(manifest.model.get("vocab_size") or 0)
        self.bytes_per_block = int(geom["bytes_per_block"])
        self.num_blocks = int(num_blocks or -(-self.max_model_len // self.block_size))
        dtype = TVM_DTYPES[geom["dtype"]]
        k_shape = (self.num_blocks, geom["kv_heads"], geom["head_dim"], self.block_size)
        v_shape = (self.num_blocks, self.block_size, geom["kv_heads"], geom["value_dim"])
        self.pools = []
        for _ in range(geom["layers"]):  # zeroed: masked lanes must never meet NaN garbage
            for shape in (k_shape, v_shape):
                self.pools.append(tvm.runtime.tensor(np.zeros(shape, dtype=dtype), self.device))
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]

    def _load_weights(self, manifest: Manifest, plan: dict) -> list:
        path = manifest.path("weights.safetensors")
        header, base = read_safetensors_header(path)
        out = []
        with open(path, "rb") as f:
            for name in plan["weight_order"]:
                if name not in header:
                    raise ArtifactError(f"weight {name} is missing from {manifest.root}; compile the model again")
                info = header[name]
                begin, end = info["data_offsets"]
                f.seek(base + begin)
                raw = np.frombuffer(f.read(end - begin), dtype=SAFETENSORS_DTYPES[info["dtype"]])
                out.append(self._tvm.runtime.tensor(raw.reshape(info["shape"]), self.device))
        return out

    def step(self, batch: StepBatch) -> np.ndarray:
        """Run one step; returns float32 logits [B, vocab], row b for token logits_index[b]."""
        tvm = self._tvm
        batch.validate(self.num_blocks, self.block_size)
        decode = batch.num_tokens == 1 and batch.num_seqs == 1
        fn = self._decode if decode else self._prefill
        arrays = (batch.input_ids, batch.positions, batch.slot_mapping, batch.block_tables, batch.seq_lens,
                  batch.query_start, batch.logits_index)
        args = [tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.int64), self.device) for a in arrays]
        return fn(*args, *self.pools, *self.weights).numpy().astype(np.float32, copy=False)
