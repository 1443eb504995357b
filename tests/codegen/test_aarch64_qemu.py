"""AArch64 code actually run: kernels and a whole quantized artifact cross-built here for a
dotprod CPU execute under qemu user-mode emulation (an arm64 Debian python with the aarch64
TVM wheel, set up by scripts/aarch64_qemu.sh) and are checked on this host against numpy/torch
references and the x86-64 build of the same artifact. On an AArch64 host they run natively.

Skipped without that userland (run ``scripts/aarch64_qemu.sh``; LLMC_AARCH64_ROOT says where
it lives, default ~/.cache/llmc-aarch64) or without a cross linker (llmc[cross]). Slow: qemu
runs TVM's python side at a fraction of native speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from llmc.compiler.codegen.llvm_cpu import linker, resolve_cpu
from llmc.compiler.codegen.tvm import intdot
from llmc.compiler.ir.quant import code_range, dequantize, pack_codes
from llmc.runtime.cpu_features import host_arch
from tests.codegen.helpers import extreme_codes_and_activations

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "scripts" / "aarch64_runner.py"
ROOT = Path(os.environ.get("LLMC_AARCH64_ROOT", Path.home() / ".cache" / "llmc-aarch64"))
# (build CPU for LLVM, qemu's CPU model that runs it): neoverse-n1 has dotprod and no i8mm, and
# qemu models it exactly; neoverse-n2 adds i8mm (usdot), which qemu's "max" CPU has
ISAS = {"neondot": ("neoverse-n1", "neoverse-n1"), "neoni8mm": ("neoverse-n2", "max")}
IQ4 = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def aarch64_python() -> list[str]:
    if host_arch() == "aarch64":
        return [sys.executable]
    if host_arch() != "x86_64":
        pytest.skip(f"emulates AArch64 on x86-64 hosts (this one is {host_arch()})")
    pytest.importorskip("ziglang", reason="cross-linking AArch64 kernels needs llmc[cross] (ziglang)")
    wrapper = ROOT / "python"
    if not wrapper.exists():
        pytest.skip(f"no emulated AArch64 python at {wrapper}: run scripts/aarch64_qemu.sh "
                    f"(LLMC_AARCH64_ROOT chooses the directory)")
    return [str(wrapper)]


def run_aarch64(args: list[str], qemu_cpu: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMC_QEMU_CPU": qemu_cpu, "LLMC_AARCH64_PYTHONPATH": str(REPO)}
    return subprocess.run(aarch64_python() + [str(RUNNER), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_isa_follows_the_dotprod_and_i8mm_features():
    assert intdot.int_dot_isa("aarch64", resolve_cpu("neoverse-n1").required_flags).name == "neondot"
    assert intdot.int_dot_isa("aarch64", resolve_cpu("cortex-a76").required_flags).name == "neondot"
    assert intdot.int_dot_isa("aarch64", resolve_cpu("neoverse-n2").required_flags).name == "neoni8mm"
    assert intdot.int_dot_isa("aarch64", resolve_cpu("cortex-a72").required_flags) is None  # no dotprod


# ------------------------------------------------------------------------------ kernels


class Cases:
    """Kernels built for one AArch64 CPU, their inputs, the calls that run them and the checks."""

    def __init__(self, isa: intdot.IntDotIsa):
        self.isa, self.funcs, self.inputs, self.plan, self.checks = isa, {}, {}, [], []

    def add(self, name, func, args):
        self.funcs[name] = func
        self.plan.append({"func": name, "args": args})

    def linear(self, tag, m, n, k, group, signed, mins, decode, bits=4, glu=False, seed=0, raw=None, qx=None,
               codebook=None):
        """One quantized linear fed by the quantize kernel (or by given int8 activations ``qx``
        with unit activation scales), checked against the exact integer scheme."""
        isa, L = self.isa, self.isa.lanes
        g = torch.Generator().manual_seed(seed)
        lo, hi = code_range(bits, signed)
        if raw is None:
            raw = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int32)
        codes = pack_codes(raw, bits, signed)
        scales = (torch.rand(n, k // group, generator=g) * 0.02).half() if qx is None else torch.ones(n, k // group).half()
        mn = None
        if mins:
            mn = (torch.randn(n, k // group, generator=g) * 0.05).half() if qx is None else torch.full((n, k // group), 0.5).half()
        sb, halves = intdot.storage_bits(bits), intdot.halves(group)  # 5/6-bit: nibbles + bit planes
        ilv = 1 if glu else intdot.weight_interleave(isa, n, sb)
        packed = intdot.repack_any(codes.numpy(), L, bits, signed)
        s = intdot.interleave_blocks(intdot.repack_groups(scales.numpy(), L), ilv)
        p = f"{tag}_"
        self.inputs.update({p + "codes": intdot.interleave_blocks(packed, ilv), p + "scales": s,
                            p + "mins": intdot.interleave_blocks(intdot.repack_groups(mn.numpy(), L), ilv) if mins else s,
                            p + "y": np.full((m, n), np.nan, np.float32)})
        if qx is None:
            x = torch.randn(m, k, generator=g)
            x[0, :32] = 0  # an all-zero block: scale 0
            self.inputs.update({p + "x": x.numpy(), p + "q": np.zeros((m, k // 4), np.int32),
                                p + "d": np.zeros((m, k // 32), np.float32),
                                p + "ds": np.zeros((m, k // 32 * halves), np.float32)})
            self.add(p + "quantize", intdot.quantize_rows_kernel(k, halves=halves), [p + "x", p + "q", p + "d", p + "ds"])
            xb = x.numpy().reshape(m, k // 32, 32)
            amax = np.abs(xb).max(-1, keepdims=True)
            qq = np.round(xb * np.where(amax > 0, 127 / np.maximum(amax, 1e-30), 0))
            self.checks.append((p + "q", lambda got, qq=qq: np.array_equal(
                got.view(np.int8).reshape(qq.shape), qq.astype(np.int8))))
            xq = (qq * (amax / 127)).reshape(m, k)
        else:
            qsum = qx.astype(np.float32).reshape(m, k // 32, 32).sum(-1)
            self.inputs.update({p + "q": np.ascontiguousarray(qx).view(np.int32), p + "d": np.ones((m, k // 32), np.float32),
                                p + "ds": qsum})
            xq = qx.astype(np.float64)
        args = [p + "q", p + "d", p + "ds", p + "codes", p + "scales", p + "mins"]
        if glu:
            up = torch.randn(m, n, generator=g).numpy()
            self.inputs[p + "up"] = up
            args.append(p + "up")
        self.add(p + "linear", intdot.intdot_linear_kernel(isa, n, k, group, signed, mins, "float16", decode, glu=glu,
                                                          bits=sb, ilv=ilv, codebook=codebook), args + [p + "y"])
        w = dequantize(codes, scales, mn, bits=bits, group_size=group, signed=signed,
                       codebook=codebook).numpy().astype(np.float64)
        want = xq @ w.T
        if glu:
            want = want / (1 + np.exp(-want)) * up
        rows = 1 if decode else m
        if qx is not None:  # integers and half-integers: float32 holds them exactly
            self.checks.append((p + "y", lambda got, want=want: np.array_equal(got[:rows], want[:rows].astype(np.float32))))
        else:
            tol = (1e-3 if glu else 1e-5) * (1 + np.abs(want).max())
            self.checks.append((p + "y", lambda got, want=want, tol=tol: np.abs(got[:rows] - want[:rows]).max() <= tol))

    def build(self, mcpu: str, path: Path) -> str:
        cpu = resolve_cpu(mcpu)
        mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in self.funcs.items()})
        lib = tvm.compile(mod, target=cpu.tvm_target(2))
        asm = lib.mod.inspect_source("asm")
        lib.export_library(str(path), fcompile=linker(cpu))
        return asm


@pytest.mark.parametrize("isa_name", list(ISAS))
def test_intdot_kernels_run_on_aarch64(isa_name, tmp_path):
    """The NEON integer kernels (sdot, or usdot with i8mm) built for an AArch64 CPU, executed
    under qemu for that CPU: quantized activations equal numpy's; 4-bit GEMV/GEMM tiles
    (interleaved and not), 5/6-bit bit-plane codes, groups of 16, 8-bit codes (sign trick or
    usdot), 4-bit codebook indices (tbl), the gated epilogue equal the exact integer scheme; codes and activations at their
    extremes sum exactly."""
    mcpu, qemu_cpu = ISAS[isa_name]
    aarch64_python()  # skip early, before building
    isa = intdot.int_dot_isa("aarch64", resolve_cpu(mcpu).required_flags)
    assert isa is not None and isa.name == isa_name and isa.lanes == 4
    cases = Cases(isa)
    seed = 0
    for group, signed, mins in ((32, False, True), (64, True, False), (128, True, False)):
        for m, n, decode in ((1, 512, True), (1, 64, True), (13, 64, False), (13, 512, False), (5, 512, False)):
            seed += 1
            cases.linear(f"b4_{group}_{signed}_{m}_{n}_{decode}", m, n, 256, group, signed, mins, decode, seed=seed)
    for signed in (True, False):
        for m, decode in ((3, False), (9, False), (1, True)):
            cases.linear(f"b8_{signed}_{m}_{decode}", m, 64, 128, 32, signed, not signed, decode, bits=8, seed=m)
    cases.linear("glu", 5, 64, 128, 32, False, True, False, glu=True, seed=11)
    # 5- and 6-bit codes (nibbles + bit planes; Q5_K, Q6_K), groups of 16 (Q6_K's sub-blocks)
    for bits, group, signed, mins in ((5, 32, True, False), (6, 32, False, True), (6, 16, True, False),
                                      (4, 16, False, True)):
        for m, decode in ((11, False), (1, True)):
            cases.linear(f"b{bits}_g{group}_{m}", m, 96, 128, group, signed, mins, decode, bits=bits, seed=bits + m)
    # 4-bit codebook indices (IQ4_NL/IQ4_XS, MXFP4/NVFP4): a tbl per nibble vector, then 8-bit dots
    for book, group in ((IQ4, 32), (E2M1, 16)):
        for m, decode in ((9, False), (1, True)):
            cases.linear(f"book{group}_{m}", m, 64, 128, group, False, False, decode, seed=group + m, codebook=book)
    for bits, signed in ((4, False), (4, True), (5, True), (6, False), (8, True), (8, False)):
        raw, q = extreme_codes_and_activations(bits, signed, 32, 128, bits * 2 + signed)
        for decode in (False, True):
            cases.linear(f"extreme{bits}_{signed}_{decode}", 5, 32, 128, 32, signed, not signed, decode, bits=bits,
                         raw=raw, qx=q)
    lib = tmp_path / "kernels.so"
    asm = cases.build(mcpu, lib)
    dot = "usdot\t" if isa.vnni else "sdot\t"
    assert asm.count(dot) > 100 and "fmla" in asm  # the integer dot steps, the float scale steps
    for call in cases.plan:
        call["lib"] = str(lib)
    (tmp_path / "plan.json").write_text(json.dumps(cases.plan))
    np.savez(tmp_path / "inputs.npz", **cases.inputs)
    run = run_aarch64(["kernels", str(tmp_path / "plan.json"), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                      qemu_cpu)
    assert run.returncode == 0, run.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    failed = [name for name, check in cases.checks if not check(out[name])]
    assert not failed, failed


def test_dotprod_kernels_need_dotprod(tmp_path):
    """The same library on a CPU without dotprod (qemu's Cortex-A72) dies of SIGILL: the sdot
    instructions are really what runs (and why the manifest requires asimddp)."""
    aarch64_python()
    if host_arch() == "aarch64":
        pytest.skip("needs qemu's CPU models")
    isa = intdot.int_dot_isa("aarch64", resolve_cpu("neoverse-n1").required_flags)
    cases = Cases(isa)
    cases.linear("one", 1, 64, 128, 32, False, True, True)
    lib = tmp_path / "kernels.so"
    cases.build("neoverse-n1", lib)
    for call in cases.plan:
        call["lib"] = str(lib)
    (tmp_path / "plan.json").write_text(json.dumps(cases.plan))
    np.savez(tmp_path / "inputs.npz", **cases.inputs)
    args = ["kernels", str(tmp_path / "plan.json"), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")]
    assert run_aarch64(args, "neoverse-n1").returncode == 0
    bad = run_aarch64(args, "cortex-a72")
    assert bad.returncode in (-4, 132), (bad.returncode, bad.stderr[-2000:])  # SIGILL


# ------------------------------------------------------------------------------ a whole artifact


def test_quantized_tiny_llama_runs_on_aarch64_like_on_x86(tmp_path):
    """A random-weight tiny llama, q4_g32 (4-bit linears on sdot, 8-bit LM head by the sign
    trick), compiled for Neoverse N1 and run by llmc's runtime under qemu (Neoverse N1 model):
    greedy tokens and every step's logits equal the x86-64 build of the same model (the same
    integer scheme; only float rounding differs) and stay within the activation-quantization
    error of the fake-quantized transformers model."""
    from llmc.compiler.frontend import import_hf_model
    from llmc.compiler.passes.quantize import parse_scheme
    from tests.codegen.helpers import compile_cpu, hf_greedy, llmc_greedy
    from tests.codegen.test_cpu_quantized_model import fake_quantized
    from tests.tiny_models import tiny_model
    from llmc.runtime import Engine

    aarch64_python()
    model = tiny_model("llama")
    imported = import_hf_model(model)
    arm, x86 = tmp_path / "arm", tmp_path / "x86"
    compile_cpu(imported, arm, max_seq_len=128, cache_dir=tmp_path / "cache", quant="q4_g32", mcpu="neoverse-n1")
    compile_cpu(imported, x86, max_seq_len=128, cache_dir=tmp_path / "cache", quant="q4_g32")
    x86_intdot = intdot.int_dot_isa(host_arch(), resolve_cpu(None).required_flags) is not None
    manifest = json.loads((arm / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64" and "asimddp" in manifest["target"]["required_cpu_features"]
    weights = manifest["plan"]["weights"]
    # NEON's 4-lane layout ("intdot4"), the LM head's 8-bit codes ([N/4, G, 8 * 4] int32 words)
    assert weights["lm_head.weight.codes"]["layout"] == "intdot4-codes" and weights["lm_head.weight.codes"]["shape"][-1] == 32
    assert weights["model.layers.0.mlp.down_proj.weight.codes"]["layout"].startswith("intdot4-codes")

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist() for length in (5, 40)]
    new = 16
    (tmp_path / "prompts.json").write_text(json.dumps({"prompts": prompts, "new_tokens": new}))
    run = run_aarch64(["engine", str(arm), str(tmp_path / "prompts.json"), str(tmp_path / "out.npz")], "neoverse-n1")
    assert run.returncode == 0, run.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    engine = Engine.load(str(x86))
    reference = fake_quantized(model, parse_scheme("q4_g32"))
    for i, prompt in enumerate(prompts):
        got_tokens, got_logits = out[f"tokens_{i}"].tolist(), out[f"logits_{i}"]
        # the x86 build, fed the AArch64 tokens, step by step
        engine.reset()
        logits, x86_logits = engine.step(prompt), []
        for token in got_tokens:
            x86_logits.append(logits)
            logits = engine.step([token])
        x86_logits = np.stack(x86_logits)
        want_tokens, _ = llmc_greedy(engine, prompt, new)
        scale = 1 + np.abs(x86_logits).max()
        _, hf_logits = hf_greedy(reference, prompt, 1)
        x86_error = np.abs(got_logits - x86_logits).max() / scale
        hf_error = np.abs(got_logits[0] - hf_logits).max() / (1 + np.abs(hf_logits).max())
        print(f"prompt of {len(prompt)}: AArch64 vs x86-64 logits {x86_error:.1e}, vs fake-quantized HF {hf_error:.1e}"
              f" (relative to 1 + max |logit|)")
        if x86_intdot:  # an x86-64 host without AVX2 builds the float kernels: HF's bound only
            assert x86_error <= 1e-4 and got_tokens == want_tokens
        assert hf_error <= 2e-2
    # a CPU without dotprod (qemu's Cortex-A72): the runtime refuses the artifact, no SIGILL
    refused = run_aarch64(["engine", str(arm), str(tmp_path / "prompts.json"), str(tmp_path / "no.npz")], "cortex-a72")
    assert refused.returncode != 0 and "needs CPU features this machine lacks (asimddp, asimdhp)" in refused.stderr, \
        refused.stderr[-2000:]


@pytest.mark.model
def test_smollm2_gguf_on_neoverse_n1_is_as_close_to_hf_as_x86(smollm2, tmp_path):
    """SmolLM2 from its Q4_1/Q8_0 GGUF (blocks kept), compiled for Neoverse N1 and run under
    qemu: along its own greedy tokens its logits are as close to transformers' fp32 model (the
    same dequantized weights) as an x86-64 build's are. The bound is the x86-64 builds' measured
    error, not equality with them: int8 activation quantization turns float-order differences
    into rounding flips that grow over 30 layers (an AVX2 and an AVX-512 VNNI build differ from
    each other by as much, mean 0.11-0.15 and max 1.1-1.4 logits). Measured here: mean |arm -
    HF| 0.19 (x86-64 VNNI 0.20), top-1 agreement 15/16 and 16/16."""
    from llmc.compiler.codegen import CompileOptions
    from llmc.compiler.driver import compile_artifact
    from llmc.compiler.frontend import ImportedModel
    from llmc.compiler.ir import parse_module, print_module

    aarch64_python()
    model, tokenizer, imported = smollm2
    out = tmp_path / "n1"
    copy = ImportedModel(parse_module(print_module(imported.module)), imported.weights, imported.config)
    compile_artifact(copy, tokenizer, "cpu", str(out), CompileOptions(max_seq_len=256, mcpu="neoverse-n1"),
                     source="smollm2", quant=None)
    weights = json.loads((out / "manifest.json").read_text())["plan"]["weights"]
    assert sum(w["layout"].startswith("intdot4-codes") for w in weights.values()) == 211  # every linear
    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "def fibonacci(n):")]
    (tmp_path / "prompts.json").write_text(json.dumps({"prompts": prompts, "new_tokens": 16}))
    run = run_aarch64(["engine", str(out), str(tmp_path / "prompts.json"), str(tmp_path / "out.npz")], "neoverse-n1")
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    assert "Paris" in tokenizer.decode(got["tokens_0"].tolist())
    for i, prompt in enumerate(prompts):
        tokens, logits = got[f"tokens_{i}"].tolist(), got[f"logits_{i}"]
        with torch.no_grad():  # teacher-forced on the AArch64 tokens: row j predicts tokens[j]
            want = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].numpy()
        assert np.abs(logits - want).mean() <= 0.3 and np.abs(logits - want).max() <= 2.5
        assert np.mean(logits.argmax(-1) == want.argmax(-1)) >= 14 / 16
