"""What this CPU can do, so the loader can refuse an artifact built for another architecture
or for instructions this machine lacks (instead of crashing with SIGILL). The compiler
records what an artifact needs (compiler/codegen/llvm_cpu.py); this module reads the host."""

from __future__ import annotations

import platform

# The x86-64 micro-architecture levels, as /proc/cpuinfo flags, to name this machine's CPU.
_X86_LEVELS = {
    "x86-64": [],
    "x86-64-v2": ["sse4_2", "popcnt"],
    "x86-64-v3": ["sse4_2", "popcnt", "avx", "avx2", "fma", "bmi2"],
    "x86-64-v4": ["sse4_2", "popcnt", "avx", "avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512vl"],
}


def cpu_flags() -> set[str]:
    """The feature flags of this machine's CPU (empty where /proc/cpuinfo is unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_mcpu() -> str:
    """The LLVM CPU name for this machine's features: the highest x86-64 level it satisfies."""
    if host_arch() != "x86_64":
        return "generic"
    flags = cpu_flags()
    best = "x86-64"
    for level, needed in _X86_LEVELS.items():
        if set(needed) <= flags:
            best = level
    return best
