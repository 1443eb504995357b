"""SmolLM2-135M-Instruct from the bundled GGUF: import, round trip, and logits equal to HF."""

import torch

from llmc.compiler.ir import Interpreter, KVCache, parse_module, print_module, verify

PROMPT = ("The capital of France is Paris, and the capital of Germany is Berlin. In summary, the three "
          "largest cities of Europe are, in order of population with their countries:")


def test_smollm2_imports_with_one_attention_per_layer(smollm2):
    _, _, imp = smollm2
    ops = imp.module.functions["forward"].ops
    assert sum(op.kind == "attention" for op in ops) == 30
    assert not [op for op in ops if op.kind not in
                {"param", "embedding", "linear", "mul", "add", "pow", "mean", "rsqrt", "reshape", "permute",
                 "slice", "neg", "concat", "attention", "silu", "constant", "cast", "cos", "sin"}]


def test_smollm2_text_round_trip(smollm2):
    _, _, imp = smollm2
    verify(imp.module)
    text = print_module(imp.module)
    again = parse_module(text)
    verify(again)
    assert print_module(again) == text


def test_smollm2_prefill_and_decode_logits_match_hf(smollm2):
    model, tokenizer, imp = smollm2
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"][:32])
    assert len(ids) == 32
    with torch.no_grad():
        out = model(ids[None], use_cache=True)
        want_prefill = out.logits[0]
        next_id = want_prefill[-1].argmax().reshape(1)
        want_decode = model(next_id[None], past_key_values=out.past_key_values, use_cache=True).logits[0]
    interp = Interpreter(imp.module, imp.weights, KVCache())
    got_prefill = interp.run({"input_ids": ids, "positions": torch.arange(32)})[0]
    assert (got_prefill - want_prefill).abs().max() <= 1e-3
    assert torch.equal(got_prefill.argmax(-1), want_prefill.argmax(-1))
    got_decode = interp.run({"input_ids": next_id, "positions": torch.tensor([32])})[0]
    assert (got_decode - want_decode).abs().max() <= 1e-3
    assert torch.equal(got_decode.argmax(-1), want_decode.argmax(-1))
