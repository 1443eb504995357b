"""Per-input-channel importance of each linear's weight, from calibration text (``--quant-calibration``).

Why: a weight's error reaches the output through its input, so an error in channel k costs
about ``E[x_k^2]`` times its square. The quantizer's scale search weights its error by that
(``ir.quant.quantize_weight(importance=...)``). The statistics come from running the imported
IR through the reference interpreter on text the caller names, which must not be the text a
model is later evaluated on: it is opt-in, never a default.
"""

from __future__ import annotations

import torch

from .ir import Interpreter, KVCache, Module

WINDOW = 512  # tokens per interpreter run (each window is a fresh sequence)


def _observe_linear_inputs(module: Module, weights: dict, token_ids, window: int, accumulate) -> None:
    """Run ``token_ids`` through the interpreter in windows of ``window`` tokens (each a fresh
    sequence), calling ``accumulate(name, x [T, K])`` with the input of every ``linear`` whose
    weight is the param ``name``."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("the calibration text has no tokens; give --quant-calibration a text file with some prose")

    def observe(op, args):
        if op.kind != "linear" or len(args) < 2:
            return
        w = op.operands[1].producer
        if w is None or w.kind != "param":
            return
        accumulate(w.attrs["name"], args[0].detach().to(torch.float32).reshape(-1, args[0].shape[-1]))

    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window]
        interp = Interpreter(module, weights, KVCache(), check_types=False, observer=observe)
        interp.run({"input_ids": chunk, "positions": torch.arange(chunk.numel())})


def linear_importance(module: Module, weights: dict, token_ids, window: int = WINDOW) -> dict[str, torch.Tensor]:
    """Mean ``x^2`` per input channel ``[K]`` of every ``linear`` whose weight is a param,
    keyed by that param's name, over ``token_ids`` run in windows of ``window`` tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(name, x):
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    _observe_linear_inputs(module, weights, token_ids, window, accumulate)
    return {name: sums[name] / counts[name] for name in sums}


def linear_hessians(module: Module, weights: dict, token_ids, window: int = WINDOW) -> dict[str, torch.Tensor]:
    """Mean ``x x^T`` ``[K, K]`` (float64) of the input of every ``linear`` whose weight is a
    param, keyed by that param's name: GPTQ's Hessian (up to a factor 2); its diagonal is
    :func:`linear_importance`. Linears that read the same input (q/k/v, gate/up) compute it once."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last: dict = {}  # the previous input and its product: q/k/v (gate/up) read the same x

    def accumulate(name, x):
        if last.get("x") is not None and last["x"].shape == x.shape and torch.equal(last["x"], x):
            xx = last["xx"]
        else:
            xd = x.to(torch.float64)  # f64: GPTQ's rounding choices follow H closely (f32 sums moved
            xx = xd.T @ xd            # SmolLM2's q4_g32 perplexity by 0.3%, and saved no time)
            last["x"], last["xx"] = x, xx
        sums[name] = sums[name] + xx if name in sums else xx  # never updated in place: shared safely
        counts[name] = counts.get(name, 0) + x.shape[0]

    _observe_linear_inputs(module, weights, token_ids, window, accumulate)
    return {name: sums[name] / counts[name] for name in sums}


def read_calibration_tokens(path: str, tokenizer) -> list[int]:
    """Token ids of the text file ``path`` (a clear error when it is missing or empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"--quant-calibration {path}: cannot read it ({exc.strerror}); give a UTF-8 text file") from None
    if tokenizer is None:
        raise ValueError("--quant-calibration needs the model's tokenizer, and this model has none")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"--quant-calibration {path}: the file has no text; give a text file with some prose")
    return list(ids)
