"""Every Triton kernel template against a torch reference, under TRITON_INTERPRET=1 on CPU
tensors, on fresh random inputs: at the tiny architectures' shapes (default run) and at
SmolLM2-135M's (marked slow). Each test writes its op or region as IR text, lets the cuda/rocm
code generator lower it to a launch plan, runs the plan, and compares with torch written out
here, in fp32 and in bf16 (tolerances by dtype, see harness.TOL)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.codegen.triton.harness import assert_close, rounded, run_ir

# (hidden, q heads, kv heads, head dim, intermediate, vocab) of the tiny configs and SmolLM2-135M
TINY = dict(h=64, hq=4, hkv=2, d=16, inter=96, vocab=128)
SMOL = dict(h=576, hq=9, hkv=3, d=64, inter=1536, vocab=49152)
SHAPES = [pytest.param(TINY, id="tiny"), pytest.param(SMOL, id="smollm2", marks=pytest.mark.slow)]
DTYPES = ["f32", "bf16"]


def module(params: dict, args: str, body: str, results: str, result_types: str) -> str:
    lines = ["module @k {"]
    for name, t in params.items():
        lines.append(f"  param @{name} : {t} {{origin = \"parameter\"}}")
    lines.append(f"  func @forward({args}) -> ({result_types}) {{")
    for name, t in params.items():
        lines.append(f"    %{name} = param() {{name = \"{name}\"}} : {t}")
    lines += ["    " + line for line in body.strip().splitlines()]
    lines += [f"    return {results}", "  }", "}"]
    return "\n".join(lines)


def g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", SHAPES)
def test_elementwise_region(s, dtype):
    """A fused elementwise region with broadcasting: every unary/binary rule the emitter has."""
    h, t = s["h"], 7
    text = module({}, f"%x: f32[1, T, {h}], %y: f32[{h}], %z: f32[1, T, 1]", f"""
%r = fused(%x, %y, %z) {{name = "fused_mix_0"}} : f32[1, T, {h}] {{
  ^(%x: f32[1, T, {h}], %y: f32[{h}], %z: f32[1, T, 1]):
  %c = constant() {{value = 2.0, dtype = "f32"}} : f32[]
  %a = silu(%x) : f32[1, T, {h}]
  %b = mul(%a, %y) : f32[1, T, {h}]
  %n = neg(%x) : f32[1, T, {h}]
  %e = exp(%n) : f32[1, T, {h}]
  %ab = abs(%x) : f32[1, T, {h}]
  %p = pow(%ab, %c) : f32[1, T, {h}]
  %sg = sigmoid(%z) : f32[1, T, 1]
  %q = add(%p, %sg) : f32[1, T, {h}]
  %one = constant() {{value = 1.0, dtype = "f32"}} : f32[]
  %q1 = add(%q, %one) : f32[1, T, {h}]
  %rs = rsqrt(%q1) : f32[1, T, {h}]
  %th = tanh(%b) : f32[1, T, {h}]
  %ge = gelu(%x) {{approximate = "tanh"}} : f32[1, T, {h}]
  %m1 = maximum(%th, %ge) : f32[1, T, {h}]
  %d1 = div(%m1, %q1) : f32[1, T, {h}]
  %s1 = sub(%d1, %rs) : f32[1, T, {h}]
  %s2 = mul(%s1, %sg) : f32[1, T, {h}]
  %r = add(%s2, %e) : f32[1, T, {h}]
  yield %r
}}""", "%r", f"f32[1, T, {h}]")
    x, y, z = torch.randn(1, t, h, generator=g(1)), torch.randn(h, generator=g(2)), torch.randn(1, t, 1, generator=g(3))
    (out,), plan = run_ir(text, {"x": x, "y": y, "z": z}, {"T": t, "B": 1}, dtype=dtype)
    assert [k.template for k in plan.kernels.values()] == ["elementwise.py.j2"]
    x, y, z = (rounded(v, dtype) for v in (x, y, z))
    q1 = x.abs() ** 2 + torch.sigmoid(z) + 1
    want = (torch.maximum(torch.tanh(F.silu(x) * y), F.gelu(x, approximate="tanh")) / q1 - torch.rsqrt(q1)) \
        * torch.sigmoid(z) + torch.exp(-x)
    assert_close(out, want, dtype, "elementwise region")


@pytest.mark.parametrize("dtype", ["f32"])
def test_positions_times_frequencies(dtype):
    """The RoPE angle region: an integer operand cast to float, broadcast against a vector.
    fp32 only: the step keeps position-derived tables in fp32 (a bf16 angle of ~100 is off by
    up to 0.5 rad), see plan.py."""
    t, half = 9, 8
    text = module({}, f"%p: i64[1, T, 1], %f: f32[{half}]", f"""
%m = fused(%p, %f) {{name = "fused_cast_mul_0"}} : f32[1, T, {half}] {{
  ^(%p: i64[1, T, 1], %f: f32[{half}]):
  %c = cast(%p) {{dtype = "f32"}} : f32[1, T, 1]
  %m = mul(%c, %f) : f32[1, T, {half}]
  yield %m
}}
%co = cos(%m) : f32[1, T, {half}]""", "%co", f"f32[1, T, {half}]")
    p = torch.arange(100, 100 + t).reshape(1, t, 1)
    f = torch.rand(half, generator=g(4))
    (out,), _ = run_ir(text, {"p": p, "f": f}, {"T": t, "B": 1}, dtype=dtype)
    angles = rounded(p * rounded(f, dtype), dtype)  # the stored angle table, then cos of it
    assert_close(out, torch.cos(angles), dtype, "cos(positions * inv_freq)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("s", SHAPES)
def test_rms_norm_with_residual(s, offset, dtype):
    """add + rms_norm in one row kernel, both results stored (the residual stream and the norm)."""
    h, t = s["h"], 6
    text = module({"w": f"f32[{h}]"}, f"%x: f32[1, T, {h}], %r: f32[1, T, {h}]", f"""
%s, %n = fused(%x, %r, %w) {{name = "fused_add_rms_norm_0"}} : f32[1, T, {h}], f32[1, T, {h}] {{
  ^(%x: f32[1, T, {h}], %r: f32[1, T, {h}], %w: f32[{h}]):
  %s = add(%x, %r) : f32[1, T, {h}]
  %n = rms_norm(%s, %w) {{eps = 1e-06, weight_offset = {offset}}} : f32[1, T, {h}]
  yield %s, %n
}}""", "%s, %n", f"f32[1, T, {h}], f32[1, T, {h}]")
    x, r, w = torch.randn(1, t, h, generator=g(5)), torch.randn(1, t, h, generator=g(6)), torch.randn(h, generator=g(7))
    (s_out, n_out), plan = run_ir(text, {"x": x, "r": r}, {"T": t, "B": 1}, {"w": w}, dtype=dtype)
    assert [k.template for k in plan.kernels.values()] == ["rms_norm.py.j2"]
    x, r, w = (rounded(v, dtype) for v in (x, r, w))
    summed = x + r
    assert_close(s_out, summed, dtype, "residual")
    summed = rounded(summed, dtype)
    want = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6) * (w + offset)
    assert_close(n_out, want, dtype, "rms_norm")


def rope_ref(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", SHAPES)
def test_rope(s, dtype):
    hq, d, t = s["hq"], s["d"], 5
    text = module({}, f"%x: f32[1, T, {hq}, {d}], %c: f32[1, T, 1, {d}], %n: f32[1, T, 1, {d}]",
                  f"%y = rope(%x, %c, %n) : f32[1, T, {hq}, {d}]", "%y", f"f32[1, T, {hq}, {d}]")
    x = torch.randn(1, t, hq, d, generator=g(8))
    ang = torch.rand(1, t, 1, d, generator=g(9)) * 6
    (out,), plan = run_ir(text, {"x": x, "c": ang.cos(), "n": ang.sin()}, {"T": t, "B": 1}, dtype=dtype)
    assert [k.template for k in plan.kernels.values()] == ["rope.py.j2"]
    want = rope_ref(rounded(x, dtype), rounded(ang.cos(), dtype), rounded(ang.sin(), dtype))
    assert_close(out, want, dtype, "rope")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_then_rope(dtype):
    """qwen3's q/k norm followed by rope in one row kernel (rope reads the normed partner)."""
    hq, d, t = 4, 16, 5
    text = module({"w": f"f32[{d}]"}, f"%x: f32[1, T, {hq}, {d}], %c: f32[1, T, 1, {d}], %n: f32[1, T, 1, {d}]", f"""
%y = fused(%x, %w, %c, %n) {{name = "fused_rms_norm_rope_0"}} : f32[1, T, {hq}, {d}] {{
  ^(%x: f32[1, T, {hq}, {d}], %w: f32[{d}], %c: f32[1, T, 1, {d}], %n: f32[1, T, 1, {d}]):
  %r = rms_norm(%x, %w) {{eps = 1e-06, weight_offset = 0.0}} : f32[1, T, {hq}, {d}]
  %y = rope(%r, %c, %n) : f32[1, T, {hq}, {d}]
  yield %y
}}""", "%y", f"f32[1, T, {hq}, {d}]")
    x, w = torch.randn(1, t, hq, d, generator=g(10)), torch.randn(d, generator=g(11))
    ang = torch.rand(1, t, 1, d, generator=g(12)) * 6
    (out,), _ = run_ir(text, {"x": x, "c": ang.cos(), "n": ang.sin()}, {"T": t, "B": 1}, {"w": w}, dtype=dtype)
    x, w = rounded(x, dtype), rounded(w, dtype)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert_close(out, rope_ref(normed, rounded(ang.cos(), dtype), rounded(ang.sin(), dtype)), dtype, "norm+rope")


EPILOGUES = {
    "none": ("", lambda y, u, b, r: y),
    "bias": ("bias", lambda y, u, b, r: y + b),
    "glu_silu": ("glu silu", lambda y, u, b, r: F.silu(y) * u),
    "glu_gelu_tanh": ("glu gelu_tanh", lambda y, u, b, r: F.gelu(y, approximate="tanh") * u),
    "residual": ("residual", lambda y, u, b, r: y + r),
    "softcap": ("softcap", lambda y, u, b, r: torch.tanh(y / 30.0) * 30.0),
}


def linear_module(n: int, k: int, epilogue: str) -> str:
    params = {"w": f"f32[{n}, {k}]"}
    if epilogue == "bias":
        params["b"] = f"f32[{n}]"
        body = f"%y = linear(%x, %w, %b) : f32[1, T, {n}]"
    elif epilogue == "none":
        body = f"%y = linear(%x, %w) : f32[1, T, {n}]"
    else:
        extra = {"glu_silu": "u", "glu_gelu_tanh": "u", "residual": "r", "softcap": None}[epilogue]
        ops = {"glu_silu": f'%y = glu(%l, %u) {{activation = "silu"}} : f32[1, T, {n}]',
               "glu_gelu_tanh": f'%y = glu(%l, %u) {{activation = "gelu_tanh"}} : f32[1, T, {n}]',
               "residual": f"%y = add(%r, %l) : f32[1, T, {n}]",
               "softcap": f'%c = constant() {{value = 30.0, dtype = "f32"}} : f32[]\n'
                          f"  %dv = div(%l, %c) : f32[1, T, {n}]\n  %th = tanh(%dv) : f32[1, T, {n}]\n"
                          f"  %y = mul(%th, %c) : f32[1, T, {n}]"}[epilogue]
        operands = "%x, %w" + (f", %{extra}" if extra else "")
        region_args = f"%x: f32[1, T, {k}], %w: f32[{n}, {k}]" + (f", %{extra}: f32[1, T, {n}]" if extra else "")
        body = f"""%y = fused({operands}) {{name = "fused_linear_{epilogue}_0"}} : f32[1, T, {n}] {{
  ^({region_args}):
  %l = linear(%x, %w) : f32[1, T, {n}]
  {ops}
  yield %y
}}"""
    args = f"%x: f32[1, T, {k}]" + (", %u: f32[1, T, " + str(n) + "]" if "glu" in epilogue else "") + \
        (f", %r: f32[1, T, {n}]" if epilogue == "residual" else "")
    return module(params, args, body, "%y", f"f32[1, T, {n}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 80], ids=["gemv", "skinny", "gemm"])
@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
def test_linear_tiny(epilogue, rows, dtype):
    _check_linear(TINY["inter"], TINY["h"], epilogue, rows, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 7, 80], ids=["gemv", "skinny", "gemm"])
@pytest.mark.parametrize("nk,epilogue", [((1536, 576), "glu_silu"), ((576, 1536), "residual"),
                                         ((192, 576), "none"), ((49152, 576), "none")])
def test_linear_smollm2(nk, epilogue, rows):
    _check_linear(nk[0], nk[1], epilogue, rows, "bf16")


def _check_linear(n, k, epilogue, rows, dtype):
    text = linear_module(n, k, epilogue)
    x = torch.randn(1, rows, k, generator=g(13))
    w = torch.randn(n, k, generator=g(14)) / math.sqrt(k)
    u, r, b = torch.randn(1, rows, n, generator=g(15)), torch.randn(1, rows, n, generator=g(16)), torch.randn(n, generator=g(17))
    inputs = {"x": x, **({"u": u} if "glu" in epilogue else {}), **({"r": r} if epilogue == "residual" else {})}
    weights = {"w": w, **({"b": b} if epilogue == "bias" else {})}
    (out,), plan = run_ir(text, inputs, {"T": rows, "B": 1}, weights, dtype=dtype)
    assert {k.template for k in plan.kernels.values()} == {"gemm.py.j2", "gemv.py.j2"}
    y = rounded(x, dtype) @ rounded(w, dtype).T
    want = EPILOGUES[epilogue][1](y, rounded(u, dtype), rounded(b, dtype), rounded(r, dtype))
    assert_close(out, want, dtype, f"linear {epilogue} rows={rows}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", SHAPES)
def test_embedding(s, dtype):
    v, h, t = s["vocab"], s["h"], 11
    text = module({"e": f"f32[{v}, {h}]"}, "%ids: i64[1, T]", f"%y = embedding(%e, %ids) : f32[1, T, {h}]",
                  "%y", f"f32[1, T, {h}]")
    table = torch.randn(v, h, generator=g(18))
    ids = torch.randint(0, v, (1, t), generator=g(19))
    (out,), _ = run_ir(text, {"ids": ids}, {"T": t, "B": 1}, {"e": table}, dtype=dtype)
    assert_close(out, rounded(table, dtype)[ids], dtype, "embedding")


@pytest.mark.parametrize("dtype", DTYPES)
def test_copies(dtype):
    """permute, slice (with a step), expand and concat: the strided-copy kernel."""
    t, hq, d = 5, 4, 16
    text = module({}, f"%x: f32[1, T, {hq}, {d}], %y: f32[1, T, 1, {d}]", f"""
%p = permute(%x) {{perm = [0, 2, 1, 3]}} : f32[1, {hq}, T, {d}]
%s = slice(%x) {{axis = 3, start = 1, end = 15, step = 2}} : f32[1, T, {hq}, 7]
%e = expand(%y) {{shape = [1, T, {hq}, {d}]}} : f32[1, T, {hq}, {d}]
%c = concat(%x, %e) {{axis = 3}} : f32[1, T, {hq}, {2 * d}]""", "%p, %s, %c",
                  f"f32[1, {hq}, T, {d}], f32[1, T, {hq}, 7], f32[1, T, {hq}, {2 * d}]")
    x, y = torch.randn(1, t, hq, d, generator=g(20)), torch.randn(1, t, 1, d, generator=g(21))
    (p, s, c), plan = run_ir(text, {"x": x, "y": y}, {"T": t, "B": 1}, dtype=dtype)
    assert {k.template for k in plan.kernels.values()} == {"copy.py.j2"}
    x, y = rounded(x, dtype), rounded(y, dtype)
    assert torch.equal(p.float().reshape(1, hq, t, d), x.permute(0, 2, 1, 3))
    assert torch.equal(s.float().reshape(1, t, hq, 7), x[..., 1:15:2])
    assert torch.equal(c.float().reshape(1, t, hq, 2 * d), torch.cat([x, y.expand(1, t, hq, d)], -1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_append(dtype):
    """Tokens go to their slots in scattered blocks; slot -1 writes nothing."""
    bs, hkv, d, nb, t = 16, 2, 16, 6, 5
    text = module({}, f"%kp: f32[NB, {bs}, {hkv}, {d}], %vp: f32[NB, {bs}, {hkv}, {d}], %k: f32[T, {hkv}, {d}], "
                      f"%v: f32[T, {hkv}, {d}], %slots: i64[T]", f"""
%kn, %vn = kv_append(%kp, %vp, %k, %v, %slots) : f32[NB, {bs}, {hkv}, {d}], f32[NB, {bs}, {hkv}, {d}]""",
                  "%kn, %vn", f"f32[NB, {bs}, {hkv}, {d}], f32[NB, {bs}, {hkv}, {d}]")
    kp, vp = torch.randn(nb, bs, hkv, d, generator=g(22)), torch.randn(nb, bs, hkv, d, generator=g(23))
    k, v = torch.randn(t, hkv, d, generator=g(24)), torch.randn(t, hkv, d, generator=g(25))
    slots = torch.tensor([3 * bs + 2, 0, -1, 5 * bs + 15, bs + 7])
    (kn, vn), _ = run_ir(text, {"kp": kp.clone(), "vp": vp.clone(), "k": k, "v": v, "slots": slots},
                         {"T": t, "B": 1}, dtype=dtype)
    want_k, want_v = rounded(kp, dtype).clone(), rounded(vp, dtype).clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want_k[slot // bs, slot % bs] = rounded(k[i], dtype)
            want_v[slot // bs, slot % bs] = rounded(v[i], dtype)
    assert torch.equal(kn.float().reshape(want_k.shape), want_k)
    assert torch.equal(vn.float().reshape(want_v.shape), want_v)


def attention_ref(q, kp, vp, tables, seq_lens, query_start, scale, window, softcap):
    """Each sequence's queries over its keys, gathered block by block; causal, windowed."""
    bs = kp.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], vp.shape[3])
    for b in range(len(seq_lens)):
        lo, hi, n_ctx = int(query_start[b]), int(query_start[b + 1]), int(seq_lens[b])
        keys = torch.stack([kp[tables[b, j // bs], j % bs] for j in range(n_ctx)])     # [S, Hkv, D]
        vals = torch.stack([vp[tables[b, j // bs], j % bs] for j in range(n_ctx)])
        group = q.shape[1] // keys.shape[1]
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        for i in range(lo, hi):
            pos = n_ctx - (hi - lo) + (i - lo)
            s = torch.einsum("hd,shd->hs", q[i], keys) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            j = torch.arange(n_ctx)
            ok = (j <= pos) & ((pos - j < window) if window else True)
            s = s.masked_fill(~ok, float("-inf"))
            out[i] = torch.einsum("hs,shd->hd", s.softmax(-1), vals)
    return out


def attention_module(hq, hkv, d, bs, scale, window, softcap):
    return module({}, f"%q: f32[T, {hq}, {d}], %kp: f32[NB, {bs}, {hkv}, {d}], %vp: f32[NB, {bs}, {hkv}, {d}], "
                      f"%block_tables: i64[B, MB], %seq_lens: i64[B], %query_start: i64[B + 1]",
                  f"%o = paged_attention(%q, %kp, %vp, %block_tables, %seq_lens, %query_start) "
                  f"{{scale = {scale}, window = {window}, softcap = {softcap}}} : f32[T, {hq}, {d}]",
                  "%o", f"f32[T, {hq}, {d}]")


ATTN = [pytest.param(TINY, 0, 0.0, id="tiny"), pytest.param(TINY, 6, 50.0, id="tiny-window-softcap"),
        pytest.param(SMOL, 0, 0.0, id="smollm2", marks=pytest.mark.slow),
        pytest.param(SMOL, 40, 30.0, id="smollm2-window-softcap", marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mixed", "decode"])
@pytest.mark.parametrize("s,window,softcap", ATTN)
def test_paged_attention(s, window, softcap, mode, dtype):
    """Prefill/mixed (flash-style tiles) and decode (split-KV + reduce) over scattered blocks."""
    hq, hkv, d, bs, nb = s["hq"], s["hkv"], s["d"], 16, 24
    scale = 1 / math.sqrt(d)
    if mode == "mixed":
        n_new, ctx = [9, 1, 20, 3], [9, 37, 150, 3]     # a fresh prompt, a decode token, a late chunk, a prompt
    else:
        n_new, ctx = [1, 1, 1], [1, 17, 200]
    qs = torch.tensor([0] + list(torch.cumsum(torch.tensor(n_new), 0)))
    t, b = int(qs[-1]), len(n_new)
    mb = max(-(-c // bs) for c in ctx)
    perm = torch.randperm(nb, generator=g(26))
    tables = torch.zeros(b, mb, dtype=torch.int64)
    used = 0
    for i, c in enumerate(ctx):
        need = -(-c // bs)
        tables[i, :need] = perm[used:used + need]
        used += need
    q = torch.randn(t, hq, d, generator=g(27))
    kp, vp = torch.randn(nb, bs, hkv, d, generator=g(28)), torch.randn(nb, bs, hkv, d, generator=g(29))
    text = attention_module(hq, hkv, d, bs, scale, window, softcap)
    inputs = {"q": q, "kp": kp, "vp": vp, "block_tables": tables, "seq_lens": torch.tensor(ctx), "query_start": qs}
    (out,), plan = run_ir(text, inputs, {"T": t, "B": b, "MB": mb, "decode": mode == "decode"}, dtype=dtype)
    want = attention_ref(rounded(q, dtype), rounded(kp, dtype), rounded(vp, dtype), tables, ctx, qs, scale, window,
                         softcap)
    assert_close(out, want, dtype, f"paged attention {mode}")
