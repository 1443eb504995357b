"""What a GPU kernel binary is built for, read from its ELF header and symbol table.

CUDA cubins and AMD hsaco code objects are both ELF64 files: the machine field says whose
(EM_CUDA = 190, EM_AMDGPU = 224), the flags say which architecture (the SM number for CUDA,
EF_AMDGPU_MACH for AMD), and the symbol table names the kernels. The GPU executor checks this
before loading anything, and the tests check every binary the compiler writes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EM_CUDA = 190
EM_AMDGPU = 224
ELFOSABI_CUDA = 0x41  # "A"; the CUDA toolchain's OS/ABI byte (0x33 in old cubins)

# EF_AMDGPU_MACH values (LLVM's AMDGPUUsage)
AMDGPU_MACH = {0x3F: "gfx90a", 0x4C: "gfx942", 0x41: "gfx1100", 0x40: "gfx940", 0x4B: "gfx941", 0x30: "gfx908"}


class BinaryError(ValueError):
    pass


@dataclass
class ElfInfo:
    machine: int
    flags: int
    osabi: int
    abi_version: int
    symbols: list[str]

    @property
    def arch(self) -> str:
        """``sm_NN`` for a cubin, ``gfxNNN`` for an AMDGPU code object."""
        if self.machine == EM_CUDA:
            # ELF ABI version 8 (CUDA 12.8+) moved the SM number to bits 8-15; before, bits 0-7
            sm = (self.flags >> 8) & 0xFF if self.abi_version >= 8 else self.flags & 0xFF
            return f"sm_{sm}"
        if self.machine == EM_AMDGPU:
            mach = self.flags & 0xFF
            return AMDGPU_MACH.get(mach, f"amdgpu-mach-{mach:#x}")
        return f"machine-{self.machine}"


def read_elf(data: bytes) -> ElfInfo:
    """Header fields and symbol names of an ELF64 little-endian file."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise BinaryError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise BinaryError("not a little-endian ELF64 file")
    osabi, abi_version = data[7], data[8]
    machine = struct.unpack_from("<H", data, 18)[0]
    shoff = struct.unpack_from("<Q", data, 40)[0]
    flags = struct.unpack_from("<I", data, 48)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        if off + 64 > len(data):
            raise BinaryError("truncated section header table")
        name, stype, _, _, offset, size, link, _, _, entsize = struct.unpack_from("<IIQQQQIIQQ", data, off)
        sections.append((stype, offset, size, link, entsize))
    symbols = []
    for stype, offset, size, link, entsize in sections:
        if stype not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        _, str_off, str_size, _, _ = sections[link]
        strtab = data[str_off:str_off + str_size]
        for j in range(size // entsize):
            st_name = struct.unpack_from("<I", data, offset + j * entsize)[0]
            if st_name:
                end = strtab.find(b"\0", st_name)
                symbols.append(strtab[st_name:end].decode(errors="replace"))
    return ElfInfo(machine, flags, osabi, abi_version, symbols)
