"""Runs a cpu artifact's compiled step: the Relax VM over the kernel library, the weights, and
one sequence's KV cache (per-layer [max_seq_len, kv_heads, head_dim] tensors).

The calling convention is the one ``llmc.compiler.codegen.tvm.lower`` documents; this module
reads it from the manifest only and imports nothing of the compiler."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .artifact import ArtifactError, Manifest


class CpuExecutor:
    def __init__(self, manifest: Manifest, threads: Optional[int] = None):
        if threads:
            os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
        import tvm
        from safetensors.numpy import load_file
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
        arrays = load_file(manifest.path("weights.safetensors"))
        self.weights = []
        for name in plan["weight_order"]:
            want = plan["weights"][name]
            array = arrays.get(name)
            if array is None or list(array.shape) != want["shape"]:
                raise ArtifactError(f"weight {name} in {manifest.root} is missing or has the wrong shape; "
                                    f"the weights do not match the kernels, compile the model again")
            self.weights.append(tvm.runtime.tensor(array, self.device))
        geom = manifest.kv_cache
        self.max_seq_len = geom["max_seq_len"]
        self.ctx_block = geom["ctx_block"]
        dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[geom["dtype"]]
        self.caches = []
        for _ in range(geom["layers"]):
            # zeroed: attention reads whole blocks of positions and masks the unwritten ones
            self.caches.append(tvm.runtime.tensor(np.zeros((geom["kv_heads"], geom["head_dim"], self.max_seq_len),
                                                           dtype), self.device))
            self.caches.append(tvm.runtime.tensor(np.zeros((self.max_seq_len, geom["kv_heads"], geom["value_dim"]),
                                                           dtype), self.device))
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]

    def step(self, token_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        """Run one step for one sequence; returns logits [len(logits_index), vocab]."""
        tvm = self._tvm
        n_ctx = int(positions.max()) + 1
        if n_ctx > self.max_seq_len:
            raise ValueError(f"position {n_ctx - 1} is past the KV cache capacity {self.max_seq_len}")
        fn = self._decode if len(token_ids) == 1 and len(logits_index) == 1 else self._prefill
        out = fn(tvm.runtime.tensor(np.ascontiguousarray(token_ids, dtype=np.int64), self.device),
                 tvm.runtime.tensor(np.ascontiguousarray(positions, dtype=np.int64), self.device),
                 tvm.runtime.tensor(np.ascontiguousarray(logits_index, dtype=np.int64), self.device),
                 tvm.runtime.ShapeTuple([-(-n_ctx // self.ctx_block)]), *self.caches, *self.weights)
        return out.numpy()
