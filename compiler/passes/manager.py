"""PassManager: runs a pipeline, verifies after each pass (debug mode), times each pass,
prints or dumps the IR after passes, and turns a failing pass into a PassError that names it
and points at the IR it failed on."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO

from ..ir import Module, print_module, verify
from ..ir.verifier import VerifyError
from .base import Pass

log = logging.getLogger("llmc.passes")


class PassError(RuntimeError):
    """A pass raised or left invalid IR; ``dump_path`` holds the IR to reproduce it with."""

    def __init__(self, pass_name: str, message: str, dump_path: Optional[str]):
        self.pass_name, self.dump_path = pass_name, dump_path
        where = f"\nThe IR it ran on is in {dump_path} (reproduce with `llmc ir {dump_path}`)." if dump_path else ""
        super().__init__(f"pass '{pass_name}' {message}{where}")


@dataclass
class PassRecord:
    name: str
    seconds: float
    ops_before: int
    ops_after: int


def count_ops(module: Module) -> int:
    return sum(1 for fn in module.functions.values() for _ in fn.body.walk())


@dataclass
class PassManager:
    passes: list[Pass]
    verify_each: bool = True
    print_after: set[str] = field(default_factory=set)
    print_after_all: bool = False
    dump_dir: Optional[str] = None
    out: TextIO = sys.stdout
    on_pass: Optional[Callable[[PassRecord], None]] = None
    records: list[PassRecord] = field(default_factory=list)

    def _dump(self, module: Module, index: int, name: str, suffix: str = "") -> str:
        directory = self.dump_dir or tempfile.mkdtemp(prefix="llmc-pass-")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{index:02d}-{name}{suffix}.llmc.ir")
        with open(path, "w") as f:
            f.write(print_module(module))
        return path

    def run(self, module: Module) -> Module:
        if self.dump_dir:
            self._dump(module, 0, "input")
        for index, p in enumerate(self.passes, start=1):
            before_text = print_module(module)  # kept so a failure can be reproduced exactly
            ops_before = count_ops(module)
            t0 = time.perf_counter()
            try:
                module = p.run(module)
            except Exception as exc:
                path = self._write_failure(before_text, index, p.name)
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                raise PassError(p.name, f"raised {detail}", path) from exc
            seconds = time.perf_counter() - t0
            if self.verify_each:
                try:
                    verify(module)
                except VerifyError as exc:
                    path = self._write_failure(before_text, index, p.name)
                    raise PassError(p.name, f"produced invalid IR: {exc}", path) from None
            record = PassRecord(p.name, seconds, ops_before, count_ops(module))
            self.records.append(record)
            log.info("pass %-22s %6.3fs  ops %5d -> %5d", p.name, seconds, record.ops_before, record.ops_after)
            if self.on_pass:
                self.on_pass(record)
            if self.print_after_all or p.name in self.print_after:
                self.out.write(f"// ----- IR after {p.name} -----\n{print_module(module)}")
            if self.dump_dir:
                self._dump(module, index, p.name)
        return module

    def _write_failure(self, text: str, index: int, name: str) -> str:
        directory = self.dump_dir or tempfile.mkdtemp(prefix="llmc-pass-")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{index:02d}-{name}-input.llmc.ir")
        with open(path, "w") as f:
            f.write(text)
        return path
