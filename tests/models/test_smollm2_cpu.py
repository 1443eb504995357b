"""SmolLM2 compiled for cpu: 64 greedy tokens identical to transformers fp32 for several prompts."""

import numpy as np
import pytest

from llmc.runtime import Engine
from tests.codegen.helpers import compile_cpu, hf_greedy, llmc_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2, tmp_path_factory):
    _, tokenizer, imported = smollm2
    out = tmp_path_factory.mktemp("smollm2") / "cpu"
    compile_cpu(imported, out, tokenizer=tokenizer, max_seq_len=512)
    return Engine.load(str(out))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_64_tokens_match_hf(smollm2, smollm2_engine, prompt):
    model, tokenizer, _ = smollm2
    ids = tokenizer(prompt)["input_ids"]
    want, want_logits = hf_greedy(model, ids, 64)
    got, got_logits = llmc_greedy(smollm2_engine, ids, 64)
    assert np.abs(got_logits - want_logits).max() <= 1e-3
    assert got == want


def test_smollm2_artifact_tokenizer_and_chat(smollm2, smollm2_engine):
    _, tokenizer, _ = smollm2
    messages = [{"role": "user", "content": "Hi!"}]
    assert smollm2_engine.tokenizer.apply_chat_template(messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert smollm2_engine.tokenizer.encode(PROMPTS[0]) == tokenizer(PROMPTS[0])["input_ids"]
