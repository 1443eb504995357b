"""What this CPU can do, and what an LLVM -mcpu name requires, so the loader can refuse an
artifact built for instructions this machine lacks (instead of crashing with SIGILL)."""

from __future__ import annotations

import platform

# The instruction-set flags (as /proc/cpuinfo names them) that code built for an -mcpu may use.
# Only what matters to vectorized kernels is listed; unknown CPUs require nothing we can check.
_X86_LEVELS = {
    "x86-64": [],
    "x86-64-v2": ["sse4_2", "popcnt"],
    "x86-64-v3": ["sse4_2", "popcnt", "avx", "avx2", "fma", "bmi2"],
    "x86-64-v4": ["sse4_2", "popcnt", "avx", "avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512vl"],
}
_X86_CPUS = {
    "haswell": "x86-64-v3", "broadwell": "x86-64-v3", "skylake": "x86-64-v3", "znver1": "x86-64-v3",
    "znver2": "x86-64-v3", "znver3": "x86-64-v3", "alderlake": "x86-64-v3",
    "skylake-avx512": "x86-64-v4", "cascadelake": "x86-64-v4", "icelake-server": "x86-64-v4",
    "sapphirerapids": "x86-64-v4", "znver4": "x86-64-v4", "znver5": "x86-64-v4",
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


def required_features(mcpu: str) -> list[str]:
    level = _X86_CPUS.get(mcpu, mcpu)
    return list(_X86_LEVELS.get(level, []))


def host_mcpu() -> str:
    """The LLVM CPU name for this machine's features: the highest x86-64 level it satisfies."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    flags = cpu_flags()
    best = "x86-64"
    for level, needed in _X86_LEVELS.items():
        if set(needed) <= flags:
            best = level
    return best
