"""Attention a model computes itself (matmul, mask, softmax, matmul), recognized in the trace.

Older transformers models (GPT-Neo, XGLM, Falcon, Bloom, MPT, ...) never call the attention
interface, so llmc's attention op is never reached and the KV-cache boundary has no place.
Their traces still show each layer's attention as one shape: a score product ``q @ k^T``
(``matmul``/``bmm``/``baddbmm``), then element-wise scaling, masking and biasing, a softmax
over the keys, and a product with ``v``. This module finds each such site by that shape and
then identifies what it computes numerically, by running the traced program on an example:

- the scores entering the softmax are fitted as ``scale * (q @ k^T) + slope_h * j + c``
  (least squares over the visible entries; ``c`` is any per-row constant, which softmax
  ignores), which gives the scale and, when some slope is not zero, ALiBi slopes;
- the entries pushed to (near) minus infinity must be exactly those a causal mask, optionally
  within a sliding window, hides;
- the site's output must equal the attention op's meaning on those q, k, v.

Anything else (a bias that is not linear in the key position, soft-capping, a mask of another
shape) is refused by name. A recognized site is replaced by ``llmc.attention`` in the graph
(its mask and score arithmetic become dead code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

aten = torch.ops.aten

_SCORE_OPS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
# element-wise / layout ops allowed between the score product and the softmax, and between the
# softmax and the product with v (what models do to mask, bias, scale, upcast and reshape)
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default,
                 aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                 aten.contiguous.default, aten.dropout.default, aten.alias.default, aten.detach.default,
                 aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
                 aten.sub.Tensor, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
                 aten.maximum.default, aten.max.other, aten.clamp.default, aten.clamp_min.default}
MASKED = -1.0e4  # scores at or below this are taken as masked out


class SelfAttentionError(ValueError):
    """A model's own attention computation llmc cannot express with its attention op."""


@dataclass
class Site:
    softmax: Node
    scores: Node        # the q @ k^T product
    q: Node
    kt: Node            # k transposed: [..., D, S]
    out: Node           # the product of the probabilities with v
    v: Node
    heads: int = 0
    kv_heads: int = 0
    scale: float = 0.0
    window: int = 0
    alibi: Optional[list[float]] = None


def _back_to_scores(x: Node) -> Optional[Node]:
    """The score product feeding softmax input ``x`` through pass-through ops (breadth first)."""
    frontier, seen = [x], set()
    while frontier:
        n = frontier.pop(0)
        if not isinstance(n, Node) or id(n) in seen or n.op != "call_function":
            continue
        seen.add(id(n))
        if n.target in _SCORE_OPS:
            return n
        if n.target in _PASS_THROUGH:
            frontier += [a for a in n.args if isinstance(a, Node)]
    return None


def _forward_to_output(s: Node) -> Optional[tuple[Node, Node]]:
    """The product ``probs @ v`` the softmax result flows into (first operand), and ``v``."""
    frontier, seen = [s], set()
    while frontier:
        n = frontier.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        for user in n.users:
            if user.op != "call_function":
                continue
            if user.target in (aten.matmul.default, aten.bmm.default) and user.args[0] is n:
                return user, user.args[1]
            if user.target in _PASS_THROUGH and user.args and user.args[0] is n:
                frontier.append(user)
    return None


def find_sites(graph) -> list[Site]:
    sites = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _SOFTMAX:
            continue
        dim = node.args[1] if len(node.args) > 1 else -1
        val = node.meta.get("val")
        if val is None or dim not in (-1, val.dim() - 1) or val.dim() < 3:
            continue
        if not isinstance(val.shape[-1], torch.SymInt):  # over keys, which grow with the tokens (not experts)
            continue
        scores = _back_to_scores(node.args[0])
        found = _forward_to_output(node)
        if scores is None or found is None:
            continue
        q, kt = (scores.args[1], scores.args[2]) if scores.target == aten.baddbmm.default else scores.args[:2]
        sites.append(Site(node, scores, q, kt, found[0], found[1]))
    return sites


def _example_values(program, kwargs: dict, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The values of the ``wanted`` nodes when the traced program runs on ``kwargs``."""
    from torch.export.graph_signature import InputKind

    args = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            args.append(kwargs[spec.arg.name])
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in program.state_dict:
            args.append(program.state_dict[spec.target])
        else:
            args.append(program.constants[spec.target])
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.name in wanted:
                values[n.name] = result
            return result

    with torch.no_grad():
        Recorder(program.graph_module).run(*args)
    return values


def _heads_first(x: torch.Tensor, t: int) -> torch.Tensor:
    """[..., T, D] with batch 1 -> [H, T, D]."""
    return x.reshape(-1, t, x.shape[-1])


def identify(site: Site, values: dict, t: int, name: str) -> None:
    """Fill in the site's heads, scale, window and ALiBi slopes from its example values, or
    refuse (see the module docstring)."""
    q = _heads_first(values[site.q.name].float(), t)
    k = _heads_first(values[site.kt.name].float().transpose(-1, -2), t)
    v = _heads_first(values[site.v.name].float(), t)
    x = values[site.softmax.args[0].name].float().reshape(-1, t, t)
    want = values[site.out.name].float().reshape(-1, t, v.shape[-1])
    h, hkv = q.shape[0], k.shape[0]
    if v.shape[0] != hkv or x.shape[0] != h or h % hkv:
        raise SelfAttentionError(f"{name}: the attention at %{site.softmax.name} has operands whose head counts "
                                 f"do not fit ({q.shape[0]} query, {k.shape[0]} key, {v.shape[0]} value heads, "
                                 f"scores {x.shape[0]})")
    k, v = k.repeat_interleave(h // hkv, 0), v.repeat_interleave(h // hkv, 0)  # grouped heads, as the op reads them
    i = torch.arange(t)
    visible = ~(x <= MASKED) & torch.isfinite(x)
    causal = i[None, :] <= i[:, None]
    window = 0
    if not bool((visible == causal[None]).all()):
        window = next((w for w in range(1, t) if bool((visible == (causal & (i[:, None] - i[None, :] < w))[None]).all())),
                      0)
        if not window:
            raise SelfAttentionError(f"{name}: the mask at %{site.softmax.name} is neither causal nor a causal "
                                     f"sliding window; llmc's attention op has no such mask")
    raw = torch.einsum("htd,hsd->hts", q.double(), k.double())
    # X[h,i,j] = scale * raw[h,i,j] + slope_h * j + c[h,i]: differences against each row's first
    # visible key remove c, leaving unknowns scale and one slope per head
    first = visible.float().argmax(-1)                               # [H, T]
    hh, rr, jj = visible.nonzero(as_tuple=True)
    j0 = first[hh, rr]
    keep = jj != j0
    hh, rr, jj, j0 = hh[keep], rr[keep], jj[keep], j0[keep]
    xd = x.double()
    a = torch.zeros(hh.numel(), 1 + h, dtype=torch.float64)
    a[:, 0] = raw[hh, rr, jj] - raw[hh, rr, j0]
    a[torch.arange(hh.numel()), 1 + hh] = (jj - j0).double()
    b = xd[hh, rr, jj] - xd[hh, rr, j0]
    sol = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]
    fit = a @ sol
    tol = 1e-4 * max(1.0, float(xd[visible].abs().max()))
    if float((fit - b).abs().max()) > tol:
        raise SelfAttentionError(f"{name}: the attention scores at %{site.softmax.name} are not a scaled q·k "
                                 f"product plus an ALiBi bias (a bias of another form, or soft-capping); llmc's "
                                 f"attention op has no such term")
    scale = float(sol[0])
    slopes = [float(s) for s in sol[1:1 + h]]
    alibi = slopes if any(abs(s) > 1e-6 for s in slopes) else None
    # the whole site against the attention op's meaning
    scores = raw.float() * scale
    if alibi is not None:
        scores = scores + torch.tensor(alibi)[:, None, None] * (i[None, :] - i[:, None])[None]
    allowed = causal & ((i[:, None] - i[None, :] < window) if window else torch.ones_like(causal))
    probs = scores.masked_fill(~allowed[None], float("-inf")).softmax(-1)
    got = torch.einsum("hts,hsd->htd", probs, v)
    err = float((got - want).abs().max())
    if err > 1e-4 * max(1.0, float(want.abs().max())):
        raise SelfAttentionError(f"{name}: the attention at %{site.softmax.name} does not compute softmax(scores) @ v "
                                 f"(differs by {err:.3g} from llmc's attention op)")
    site.heads, site.kv_heads, site.scale, site.window, site.alibi = h, hkv, scale, window, alibi


def _fake(fn, *args):
    from torch._guards import detect_fake_mode

    def val(a):
        if isinstance(a, Node):
            return a.meta["val"]
        return [val(x) for x in a] if isinstance(a, (list, tuple)) else a

    vals = [val(a) for a in args]
    flat = [v for v in vals if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(flat)
    with mode:
        return fn(*[v for v in vals])


def _call(graph, target, *args) -> Node:
    node = graph.call_function(target, tuple(args))
    node.meta["val"] = _fake(lambda *xs: target(*xs), *args)
    return node


def _sym_size(graph, x: Node, dim: int) -> Node:
    node = graph.call_function(aten.sym_size.int, (x, dim))
    node.meta["val"] = x.meta["val"].shape[dim]
    return node


def rewrite(program, site: Site, layer: int) -> None:
    """Replace the site by one ``llmc.attention`` call (see ``identify``)."""
    graph = program.graph
    h = site.heads
    with graph.inserting_before(site.out):
        t = _sym_size(graph, site.q, site.q.meta["val"].dim() - 2)

        def four(x: Node, transpose: bool, heads: int) -> Node:
            if transpose:
                x = _call(graph, aten.transpose.int, x, -1, -2)
            d = int(x.meta["val"].shape[-1])
            return _call(graph, aten.reshape.default, x, [1, heads, t, d])

        q4 = four(site.q, False, h)
        k4, v4 = four(site.kt, True, site.kv_heads), four(site.v, False, site.kv_heads)
        dtype = q4.meta["val"].dtype
        k4 = _call(graph, aten.to.dtype, k4, dtype) if k4.meta["val"].dtype != dtype else k4
        v4 = _call(graph, aten.to.dtype, v4, dtype) if v4.meta["val"].dtype != dtype else v4
        alibi = list(site.alibi or [])
        node = graph.call_function(torch.ops.llmc.attention.default,
                                   (q4, k4, v4, layer, site.scale, site.window, 0.0, None, 0, alibi))
        node.meta["val"] = _fake(lambda *xs: torch.ops.llmc.attention.default(*xs), q4, k4, v4, layer, site.scale,
                                 site.window, 0.0, None, 0, alibi)
        out = _call(graph, aten.permute.default, node, [0, 2, 1, 3])
        shape = [t if not isinstance(s, int) else s for s in site.out.meta["val"].shape]
        out = _call(graph, aten.reshape.default, out, shape)
        want = site.out.meta["val"].dtype
        if out.meta["val"].dtype != want:
            out = _call(graph, aten.to.dtype, out, want)
    site.out.replace_all_uses_with(out)


def recognize(program, example: dict, name: str) -> int:
    """Rewrite every self-computed attention site of ``program`` (in place); returns how many.
    ``example`` holds the trace's example inputs (input_ids, and position_ids if taken)."""
    sites = find_sites(program.graph)
    if not sites:
        return 0
    t = int(example["input_ids"].shape[1])
    wanted = {n.name for s in sites for n in (s.q, s.kt, s.v, s.softmax.args[0], s.out)}
    values = _example_values(program, example, wanted)
    for s in sites:
        identify(s, values, t, name)
    for layer, s in enumerate(sites):
        rewrite(program, s, layer)
    graph = program.graph
    changed = True
    while changed:  # dead code, including the metadata asserts on the dead score arithmetic
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.op == "call_function" and not n.users and (
                    n.target in (aten._assert_tensor_metadata.default, aten.dropout.default) or not n.is_impure()):
                graph.erase_node(n)
                changed = True
    program.graph_module.recompile()
    return len(sites)
