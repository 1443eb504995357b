"""Runs a cuda artifact on an NVIDIA GPU with the ahead-of-time cubins, through the CUDA driver
API of NVIDIA's ``cuda-bindings`` package: no Triton, no JIT, no compiler. An artifact built
with one Triton version runs where another, or none, is installed.

Loading: each kernel's cubin goes through cuModuleLoadData / cuModuleGetFunction (its symbol
and launch metadata come from the manifest, its arch from the cubin's own ELF header, checked
before anything touches the GPU). Buffers are torch CUDA tensors; the launch plan
(launch_plan.py) is the same one the Triton runner executes. A launch packs the kernel's
arguments in the manifest's order and types, then the two scratch pointers every Triton 3.x
kernel takes last (global and profile scratch; null when the kernel needs none), and calls
cuLaunchKernel with num_warps x 32 threads and the kernel's dynamic shared memory on torch's
current stream. Decode steps (one token per sequence) are captured once per batch-size bucket
as CUDA graphs and replayed.

Status: written without a GPU in reach. The metadata checks, the arch refusal and the argument
packing are unit-tested on CPU; the launches themselves have not run yet.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .artifact import ArtifactError, Manifest
from .gpu_binary import EM_CUDA, BinaryError, read_elf
from .step import StepBatch

SCALAR_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
                 "fp32": ctypes.c_float, "fp64": ctypes.c_double}
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class KernelSpec:
    """One kernel's launch metadata as the manifest records it."""

    name: str
    symbol: str
    binary: str                     # path of the cubin
    params: list[tuple[str, str]]   # (name, Triton type): "*bf16" pointers, "i32" scalars
    num_warps: int
    shared: int
    global_scratch_size: int
    profile_scratch_size: int

    @property
    def threads(self) -> int:
        return 32 * self.num_warps


def parse_kernels(manifest: Manifest) -> dict[str, KernelSpec]:
    """Validate and parse the kernel table of a cuda artifact: every field present and typed,
    every binary a CUDA ELF for the manifest's arch that defines the named symbol."""
    data = manifest.data
    arch = manifest.target.get("arch")
    kernel_dir = data.get("kernel_dir")
    table = data.get("kernels")
    if not isinstance(table, dict) or not kernel_dir:
        raise ArtifactError(f"{manifest.root} was compiled for target '{manifest.target.get('kind')}' but has no "
                            f"kernel table (it is corrupt or not a cuda artifact); compile it again with "
                            f"`llmc compile MODEL --target cuda --arch {arch or 'sm_90'}`")
    specs = {}
    for name, meta in table.items():
        try:
            params = [(str(p), str(t)) for p, t in meta["params"]]
            spec = KernelSpec(name, str(meta["symbol"]), manifest.path(os.path.join(kernel_dir, meta["binary"])),
                              params, int(meta["num_warps"]), int(meta["shared"]),
                              int(meta.get("global_scratch_size", 0)), int(meta.get("profile_scratch_size", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"kernel {name} in {manifest.root} has incomplete launch metadata ({exc!r}); "
                                f"compile the model again") from None
        for p, t in spec.params:
            if not (t.startswith("*") or t in SCALAR_CTYPES):
                raise ArtifactError(f"kernel {name}: argument {p} has type {t}, which this executor cannot pass")
        try:
            with open(spec.binary, "rb") as f:
                elf = read_elf(f.read())
        except (OSError, BinaryError) as exc:
            raise ArtifactError(f"kernel {name}: {spec.binary} is not a loadable cubin ({exc}); compile again") from None
        if elf.machine != EM_CUDA:
            raise ArtifactError(f"kernel {name}: {spec.binary} is not a CUDA binary (ELF machine {elf.machine})")
        if elf.arch != arch:
            raise ArtifactError(f"kernel {name}: {spec.binary} is built for {elf.arch}, but the manifest says {arch}; "
                                f"the artifact is inconsistent, compile it again")
        if spec.symbol not in elf.symbols:
            raise ArtifactError(f"kernel {name}: symbol {spec.symbol} is not defined in {spec.binary}")
        specs[name] = spec
    return specs


def check_device_arch(artifact_arch: str, device_arch: str, device_name: str = "this GPU") -> None:
    """Refuse cubins the device cannot run. A cubin runs on its own SM and, within one major
    version, on later minors (sm_80 on sm_86/sm_89); Triton builds sm_90 as sm_90a, which runs
    on sm_90 only."""
    def parse(a: str) -> tuple[int, int]:
        digits = a.removeprefix("sm_").rstrip("a")
        return int(digits[:-1]), int(digits[-1])

    ok = artifact_arch == device_arch
    if not ok and artifact_arch != "sm_90":
        (am, an), (dm, dn) = parse(artifact_arch), parse(device_arch)
        ok = am == dm and dn >= an
    if not ok:
        raise ArtifactError(f"this artifact was compiled for {artifact_arch}, but {device_name} is {device_arch}; "
                            f"compile it for this GPU: `llmc compile MODEL --target cuda --arch {device_arch}` "
                            f"(no GPU is needed to compile)")


def pack_args(spec: KernelSpec, args: list, scratch: tuple = (0, 0)) -> tuple[list, np.ndarray]:
    """ctypes values for ``args`` in the kernel's order (tensors by device address), the two
    scratch pointers appended, and the void** array cuLaunchKernel reads them through."""
    if len(args) != len(spec.params):
        raise ValueError(f"kernel {spec.name} takes {len(spec.params)} arguments, got {len(args)}")
    values = []
    for (pname, ptype), a in zip(spec.params, args):
        if ptype.startswith("*"):
            values.append(ctypes.c_uint64(a.data_ptr() if hasattr(a, "data_ptr") else int(a)))
        else:
            values.append(SCALAR_CTYPES[ptype](int(a) if ptype[0] in "iu" else float(a)))
    values += [ctypes.c_uint64(scratch[0]), ctypes.c_uint64(scratch[1])]
    pointers = np.array([ctypes.addressof(v) for v in values], dtype=np.uint64)
    return values, pointers


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6 layout
        except ImportError:
            raise ArtifactError("running a cuda artifact needs NVIDIA's cuda-bindings: pip install 'llmc[cuda]'") \
                from None
    return driver


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else rest


class CudaExecutor:
    """runtime.step.Executor over a cuda artifact's cubins and launch plan."""

    def __init__(self, manifest: Manifest, num_blocks: Optional[int] = None, device: int = 0,
                 cuda_graphs: bool = True):
        if manifest.target.get("kind") != "cuda":
            raise ArtifactError(f"{manifest.root} is a '{manifest.target.get('kind')}' artifact, not cuda")
        self.specs = parse_kernels(manifest)  # before touching the GPU: a bad artifact fails on any machine
        driver = self._driver = _driver()
        import torch

        from .launch_plan import PlanRunner

        self.torch = torch
        try:
            _check(driver.cuInit(0))
            dev = _check(driver.cuDeviceGet(device))
        except RuntimeError as exc:
            raise ArtifactError(f"no usable NVIDIA GPU to run {manifest.root} ({exc}); run it on a machine with one, "
                                f"or set LLMC_GPU_EXECUTOR=triton TRITON_INTERPRET=1 to run its kernel sources "
                                f"(slowly) on the CPU") from None
        major = _check(driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
        minor = _check(driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
        name = _check(driver.cuDeviceGetName(256, dev))
        name = name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)
        check_device_arch(manifest.target["arch"], f"sm_{major}{minor}", name)
        torch.cuda.set_device(device)
        torch.cuda.init()
        # the device's primary context (torch's too) made current here, so modules, torch's
        # buffers and torch's stream all live in one context
        self._context = _check(driver.cuDevicePrimaryCtxRetain(dev))
        _check(driver.cuCtxSetCurrent(self._context))
        self.functions, self._modules = {}, []
        for kname, spec in self.specs.items():
            with open(spec.binary, "rb") as f:
                image = f.read()
            module = _check(driver.cuModuleLoadData(image))
            fn = _check(driver.cuModuleGetFunction(module, spec.symbol.encode()))
            if spec.shared > 48 * 1024:
                _check(driver.cuFuncSetAttribute(
                    fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, spec.shared))
            self._modules.append(module)
            self.functions[kname] = fn
        from safetensors.torch import load_file

        plan = manifest.data["plan"]
        geom = manifest.kv_cache
        self.block_size = int(geom["block_size"])
        self.max_model_len = int(geom["max_model_len"])
        self.vocab_size = int(manifest.model.get("vocab_size") or 0)
        self.num_blocks = int(num_blocks or -(-self.max_model_len // self.block_size))
        weights = load_file(manifest.path("weights.safetensors"), device=f"cuda:{device}")
        self.runner = PlanRunner(plan, weights, self.num_blocks, f"cuda:{device}", self._launch)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple] = {}

    def _launch(self, name: str, grid: tuple, args: list) -> None:
        spec = self.specs[name]
        scratch = []  # per-program scratch, freed in stream order by torch's allocator
        for size in (spec.global_scratch_size, spec.profile_scratch_size):
            scratch.append(self.torch.empty(size * grid[0] * grid[1] * grid[2], dtype=self.torch.uint8,
                                            device="cuda") if size else None)
        ptrs = tuple(0 if b is None else b.data_ptr() for b in scratch)
        _values, pointers = pack_args(spec, args, ptrs)
        stream = self._driver.CUstream(self.torch.cuda.current_stream().cuda_stream)
        _check(self._driver.cuLaunchKernel(self.functions[name], grid[0], grid[1], grid[2], spec.threads, 1, 1,
                                           spec.shared, stream, pointers.ctypes.data, 0))

    def copy_blocks(self, pairs) -> None:
        """Block copies on torch's current stream, the one every launch goes to (ordered)."""
        self.runner.copy_blocks(pairs)

    def step(self, batch: StepBatch) -> np.ndarray:
        batch.validate(self.num_blocks, self.block_size)
        decode = batch.num_tokens == batch.num_seqs and bool(np.all(np.diff(batch.query_start) == 1))
        if self.cuda_graphs and decode and batch.num_seqs <= DECODE_BUCKETS[-1]:
            return self._graph_step(batch)
        return self.runner.step(batch)

    # --- CUDA graphs for decode batches -----------------------------------------------------
    def _graph_step(self, batch: StepBatch) -> np.ndarray:
        """Pad the decode batch to its bucket, copy it into the bucket's static inputs, replay."""
        torch = self.torch
        b = batch.num_seqs
        bucket = next(x for x in DECODE_BUCKETS if x >= b)
        width = -(-self.max_model_len // self.block_size)
        if batch.block_tables.shape[1] > width:  # wider tables than a graph holds: run it eagerly
            return self.runner.step(batch)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket, width)
        graph, static, out = self._graphs[bucket]
        host = {
            "input_ids": np.zeros(bucket, np.int64), "positions": np.zeros(bucket, np.int64),
            "slot_mapping": np.full(bucket, -1, np.int64), "block_tables": np.zeros((bucket, width), np.int64),
            "seq_lens": np.ones(bucket, np.int64), "query_start": np.arange(bucket + 1, dtype=np.int64),
            "logits_index": np.arange(bucket, dtype=np.int64)}
        for k in ("input_ids", "positions", "slot_mapping", "seq_lens", "logits_index"):
            host[k][:b] = getattr(batch, k)
        host["block_tables"][:b, :batch.block_tables.shape[1]] = batch.block_tables
        for k, v in host.items():
            static[k].copy_(torch.from_numpy(v.reshape(-1)), non_blocking=False)
        graph.replay()
        return out[: b * self.vocab_size].float().cpu().numpy().reshape(b, -1)

    def _capture(self, bucket: int, width: int):
        torch = self.torch
        env = {"T": bucket, "B": bucket, "MB": width, "NB": self.num_blocks, "decode": True}
        shapes = {"block_tables": bucket * width, "query_start": bucket + 1}
        static = {k: torch.zeros(shapes.get(k, bucket), dtype=torch.int64, device="cuda")
                  for k in self.runner.plan["step_args"]}
        static["query_start"].copy_(torch.arange(bucket + 1))
        static["seq_lens"].fill_(1)
        static["slot_mapping"].fill_(-1)
        static["logits_index"].copy_(torch.arange(bucket))
        self.runner.execute(static, dict(env), None)  # warm-up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            bufs = self.runner.execute(static, dict(env), None)
        return graph, static, bufs[self.runner.plan["outputs"]["logits"]]


def load_gpu_executor(manifest: Manifest, num_blocks: Optional[int] = None):
    """The executor for a cuda/rocm artifact: CudaExecutor (AOT cubins, driver API), or with
    LLMC_GPU_EXECUTOR=triton the Triton runner over the artifact's kernel sources (JIT)."""
    kind = manifest.target.get("kind")
    if os.environ.get("LLMC_GPU_EXECUTOR") == "triton":
        from .executor_triton import TritonExecutor

        return TritonExecutor.from_manifest(manifest, num_blocks)
    if kind == "rocm":
        raise ArtifactError(f"{manifest.root} is a rocm artifact; launching hsaco code objects (hip-python) is not "
                            f"in this build yet: on a ROCm machine with triton installed, set "
                            f"LLMC_GPU_EXECUTOR=triton to run the artifact's kernel sources")
    return CudaExecutor(manifest, num_blocks)
