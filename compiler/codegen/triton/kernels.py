"""Render a kernel template into a named Triton kernel: source text plus its signature.

A ``Kernel`` is what the plan launches and what the ahead-of-time build compiles: its name is
the function name inside the source and includes a hash of source and signature, so equal
kernels (the same layer shape in 30 layers) are rendered, compiled and stored once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import jinja2

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True)

# IR dtype -> Triton signature type of a pointer to it
POINTER_TYPES = {"f32": "*fp32", "f16": "*fp16", "bf16": "*bf16", "i64": "*i64", "i32": "*i32", "f64": "*fp64",
                 "i8": "*i8", "u8": "*u8", "i16": "*i16", "bool": "*i1"}


@dataclass
class Kernel:
    """One generated kernel. ``params``: (argument name, Triton type) in call order; pointer
    types carry the buffer dtype, scalars are i32 (dims such as T and B) or i64."""

    name: str
    kind: str
    template: str
    source: str
    params: list[tuple[str, str]]
    num_warps: int = 4
    num_stages: int = 2
    meta: dict = field(default_factory=dict)

    @property
    def signature(self) -> dict[str, str]:
        return dict(self.params)


def render(template: str, kind: str, params: list[tuple[str, str]], num_warps: int = 4, num_stages: int = 2,
           what: str = "", **ctx) -> Kernel:
    text = _ENV.get_template(template).render(name="KERNEL", template=template, what=what or kind,
                                              params=[p for p, _ in params], **ctx)
    digest = hashlib.sha256(repr((text, params, num_warps, num_stages)).encode()).hexdigest()[:10]
    name = f"{kind}_{digest}"
    return Kernel(name, kind, template, text.replace("def KERNEL(", f"def {name}("), list(params), num_warps,
                  num_stages)


def template_files() -> list[str]:
    return sorted(f for f in os.listdir(TEMPLATES) if f.endswith(".j2"))
