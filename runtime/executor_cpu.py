"""Runs a cpu artifact's compiled step: the Relax VM over the kernel library, the weights, and
the paged KV pools (one key and one value pool per layer, ``num_blocks`` blocks each).

The calling convention is the one ``llmc.compiler.codegen.tvm.lower`` documents; this module
reads it from the manifest only and imports nothing of the compiler. It implements
``runtime.step.Executor``: the engine hands it StepBatch objects and owns the block tables.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import numpy as np

from .artifact import ArtifactError, Manifest
from .hugepages import ALIGN, Arena, aligned_empty, aligned_zeros
from .step import StepBatch
from .threads import configure_threads

TVM_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i8": "int8"}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                      "I8": np.int8, "U8": np.uint8}


def keep_torch_out() -> None:
    """Make ``import torch`` fail in this process unless torch is already loaded.

    TVM's FFI imports torch when it can find it, only to interoperate with it; the runtime
    never computes with torch, and in a serving process that import costs 2.5-4 s of start-up
    and ~200 MB resident (plus an OpenMP runtime). ``llmc run`` and ``llmc serve`` call this
    before loading; library users who need torch in the same process simply do not."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # import torch -> ImportError


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """The tensor table of a safetensors file and the offset its data starts at."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ArtifactError(f"{path} is not a safetensors file; compile the model again") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def pack_int64(arrays) -> list:
    """Copies of ``arrays`` as int64, each starting ALIGN-byte aligned inside one buffer."""
    step = ALIGN // 8
    sizes = [int(np.size(a)) for a in arrays]
    buf = aligned_empty(8 * sum(-(-max(n, 1) // step) * step for n in sizes)).view(np.int64)
    out, at = [], 0
    for a, n in zip(arrays, sizes):
        view = buf[at:at + n].reshape(np.shape(a))
        view[...] = a
        out.append(view)
        at += -(-max(n, 1) // step) * step
    return out


class CpuExecutor:
    """The compiled step of a cpu artifact with its weights and KV pools loaded."""

    def __init__(self, manifest: Manifest, threads: Optional[int] = None, num_blocks: Optional[int] = None,
                 num_state_slots: int = 17):
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
        # (kv_heads, head_dim, value_dim) per layer: listed when layers differ, else layer 0's for all
        shapes = geom.get("layer_shapes") or [(geom["kv_heads"], geom["head_dim"], geom["value_dim"])] * geom["layers"]
        self.pools, self._pool_arrays = [], []
        extra = int(geom.get("scale_bytes", 0))  # int8 pools: each position's float32 scale beside its codes
        for heads, head_dim, value_dim in shapes:
            k_shape = (self.num_blocks, heads, head_dim + extra, self.block_size)
            v_shape = (self.num_blocks, self.block_size, heads, value_dim + extra)
            # zeroed: masked lanes of a block are multiplied by zero probabilities, which must not
            # meet NaN garbage. Shared with numpy's calloc'ed memory (DLPack, no copy), so pages
            # become resident only when a block is first written: a large pool costs nothing
            # until it is used and loads instantly.
            for shape in (k_shape, v_shape):
                array = aligned_zeros(shape, dtype)
                self._pool_arrays.append(array)  # the same memory, for copy_blocks
                self.pools.append(tvm.runtime.from_dlpack(array))
        # recurrent state (hybrid / linear-attention models): one pool per state op, one slot
        # per running sequence, [slots, *shape]; zeroed like the KV pools
        self.state_pools = []
        pools = (manifest.data.get("state") or {}).get("pools") or []
        self.num_state_slots = int(num_state_slots) if pools else 0
        for pool in pools:
            shape = (self.num_state_slots, *[int(d) for d in pool["shape"]])
            self.state_pools.append(tvm.runtime.from_dlpack(aligned_zeros(shape, TVM_DTYPES[pool["dtype"]])))
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]

    def _load_weights(self, manifest: Manifest, plan: dict) -> list:
        """One device tensor per weight, each read straight from the file into 64-byte aligned
        memory the device tensor then shares (DLPack, no copy). The file is not memory-mapped (the
        memory is anonymous, on huge pages: runtime/hugepages.py), so a loaded artifact holds its
        weights once and loading peaks at that plus nothing."""
        path = manifest.path("weights.safetensors")
        header, base = read_safetensors_header(path)
        for name in plan["weight_order"]:
            want = plan["weights"][name]
            if name not in header:
                raise ArtifactError(f"weight {name} is missing from {manifest.root}; the weights do not match "
                                    f"the kernels, compile the model again")
            info = header[name]
            if list(info["shape"]) != want["shape"]:
                raise ArtifactError(f"weight {name} in {manifest.root} has shape {list(info['shape'])}, the "
                                    f"kernels expect {want['shape']}; compile the model again")
            stored = SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is not None and "dtype" in want and np.dtype(stored).name != want["dtype"]:
                raise ArtifactError(f"weight {name} in {manifest.root} is {np.dtype(stored).name}, the kernels "
                                    f"expect {want['dtype']}; compile the model again")
        # one huge-page region for all of them (runtime/hugepages.py: the decode step streams it)
        # (bfloat16 ones are copied into TVM tensors: they are read into a temporary instead)
        def nbytes(name):
            begin, end = header[name]["data_offsets"]
            return end - begin

        arena = Arena([nbytes(n) for n in plan["weight_order"] if header[n]["dtype"] in SAFETENSORS_DTYPES], ALIGN)
        out = []
        with open(path, "rb", buffering=0) as f:
            for name in plan["weight_order"]:
                info = header[name]
                begin, end = info["data_offsets"]
                shared = info["dtype"] in SAFETENSORS_DTYPES
                array = arena.take(end - begin) if shared else aligned_empty(end - begin)
                f.seek(base + begin)
                if f.readinto(memoryview(array)) != end - begin:
                    raise ArtifactError(f"weights.safetensors in {manifest.root} is truncated; compile the model again")
                out.append(self._as_tensor(array, info["dtype"], info["shape"]))
        return out

    def _as_tensor(self, raw: np.ndarray, dtype: str, shape: list):
        if dtype in SAFETENSORS_DTYPES:
            return self._tvm.runtime.from_dlpack(raw.view(SAFETENSORS_DTYPES[dtype]).reshape(shape))
        if dtype == "BF16":  # numpy has no bfloat16: let TVM take the raw bits
            tensor = self._tvm.runtime.empty(shape, "bfloat16", self.device)
            tensor.copyfrom(raw.view(np.uint16).reshape(shape))
            return tensor
        raise ArtifactError(f"weights of dtype {dtype} are not supported by this runtime; compile the model again")

    def copy_blocks(self, pairs) -> None:
        """Copy KV block ``src`` over block ``dst`` in every layer's pools, for each (src, dst):
        the engine shares a partly filled block by giving the new sequence a copy of it."""
        for pool in self._pool_arrays:
            for src, dst in pairs:
                pool[dst] = pool[src]

    def step(self, batch: StepBatch) -> np.ndarray:
        """Run one step; returns float32 logits [B, vocab], row b for token logits_index[b]."""
        tvm = self._tvm
        batch.validate(self.num_blocks, self.block_size)
        decode = batch.num_tokens == 1 and batch.num_seqs == 1
        fn = self._decode if decode else self._prefill
        arrays = (batch.input_ids, batch.positions, batch.slot_mapping, batch.block_tables, batch.seq_lens,
                  batch.query_start, batch.logits_index)
        if self.state_pools:
            slots = batch.state_slots
            if slots is None or slots.shape != (batch.num_seqs,) or (slots.size and (
                    int(slots.min()) < 0 or int(slots.max()) >= self.num_state_slots)):
                raise ValueError(f"step batch: this model keeps recurrent state and needs state_slots [B] within "
                                 f"[0, {self.num_state_slots}), got {None if slots is None else slots.tolist()}")
            arrays = arrays + (slots,)
        # The int64 inputs share one aligned buffer that TVM borrows (DLPack, ~1 us each) instead
        # of a copy each into a TVM-allocated tensor (~40 us each); the logits come back as a
        # numpy view of the VM's output (it stays alive while the view does), not a copy.
        args = [tvm.runtime.from_dlpack(a) for a in pack_int64(arrays)]
        return np.from_dlpack(fn(*args, *self.pools, *self.state_pools, *self.weights))
