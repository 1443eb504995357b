"""Execute a launch plan (see llmc.compiler.codegen.triton.plan) over torch buffers.

The plan is data: buffers with shapes as expressions in the step dims, and ordered launches
with grid and argument expressions. This module evaluates those expressions (with a small
arithmetic evaluator, never ``eval``), allocates the buffers, computes the host-side derived
inputs (the query tiles of prefill attention, the decode flag) and hands each launch to a
``launch(kernel, grid, args)`` callable: the Triton runner (JIT or TRITON_INTERPRET=1) or the
CUDA driver executor. Buffers are flat, contiguous torch tensors; an alias shares its root.
"""

from __future__ import annotations

import ast
import operator
from typing import Callable

import numpy as np
import torch

from .step import StepBatch

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i64": torch.int64,
                "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "f64": torch.float64, "bool": torch.bool}

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FUNCS = {"cdiv": lambda a, b: -(-a // b), "max": max, "min": min}
_CACHE: dict[str, ast.AST] = {}


def evaluate(expr: str, env: dict) -> int:
    """Integer arithmetic, comparisons and cdiv/max/min over the names in ``env``."""
    tree = _CACHE.get(expr)
    if tree is None:
        tree = _CACHE[expr] = ast.parse(expr, mode="eval").body
    return _eval(tree, env)


def _eval(node, env):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, bool)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ValueError(f"launch plan names unknown dim {node.id!r}")
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, env)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, env)
    if isinstance(node, ast.BoolOp):
        vals = [_eval(v, env) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
        return _CMPOPS[type(node.ops[0])](_eval(node.left, env), _eval(node.comparators[0], env))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        return _FUNCS[node.func.id](*[_eval(a, env) for a in node.args])
    raise ValueError(f"unsupported expression in launch plan: {ast.dump(node)}")


def query_tiles(query_start: np.ndarray, rows: int) -> np.ndarray:
    """[NT, 2] int32: (sequence, first query row) for every tile of ``rows`` rows of each
    sequence's tokens in this step (the prefill attention grid)."""
    n = np.diff(query_start)
    seqs = np.repeat(np.arange(len(n)), -(-n // rows))
    firsts = np.concatenate([np.arange(0, k, rows) for k in n]) if len(n) else np.zeros(0, np.int64)
    return np.stack([seqs, firsts], axis=1).astype(np.int32).reshape(-1, 2)


Launch = Callable[[str, tuple, list], None]


class PlanRunner:
    """Buffers and launches of one plan on one torch device."""

    def __init__(self, plan: dict, weights: dict[str, torch.Tensor], num_blocks: int, device: str, launch: Launch):
        self.plan, self.device, self.launch = plan, device, launch
        self.num_blocks = num_blocks
        self.buffers: dict[str, dict] = plan["buffers"]
        self.persistent: dict[str, torch.Tensor] = {}
        env = {"NB": num_blocks}
        for name, b in self.buffers.items():
            if b["kind"] == "weight":
                w = weights[name]
                want = [evaluate(d, env) for d in b["shape"]]
                if list(w.shape) != want:
                    raise ValueError(f"weight {name} has shape {list(w.shape)}, the plan expects {want}")
                self.persistent[name] = w.to(device=device, dtype=TORCH_DTYPES[b["dtype"]]).contiguous().reshape(-1)
            elif b["kind"] == "pool":
                numel = int(np.prod([evaluate(d, env) for d in b["shape"]]))
                # zeroed: masked lanes of a block must not meet NaN garbage
                self.persistent[name] = torch.zeros(numel, dtype=TORCH_DTYPES[b["dtype"]], device=device)

    def pools(self) -> list[torch.Tensor]:
        return [self.persistent[n] for n in self.plan["outputs"]["pools"]]

    def copy_blocks(self, pairs) -> None:
        """Copy KV block ``src`` over block ``dst`` in every pool (block-major: [NB, ...]), for
        each (src, dst): the engine shares a partly filled block by copying it."""
        src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=self.device)
        for pool in self.pools():
            rows = pool.view(self.num_blocks, -1)
            rows[dst] = rows[src]

    def step(self, batch: StepBatch) -> np.ndarray:
        arrays = {n: torch.from_numpy(np.ascontiguousarray(getattr(batch, n), dtype=np.int64))
                  for n in self.plan["step_args"]}
        env = {"T": batch.num_tokens, "B": batch.num_seqs, "MB": int(batch.block_tables.shape[1]),
               "NB": self.num_blocks}
        env["decode"] = bool(batch.num_tokens == batch.num_seqs and np.all(np.diff(batch.query_start) == 1))
        bufs = self.execute(arrays, env, np.asarray(batch.query_start, dtype=np.int64))
        logits = bufs[self.plan["outputs"]["logits"]]
        return logits.float().cpu().numpy().reshape(batch.num_seqs, -1)

    def run(self, inputs: dict[str, torch.Tensor], dims: dict[str, int]) -> list[torch.Tensor]:
        """A plan lowered with step=False: named inputs in, the results (flat) out."""
        env = dict(dims, NB=self.num_blocks)
        env.setdefault("decode", False)
        qs = inputs.get("query_start")
        bufs = self.execute(inputs, env, None if qs is None else qs.cpu().numpy().astype(np.int64))
        return [bufs[n] for n in self.plan["outputs"]["results"]]

    def execute(self, inputs: dict[str, torch.Tensor], env: dict, query_start) -> dict[str, torch.Tensor]:
        bufs: dict[str, torch.Tensor] = dict(self.persistent)
        for name, d in self.plan["derived"].items():
            if d["kind"] != "query_tiles":
                raise ValueError(f"unknown derived input kind {d['kind']}")
            if query_start is None or env.get("decode"):  # only prefill attention reads the tiles
                env[d["count"]] = 0
                bufs[name] = torch.zeros(2, dtype=torch.int32, device=self.device)
                continue
            tiles = query_tiles(query_start, int(d["rows"]))
            env[d["count"]] = int(tiles.shape[0])
            bufs[name] = torch.from_numpy(tiles.reshape(-1)).to(self.device)
        for name, b in self.buffers.items():
            kind = b["kind"]
            if kind == "input":
                bufs[name] = inputs[name].to(device=self.device, dtype=TORCH_DTYPES[b["dtype"]]).contiguous().reshape(-1)
            elif kind == "temp":
                numel = int(np.prod([evaluate(d, env) for d in b["shape"]]))
                bufs[name] = torch.empty(numel, dtype=TORCH_DTYPES[b["dtype"]], device=self.device)
        for name, b in self.buffers.items():
            if b["kind"] == "alias":
                bufs[name] = bufs[b["alias"]]
        for entry in self.plan["launches"]:
            if "when" in entry and not evaluate(entry["when"], env):
                continue
            grid = tuple(int(evaluate(g, env)) for g in entry["grid"])
            if min(grid) <= 0:
                continue
            args = [bufs[v] if kind == "buf" else int(evaluate(v, env)) for kind, v in entry["args"]]
            self.launch(entry["kernel"], grid, args)
        self.last_buffers = bufs  # for debugging and tests: every buffer of the last step
        return bufs
