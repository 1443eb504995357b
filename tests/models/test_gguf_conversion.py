"""The cached GGUF conversion loads the very model and tokenizer transformers' GGUF loader gives."""

import torch

from llmc.compiler.frontend.hf import load_hf_model, load_tokenizer, resolve_source

TEXTS = ["The capital of France is", "def f(x):\n    return x ** 2\n", "Ünïcödé and emoji 🙂 too"]


def test_cached_conversion_equals_direct_gguf_load(smollm2):
    reference, reference_tokenizer, _ = smollm2  # loaded with use_cache=False
    source = resolve_source("smollm2")
    model = load_hf_model(source)
    tokenizer = load_tokenizer(source)

    want, got = reference.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name
    assert model.config.tie_word_embeddings == reference.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "rope_parameters", "rms_norm_eps", "vocab_size", "max_position_embeddings"):
        assert getattr(model.config, key) == getattr(reference.config, key), key

    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    assert (tokenizer.eos_token_id, tokenizer.bos_token) == (reference_tokenizer.eos_token_id,
                                                              reference_tokenizer.bos_token)
    ids = torch.tensor([reference_tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
