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


# AArch64 Linux hwcaps (arch/arm64/include/uapi/asm/hwcap.h) → their /proc/cpuinfo names, for
# the features llvm_cpu.CPUINFO_FLAGS checks: (AT_HWCAP or AT_HWCAP2, bit, name).
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_AARCH64_HWCAPS = [(_AT_HWCAP, 1, "asimd"), (_AT_HWCAP, 10, "asimdhp"), (_AT_HWCAP, 20, "asimddp"),
                   (_AT_HWCAP, 22, "sve"), (_AT_HWCAP2, 1, "sve2"), (_AT_HWCAP2, 13, "i8mm"),
                   (_AT_HWCAP2, 14, "bf16")]


def cpu_flags() -> set[str]:
    """The feature flags of this machine's CPU (empty where /proc/cpuinfo is unavailable).
    AArch64 also reads the kernel's hwcaps (``getauxval``): what the process may really use,
    and right under qemu user-mode emulation, whose /proc/cpuinfo is the host's."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if host_arch() == "aarch64":
        hwcaps = _aarch64_hwcaps()
        if hwcaps is not None:
            return hwcaps
    return flags


def _aarch64_hwcaps() -> "set[str] | None":
    """The hwcap names of this AArch64 process (None where getauxval is unavailable)."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    words = {at: getauxval(at) for at in (_AT_HWCAP, _AT_HWCAP2)}
    if not words[_AT_HWCAP]:
        return None
    return {name for at, bit, name in _AARCH64_HWCAPS if words[at] >> bit & 1}


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
