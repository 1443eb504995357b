"""Reference interpreter: executes any valid IR on the CPU with torch, op by op.

It is the oracle: every pass is checked by running a module before and after it, and every
kernel against it. Clarity beats speed here; each op's meaning is written once, below.
The ``attention`` op reads and writes a ``KVCache`` that the caller owns, so a prefill call
followed by decode calls on the same cache runs a whole generation.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .core import Block, Function, Module, Op, Value
from .quant import dequantize
from .recurrent import StateError, sequence_reference, step_reference
from .types import Dim, dim_symbols, eval_dim

TORCH_DTYPES = {
    "f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
    "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8,
    "u8": torch.uint8, "bool": torch.bool,
}
IR_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


class InterpreterError(RuntimeError):
    pass


class KVCache:
    """Per-layer key/value storage of one sequence, indexed by token position."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.written: dict[int, torch.Tensor] = {}
        # recurrent state per state index: (state, next position) (see ir/recurrent.py)
        self.states: dict[int, tuple[torch.Tensor, int]] = {}

    def _ensure(self, layer: int, needed: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cap = max(self.capacity, needed)
        if layer in self.keys and self.keys[layer].shape[0] >= needed:
            return
        old_k, old_v, old_w = self.keys.get(layer), self.values.get(layer), self.written.get(layer)
        if old_k is not None:
            cap = max(cap, 2 * old_k.shape[0])
        self.keys[layer] = k.new_zeros((cap,) + tuple(k.shape[1:]))
        self.values[layer] = v.new_zeros((cap,) + tuple(v.shape[1:]))
        self.written[layer] = torch.zeros(cap, dtype=torch.bool)
        if old_k is not None:
            n = old_k.shape[0]
            self.keys[layer][:n], self.values[layer][:n], self.written[layer][:n] = old_k, old_v, old_w

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if positions.numel() and int(positions.min()) < 0:
            raise InterpreterError(f"layer {layer}: negative token position {int(positions.min())}")
        needed = int(positions.max()) + 1 if positions.numel() else 0
        self._ensure(layer, needed, k, v)
        self.keys[layer][positions] = k
        self.values[layer][positions] = v
        self.written[layer][positions] = True


def _softmax_with_sinks(scores: torch.Tensor, sinks) -> torch.Tensor:
    """softmax over the last axis of [H, T, S] scores; sinks [H] join the denominator only."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.float()[:, None, None].expand(scores.shape[0], scores.shape[1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def visible(positions: torch.Tensor, j: torch.Tensor, window: int, chunk: int = 0) -> torch.Tensor:
    """[T, S] bool: key position j visible to a query at each position (causal, within the
    window when window > 0, within the query's chunk when chunk > 0)."""
    allowed = j[None, :] <= positions[:, None]
    if window > 0:
        allowed &= (positions[:, None] - j[None, :]) < window
    if chunk > 0:
        allowed &= (j[None, :] // chunk) == (positions[:, None] // chunk)
    return allowed


def _with_alibi(scores: torch.Tensor, alibi, positions: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """[H, T, S] scores plus slope_h * (j - p) (ALiBi), or as they are without slopes."""
    if not alibi:
        return scores
    rel = (j[None, :] - positions[:, None]).float()
    return scores + torch.tensor(alibi, dtype=torch.float32)[:, None, None] * rel[None]


def attention_reference(q, k, v, positions, cache: KVCache, layer: int, scale: float,
                        window: int, softcap: float, sinks=None, chunk: int = 0, alibi=None) -> torch.Tensor:
    """The meaning of the ``attention`` op (see its docstring in ops.py)."""
    positions = positions.to(torch.int64)
    cache.write(layer, positions, k, v)
    n_ctx = int(positions.max()) + 1
    keys, values = cache.keys[layer][:n_ctx], cache.values[layer][:n_ctx]
    allowed = visible(positions, torch.arange(n_ctx), window, chunk)
    missing = allowed & ~cache.written[layer][:n_ctx][None, :]
    if bool(missing.any()):
        t, pos = [int(x) for x in missing.nonzero()[0]]
        raise InterpreterError(f"layer {layer}: token {t} attends to position {pos}, which no step "
                               f"has written to the KV cache (run the prefill first)")
    hq, hkv = q.shape[1], keys.shape[1]
    group = hq // hkv
    keys = keys.repeat_interleave(group, dim=1)      # [S, Hq, D]
    values = values.repeat_interleave(group, dim=1)  # [S, Hq, Dv]
    scores = torch.einsum("thd,shd->hts", q.float(), keys.float()) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = _with_alibi(scores, alibi, positions, torch.arange(n_ctx))
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = _softmax_with_sinks(scores, sinks)
    out = torch.einsum("hts,shd->thd", probs, values.float())
    return out.to(q.dtype)


def kv_append_reference(k_pool, v_pool, k, v, slot_mapping):
    """The meaning of ``kv_append``: new pools with token t's k/v at slot slot_mapping[t]."""
    blocks, block_size = k_pool.shape[0], k_pool.shape[1]
    slots = slot_mapping.to(torch.int64)
    if slots.numel() and int(slots.max()) >= blocks * block_size:
        raise InterpreterError(f"slot {int(slots.max())} is outside the KV pool of {blocks} blocks x "
                               f"{block_size} slots")
    keep = slots >= 0
    k_pool, v_pool = k_pool.clone(), v_pool.clone()
    k_pool[slots[keep] // block_size, slots[keep] % block_size] = k[keep]
    v_pool[slots[keep] // block_size, slots[keep] % block_size] = v[keep]
    return k_pool, v_pool


def paged_attention_reference(q, k_pool, v_pool, block_tables, seq_lens, query_start, scale: float,
                              window: int, softcap: float, sinks=None, chunk: int = 0, alibi=None) -> torch.Tensor:
    """The meaning of ``paged_attention`` (see its docstring in ops.py): each sequence's
    queries attend causally over the keys its block table points to."""
    block_size = k_pool.shape[1]
    out = q.new_zeros(q.shape[:2] + (v_pool.shape[3],))
    starts = [int(x) for x in query_start]
    if len(starts) and (starts[0] < 0 or starts[-1] > q.shape[0] or any(a > b for a, b in zip(starts, starts[1:]))):
        raise InterpreterError(f"query_start {starts} is not a non-decreasing list of rows within [0, {q.shape[0]}]")
    for b in range(block_tables.shape[0]):
        begin, end, ctx = starts[b], starts[b + 1], int(seq_lens[b])
        n = end - begin
        if n == 0:
            continue
        if n > ctx:
            raise InterpreterError(f"sequence {b} has {n} query tokens but seq_len {ctx}")
        used = -(-ctx // block_size)
        if used > block_tables.shape[1]:
            raise InterpreterError(f"sequence {b} has {ctx} tokens, more than its {block_tables.shape[1]} "
                                   f"blocks of {block_size} hold")
        blocks = block_tables[b, :used].to(torch.int64)
        if int(blocks.min()) < 0 or int(blocks.max()) >= k_pool.shape[0]:
            raise InterpreterError(f"sequence {b} names block {int(blocks.max())} of a {k_pool.shape[0]}-block pool")
        keys = k_pool[blocks].flatten(0, 1)[:ctx]      # [ctx, Hkv, D]
        values = v_pool[blocks].flatten(0, 1)[:ctx]    # [ctx, Hkv, Dv]
        positions = torch.arange(ctx - n, ctx)
        allowed = visible(positions, torch.arange(ctx), window, chunk)
        group = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q[begin:end].float(), keys.float()) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = _with_alibi(scores, alibi, positions, torch.arange(ctx))
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[begin:end] = torch.einsum("hts,shd->thd", _softmax_with_sinks(scores, sinks), values.float()).to(q.dtype)
    return out


# --------------------------------------------------------------------------- op meanings

Impl = Callable[[list[torch.Tensor], dict[str, Any], "_Frame"], torch.Tensor]
IMPLS: dict[str, Impl] = {}


def impl(*kinds: str):
    def deco(fn):
        for k in kinds:
            IMPLS[k] = fn
        return fn

    return deco


_UNARY = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "relu": torch.relu,
    "cos": torch.cos, "sin": torch.sin, "abs": torch.abs, "reciprocal": torch.reciprocal,
    "softplus": F.softplus, "log1p": torch.log1p, "floor": torch.floor, "erf": torch.erf, "expm1": torch.expm1,
}
_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
}
_BINARY.update({"gt": torch.gt, "ge": torch.ge, "lt": torch.lt, "le": torch.le, "eq": torch.eq, "ne": torch.ne,
                "logical_and": torch.logical_and, "logical_or": torch.logical_or})
_UNARY["logical_not"] = torch.logical_not
for _k, _f in _UNARY.items():
    IMPLS[_k] = (lambda f: lambda xs, a, fr: f(xs[0]))(_f)
for _k, _f in _BINARY.items():
    IMPLS[_k] = (lambda f: lambda xs, a, fr: f(xs[0], xs[1]))(_f)


@impl("gelu")
def _gelu(xs, a, fr):
    return F.gelu(xs[0], approximate=a["approximate"])


@impl("constant")
def _constant(xs, a, fr):
    return torch.tensor(a["value"], dtype=TORCH_DTYPES[a["dtype"]])


@impl("cast")
def _cast(xs, a, fr):
    return xs[0].to(TORCH_DTYPES[a["dtype"]])


@impl("sum", "mean", "max")
def _reduce(xs, a, fr):
    x, axes = xs[0], [ax % max(xs[0].dim(), 1) for ax in a["axes"]]
    if fr.op.kind == "sum":
        return x.sum(dim=axes, keepdim=a["keepdim"])
    if fr.op.kind == "mean":
        return x.mean(dim=axes, keepdim=a["keepdim"])
    out = x
    for ax in sorted(axes, reverse=True):
        out = out.amax(dim=ax, keepdim=a["keepdim"])
    return out


@impl("softmax")
def _softmax(xs, a, fr):
    return torch.softmax(xs[0], dim=a["axis"])


@impl("matmul")
def _matmul(xs, a, fr):
    return torch.matmul(xs[0], xs[1])


@impl("linear")
def _linear(xs, a, fr):
    return F.linear(xs[0], xs[1], xs[2] if len(xs) == 3 else None)


@impl("embedding")
def _embedding(xs, a, fr):
    table, ids = xs
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise InterpreterError(f"token id out of range [0, {table.shape[0]}): "
                               f"min {int(ids.min())}, max {int(ids.max())}")
    return F.embedding(ids.to(torch.int64), table)


@impl("quantized_linear")
def _quantized_linear(xs, a, fr):
    w = dequantize(xs[1], xs[2], xs[3] if len(xs) == 4 else None, bits=a["bits"], group_size=a["group_size"],
                   signed=a["signed"], codebook=a.get("codebook"))
    return F.linear(xs[0], w.to(xs[0].dtype))


@impl("quantized_embedding")
def _quantized_embedding(xs, a, fr):
    ids = xs[0].to(torch.int64)
    rows = ids.reshape(-1)
    w = dequantize(xs[1][rows], xs[2][rows], xs[3][rows] if len(xs) == 4 else None, bits=a["bits"],
                   group_size=a["group_size"], signed=a["signed"], codebook=a.get("codebook"))
    return w.reshape(*ids.shape, w.shape[-1])


@impl("reshape")
def _reshape(xs, a, fr):
    return xs[0].reshape(fr.dims(a["shape"]))


@impl("permute")
def _permute(xs, a, fr):
    return xs[0].permute(a["perm"])


@impl("expand")
def _expand(xs, a, fr):
    return xs[0].expand(fr.dims(a["shape"]))


@impl("slice")
def _slice(xs, a, fr):
    x = xs[0]
    axis = a["axis"] % x.dim()
    start, end = fr.dim(a["start"]), fr.dim(a["end"])
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, end, a["step"])
    return x[tuple(index)]


@impl("concat")
def _concat(xs, a, fr):
    return torch.cat(xs, dim=a["axis"])


@impl("param")
def _param(xs, a, fr):
    w = fr.interp.weights.get(a["name"])
    if w is None:
        raise InterpreterError(f"no weight given for param @{a['name']}")
    return w


@impl("attention")
def _attention(xs, a, fr):
    q, k, v, pos = xs[:4]
    return attention_reference(q, k, v, pos, fr.interp.kv_cache, a["layer"], a["scale"],
                               a["window"], a["softcap"], xs[4] if len(xs) > 4 else None, a.get("chunk", 0),
                               a.get("alibi"))


@impl("kv_append")
def _kv_append(xs, a, fr):
    return kv_append_reference(*xs)


@impl("paged_attention")
def _paged_attention(xs, a, fr):
    return paged_attention_reference(*xs[:6], a["scale"], a["window"], a["softcap"], xs[6] if len(xs) > 6 else None,
                                     a.get("chunk", 0), a.get("alibi"))


@impl("causal_conv1d", "gated_delta_rule")
def _recurrent(xs, a, fr):
    kind = fr.op.kind
    pos_index = 2 if kind == "causal_conv1d" else 5
    operands = xs[:pos_index] + xs[pos_index + 1:]
    try:
        return sequence_reference(kind, operands, xs[pos_index].to(torch.int64), fr.interp.kv_cache.states,
                                  a["state"], a.get("delta", True))
    except StateError as exc:
        raise InterpreterError(str(exc)) from None


@impl("causal_conv1d_step", "gated_delta_rule_step")
def _recurrent_step(xs, a, fr):
    n = 2 if fr.op.kind == "causal_conv1d_step" else 5
    operands = xs[1:1 + n] + xs[4 + n:]
    try:
        return step_reference(fr.op.kind, xs[0], operands, *xs[1 + n:4 + n], delta=a.get("delta", True))
    except StateError as exc:
        raise InterpreterError(str(exc)) from None


@impl("rms_norm")
def _rms_norm(xs, a, fr):
    x, w = xs
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + a["eps"])
    return normed * (w + a["weight_offset"]) if a["weight_offset"] else normed * w


@impl("where")
def _where(xs, a, fr):
    return torch.where(*xs)


@impl("gather")
def _gather(xs, a, fr):
    x, idx = xs
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= x.shape[a["axis"]]):
        raise InterpreterError(f"gather index out of range [0, {x.shape[a['axis']]})")
    return torch.gather(x, a["axis"], idx.to(torch.int64))


@impl("scatter")
def _scatter(xs, a, fr):
    x, idx, src = xs
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= x.shape[a["axis"]]):
        raise InterpreterError(f"scatter index out of range [0, {x.shape[a['axis']]})")
    return torch.scatter(x, a["axis"], idx.to(torch.int64), src)


@impl("layer_norm")
def _layer_norm(xs, a, fr):
    x = xs[0]
    return F.layer_norm(x, x.shape[-1:], xs[1] if len(xs) > 1 else None, xs[2] if len(xs) > 2 else None, a["eps"])


@impl("topk")
def _topk(xs, a, fr):
    x = xs[0]
    # stable sort: equal values keep index order, as the op's meaning says
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :a["k"]]
    return torch.gather(x, -1, order), order


MOE_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                   "relu": torch.relu}


def moe_gate(h, activation="silu", gated=True, alpha=None, limit=0.0, up_offset=0.0):
    """The expert nonlinearity of ``moe`` on up-projection rows h [..., U]."""
    act = (lambda t: t * torch.sigmoid(t * alpha)) if activation == "swish_alpha" else MOE_ACTIVATIONS[activation]
    if not gated:
        return act(h)
    g, u = h.chunk(2, dim=-1)
    if limit:
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
    return act(g) * (u + up_offset if up_offset else u)


def moe_reference(x, ids, weights, up, down, up_bias=None, down_bias=None, activation="silu", gated=True,
                  alpha=None, limit=0.0, up_offset=0.0):
    """The meaning of ``moe``: each token through its selected experts only, weighted."""
    out = torch.zeros_like(x)
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= up.shape[0]):
        raise InterpreterError(f"expert id out of range [0, {up.shape[0]}): {int(ids.min())}..{int(ids.max())}")
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = moe_gate(F.linear(x[tok], up[e], None if up_bias is None else up_bias[e]), activation, gated, alpha,
                     limit, up_offset)
        y = F.linear(h, down[e], None if down_bias is None else down_bias[e])
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


@impl("moe")
def _moe(xs, a, fr):
    return moe_reference(*xs, activation=a["activation"], gated=a["gated"], alpha=a.get("alpha"),
                         limit=a.get("limit", 0.0), up_offset=a.get("up_offset", 0.0))


@impl("rope")
def _rope(xs, a, fr):
    x, cos, sin = xs
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@impl("glu")
def _glu(xs, a, fr):
    gate, up = xs
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    return act[a["activation"]](gate) * up


# --------------------------------------------------------------------------- execution


class _Frame:
    """Per-op view of the interpreter state handed to op meanings."""

    def __init__(self, interp: "Interpreter", bindings: dict[str, int]):
        self.interp = interp
        self.bindings = bindings
        self.op: Optional[Op] = None
        self._dim_cache: dict[Any, int] = {}

    def dim(self, d: Dim) -> int:
        if isinstance(d, int):
            return d
        cached = self._dim_cache.get(d)
        if cached is None:
            cached = self._dim_cache[d] = eval_dim(d, self.bindings)
        return cached

    def dims(self, ds) -> list[int]:
        return [self.dim(d) for d in ds]


def bind_symbols(args: list[Value], tensors: list[torch.Tensor]) -> dict[str, int]:
    """Bind each symbolic dim that appears alone in an argument's shape to its actual size."""
    bindings: dict[str, int] = {}
    for v, t in zip(args, tensors):
        if t.dim() != v.type.rank:
            raise InterpreterError(f"argument %{v.name} expects {v.type}, got shape {list(t.shape)}")
        for d, size in zip(v.type.shape, t.shape):
            syms = dim_symbols(d)
            if len(syms) == 1 and not isinstance(d, int) and d.is_Symbol:
                name = next(iter(syms))
                if bindings.setdefault(name, int(size)) != int(size):
                    raise InterpreterError(f"symbol {name} bound to both {bindings[name]} and {size}")
    return bindings


def _check_type(v: Value, t: torch.Tensor, fr: _Frame, what: str) -> None:
    want = TORCH_DTYPES[v.type.dtype]
    if t.dtype != want or list(t.shape) != fr.dims(v.type.shape):
        raise InterpreterError(f"{what} %{v.name} should be {v.type} (= {fr.dims(v.type.shape)}), "
                               f"got {IR_DTYPES.get(t.dtype, t.dtype)}{list(t.shape)}")


class Interpreter:
    """Runs functions of ``module`` with ``weights`` (name → tensor) and one sequence's KV cache."""

    def __init__(self, module: Module, weights: dict[str, torch.Tensor],
                 kv_cache: Optional[KVCache] = None, check_types: bool = True,
                 observer: Optional[Callable[[Op, list], None]] = None):
        self.module = module
        self.weights = weights
        self.kv_cache = kv_cache if kv_cache is not None else KVCache()
        self.check_types = check_types
        self.observer = observer  # sees (op, operand tensors) before each op runs (calibration)

    def run(self, inputs: dict[str, torch.Tensor] | list[torch.Tensor],
            function: str = "forward") -> list[torch.Tensor]:
        fn: Function = self.module.functions[function]
        tensors = [inputs[a.name] for a in fn.args] if isinstance(inputs, dict) else list(inputs)
        if len(tensors) != len(fn.args):
            raise InterpreterError(f"@{function} takes {len(fn.args)} inputs, got {len(tensors)}")
        frame = _Frame(self, bind_symbols(fn.args, tensors))
        with torch.no_grad():
            return self._run_block(fn.body, tensors, frame)

    def _run_block(self, block: Block, tensors: list[torch.Tensor], frame: _Frame) -> list[torch.Tensor]:
        env: dict[int, torch.Tensor] = {}
        for v, t in zip(block.args, tensors):
            if self.check_types:
                _check_type(v, t, frame, "argument")
            env[id(v)] = t
        for op in block.ops:
            args = [env[id(v)] for v in op.operands]
            frame.op = op
            if self.observer is not None:
                self.observer(op, args)
            try:
                if op.region is not None:
                    outs = self._run_block(op.region, args, frame)
                else:
                    fn = IMPLS.get(op.kind)
                    if fn is None:
                        raise InterpreterError(f"the interpreter has no meaning for op '{op.kind}'")
                    out = fn(args, op.attrs, frame)
                    outs = list(out) if isinstance(out, tuple) else [out]
            except InterpreterError as exc:
                raise InterpreterError(f"at %{op.results[0].name} = {op.kind}: {exc}") from None
            for r, t in zip(op.results, outs):
                if self.check_types:
                    _check_type(r, t, frame, "result")
                env[id(r)] = t
        return [env[id(v)] for v in block.results]
