"""Shared checks for pass tests: before/after IR text, and interpreter equivalence."""

import torch

from llmc.compiler.ir import Interpreter, KVCache, Module, parse_module, print_module, verify
from llmc.compiler.passes import Pass


def run_pass_on_text(p: Pass, before: str) -> str:
    module = parse_module(before)
    verify(module)
    module = p.run(module)
    verify(module)
    return print_module(module)


def assert_pass_output(p: Pass, before: str, after: str) -> None:
    """The pass turns ``before`` into exactly ``after`` (both verified), as in TVM/MLIR tests."""
    got = run_pass_on_text(p, before)
    assert got == after, f"pass {p.name} gave:\n{got}\nexpected:\n{after}"


def model_outputs(module: Module, weights, vocab: int, seed: int = 0, prompt: int = 9):
    """Logits of a random prompt and of two decode steps after it, from the interpreter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (prompt + 2,), generator=g)
    interp = Interpreter(module, weights, KVCache())
    outs = [interp.run({"input_ids": ids[:prompt], "positions": torch.arange(prompt)})[0]]
    for i in range(prompt, prompt + 2):
        outs.append(interp.run({"input_ids": ids[i:i + 1], "positions": torch.tensor([i])})[0])
    return outs


def assert_same_outputs(before, after, atol: float = 1e-5) -> None:
    for a, b in zip(before, after):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= atol, f"max diff {(a - b).abs().max()}"


def run_on_copy(pass_name: str, module: Module) -> Module:
    """Run a registered pass on a copy of ``module`` (fixtures stay untouched); verify the result."""
    from llmc.compiler.passes import get_pass

    copy = parse_module(print_module(module))
    get_pass(pass_name).run(copy)
    verify(copy)
    return copy


def assert_keeps_outputs(imported, module: Module, vocab: int, atol: float = 1e-5) -> None:
    """``module`` computes what the imported module computes, on random prompts and decode steps."""
    assert_same_outputs(model_outputs(imported.module, imported.weights, vocab),
                        model_outputs(module, imported.weights, vocab), atol=atol)
