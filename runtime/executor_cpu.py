"""Runs a cpu artifact's compiled step: the Relax VM over the kernel library, the weights, and
the paged KV pools (one key and one value pool per layer, ``num_blocks`` blocks each).

The calling convention is the one ``llmc.compiler.codegen.tvm.lower`` documents; this module
reads it from the manifest only and imports nothing of the compiler. It implements
``runtime.step.Executor``: the engine hands it StepBatch objects and owns the block tables.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .artifact import ArtifactError, Manifest
from .step import StepBatch
from .threads import configure_threads

TVM_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


class CpuExecutor:
    """The compiled step of a cpu artifact with its weights and KV pools loaded."""

    def __init__(self, manifest: Manifest, threads: Optional[int] = None, num_blocks: Optional[int] = None):
        self.threads = configure_threads(threads)  # before TVM's pool starts (see threads.py)
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.manifest = manifest
        plan = manifest.data["plan"]
        try:
            library = tvm.runtime.load_module(manifest.path(plan["library"]))
        except Exception as exc:  # TVM raises its own error types
            raise ArtifactError(f"cannot load the kernel library of {manifest.root}: {exc}; recompile the "
                                f"model on this machine (`llmc compile ... --target cpu`)") from None
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(library, self.device)
        self.weights = self._load_weights(manifest, plan)
        geom = manifest.kv_cache
        self.block_size = int(geom["block_size"])
        self.max_model_len = int(geom["max_model_len"])
        self.vocab_size = int(manifest.model.get("vocab_size") or 0)
        self.bytes_per_block = int(geom["bytes_per_block"])
        self.num_blocks = int(num_blocks or -(-self.max_model_len // self.block_size))
        if self.num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {self.num_blocks}")
        dtype = TVM_DTYPES[geom["dtype"]]
        k_shape = (self.num_blocks, geom["kv_heads"], geom["head_dim"], self.block_size)
        v_shape = (self.num_blocks, self.block_size, geom["kv_heads"], geom["value_dim"])
        self.pools = []
        for _ in range(geom["layers"]):
            # zeroed (np.zeros maps untouched pages lazily): masked lanes of a block are multiplied
            # by zero probabilities, which must not meet NaN garbage
            self.pools.append(tvm.runtime.tensor(np.zeros(k_shape, dtype), self.device))
            self.pools.append(tvm.runtime.tensor(np.zeros(v_shape, dtype), self.device))
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]

    def _load_weights(self, manifest: Manifest, plan: dict) -> list:
        """One device tensor per weight, read one at a time so a loaded artifact holds its
        weights once (never the whole file as numpy arrays besides the device copies)."""
        from safetensors import safe_open

        tvm = self._tvm
        out = []
        with safe_open(manifest.path("weights.safetensors"), framework="numpy") as f:
            names = set(f.keys())
            for name in plan["weight_order"]:
                want = plan["weights"][name]
                if name not in names:
                    raise ArtifactError(f"weight {name} is missing from {manifest.root}; the weights do not match "
                                        f"the kernels, compile the model again")
                array = f.get_tensor(name)
                if list(array.shape) != want["shape"]:
                    raise ArtifactError(f"weight {name} in {manifest.root} has shape {list(array.shape)}, the "
                                        f"kernels expect {want['shape']}; compile the model again")
                out.append(tvm.runtime.tensor(array, self.device))
                del array
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
        return fn(*args, *self.pools, *self.weights).numpy()
