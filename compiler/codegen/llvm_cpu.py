"""Which machine the cpu target builds for: an LLVM CPU name → triple, architecture, the CPU
features the runtime must find on the machine that loads the artifact, and how to link.

``--mcpu`` names any x86-64 or AArch64 CPU LLVM knows (``znver4``, ``x86-64-v3``,
``neoverse-n1``, ``cortex-a76``, ...; ``aarch64`` means a baseline AArch64 CPU). Building for
the other architecture needs a cross linker: the ``ziglang`` package (``pip install
'llmc[cross]'``) or ``aarch64-linux-gnu-gcc`` / ``x86_64-linux-gnu-gcc`` on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from llmc.runtime.cpu_features import host_arch

from .registry import TargetError

TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
ARCH_ALIASES = {"aarch64": ("aarch64", "generic"), "arm64": ("aarch64", "generic"), "x86_64": ("x86_64", "x86-64")}

# LLVM feature name → /proc/cpuinfo flag, for the features vectorized kernels may use. A
# feature not listed here cannot be checked at load time and is not required.
CPUINFO_FLAGS = {
    "x86_64": {"sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2", "fma": "fma", "bmi2": "bmi2",
               "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
               "avx512dq": "avx512dq", "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni",
               "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni"},
    "aarch64": {"neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "sve": "sve", "sve2": "sve2",
                "i8mm": "i8mm", "bf16": "bf16"},
}


@dataclass
class LlvmCpu:
    mcpu: str
    arch: str           # x86_64 or aarch64
    triple: str
    required_flags: list[str]  # /proc/cpuinfo flags the code may use
    mattr: tuple = ()  # LLVM features beyond the mcpu's (the host's VNNI on top of x86-64-v4)

    @property
    def cross(self) -> bool:
        return self.arch != host_arch()

    @property
    def vector_lanes(self) -> int:
        """float32 lanes of the widest vector register the code may use."""
        if "avx512f" in self.required_flags:
            return 16
        if "avx2" in self.required_flags or "avx" in self.required_flags:
            return 8
        return 4  # SSE, NEON (SVE's minimum width too)

    @property
    def vector_registers(self) -> int:
        """Architectural vector registers: what a register tile may occupy before it spills."""
        if self.arch == "aarch64" or "avx512f" in self.required_flags:
            return 32
        return 16

    def tvm_target(self, threads: int):
        import tvm

        spec = {"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu, "num-cores": threads}
        if self.mattr:
            spec["mattr"] = list(self.mattr)
        return tvm.target.Target(spec)

    @property
    def name(self) -> str:
        """mcpu plus any extra features, e.g. ``x86-64-v4+avx512vnni``."""
        return self.mcpu + "".join(self.mattr)


def resolve_cpu(mcpu: Optional[str]) -> LlvmCpu:
    """The build machine for ``--mcpu`` (None: this machine)."""
    from tvm.target import codegen

    if mcpu is None:
        from llmc.runtime.cpu_features import host_mcpu

        arch = host_arch()
        name = host_mcpu() if arch == "x86_64" else codegen.llvm_get_system_cpu()
    elif mcpu.lower() in ARCH_ALIASES:
        arch, name = ARCH_ALIASES[mcpu.lower()]
    else:
        valid = [arch for arch, triple in TRIPLES.items() if codegen.llvm_is_valid_cpu(mcpu, triple)]
        if not valid:
            raise TargetError(f"--mcpu {mcpu}: LLVM knows no x86-64 or AArch64 CPU of that name; use e.g. "
                              f"znver4, skylake-avx512, x86-64-v3, neoverse-n1, cortex-a76 or 'aarch64' "
                              f"(omit --mcpu to build for this machine)")
        arch, name = valid[0], mcpu
    if arch not in TRIPLES:
        raise TargetError(f"the cpu target builds for x86-64 and AArch64; this machine is {arch}")
    cpu = LlvmCpu(name, arch, TRIPLES[arch], [])
    if mcpu is None and arch == "x86_64":
        # the x86-64 levels leave out the integer dot products the quantized kernels use
        from llmc.runtime.cpu_features import cpu_flags

        host = cpu_flags()
        cpu.mattr = tuple(f"+{feature}" for feature, flag in (("avx512vnni", "avx512_vnni"), ("avxvnni", "avx_vnni"))
                          if flag in host and (feature != "avx512vnni" or "avx512f" in host))
    features = set(codegen.llvm_get_cpu_features(cpu.tvm_target(1)))
    cpu.required_flags = sorted(flag for feature, flag in CPUINFO_FLAGS[arch].items() if feature in features)
    return cpu


def linker(cpu: LlvmCpu) -> Optional[Callable]:
    """The ``fcompile`` for ``export_library``: None (TVM's default, the host compiler) for this
    machine's architecture, else a cross linker; TargetError if there is none."""
    if not cpu.cross:
        return None
    try:
        import ziglang  # noqa: F401

        command = [sys.executable, "-m", "ziglang", "cc", "-target", cpu.triple]
    except ImportError:
        gcc = shutil.which(f"{cpu.triple}-gcc")
        if gcc is None:
            raise TargetError(f"building for {cpu.arch} (--mcpu {cpu.mcpu}) on this {host_arch()} machine needs a "
                              f"cross linker: pip install 'llmc[cross]' (the ziglang package), or install "
                              f"{cpu.triple}-gcc") from None
        command = [gcc]

    def link(output: str, objects: list[str], options=None, **_):
        result = subprocess.run(command + ["-shared", "-fPIC", "-o", output, *objects, "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise TargetError(f"cross-linking the {cpu.arch} kernel library failed ({' '.join(command)}):\n"
                              f"{result.stderr[-2000:]}")

    link.output_format = "so"
    return link
