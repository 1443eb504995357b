"""Every tiny architecture imports, round-trips, verifies, and matches transformers' logits
for a prefill from an empty cache and for decode steps on top of a filled cache."""

import pytest
import torch

from llmc.compiler.frontend import import_hf_model
from llmc.compiler.ir import Interpreter, KVCache, parse_module, print_module, verify
from tests.tiny_models import TINY_ARCHS, tiny_model

PROMPT_LEN = 14  # past the sliding window (6) of mistral and gemma2


@pytest.fixture(scope="module", params=sorted(TINY_ARCHS))
def imported(request):
    model = tiny_model(request.param)
    return request.param, model, import_hf_model(model)


def test_import_round_trips_and_verifies(imported):
    name, _, imp = imported
    verify(imp.module)
    text = print_module(imp.module)
    again = parse_module(text)
    verify(again)
    assert print_module(again) == text
    attention = [op for op in imp.module.functions["forward"].ops if op.kind == "attention"]
    assert [op.attrs["layer"] for op in attention] == [0, 1]


def test_prefill_and_decode_match_transformers(imported):
    name, model, imp = imported
    torch.manual_seed(123)
    ids = torch.randint(3, model.config.vocab_size, (PROMPT_LEN + 3,))
    with torch.no_grad():
        want_prefill = model(ids[None, :PROMPT_LEN]).logits[0]
        out = model(ids[None, :PROMPT_LEN], use_cache=True)
        past, want_decode = out.past_key_values, []
        for i in range(PROMPT_LEN, PROMPT_LEN + 3):
            step = model(ids[None, i:i + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            want_decode.append(step.logits[0, -1])
    interp = Interpreter(imp.module, imp.weights, KVCache())
    got_prefill = interp.run({"input_ids": ids[:PROMPT_LEN], "positions": torch.arange(PROMPT_LEN)})[0]
    assert (got_prefill - want_prefill).abs().max() <= 1e-3
    assert torch.equal(got_prefill.argmax(-1), want_prefill.argmax(-1))
    for j, i in enumerate(range(PROMPT_LEN, PROMPT_LEN + 3)):
        got = interp.run({"input_ids": ids[i:i + 1], "positions": torch.tensor([i])})[0][0]
        assert (got - want_decode[j]).abs().max() <= 1e-3, f"{name} decode step {j}"
        assert int(got.argmax()) == int(want_decode[j].argmax())


def test_tied_and_untied_embeddings_are_both_covered():
    tied = {name: tiny_model(name).config.tie_word_embeddings for name in ("llama", "llama_tied")}
    assert tied == {"llama": False, "llama_tied": True}
