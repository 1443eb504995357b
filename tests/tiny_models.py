"""Tiny random-weight configs of the architectures llmc covers (2 layers, small dims).

Each exercises a different corner: grouped-query attention everywhere (4 query heads over 2
KV heads), sliding windows (mistral, gemma2), q/k norms (qwen3), (1 + w) RMSNorm, GeGLU and
embedding scaling (gemma, gemma2), attention and final-logit softcapping (gemma2), fused
qkv/gate_up projections (phi3), attention biases (qwen2), tied and untied embeddings.
"""

import torch

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY_ARCHS = {
    "llama": dict(tie_word_embeddings=False, rope_theta=10000.0),
    "llama_tied": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=6),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=6, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "phi3": dict(tie_word_embeddings=False),
}


def tiny_model(name: str, seed: int = 0):
    """A random-weight transformers model in eval mode (model_type from the name's prefix)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = name.split("_")[0]
    config = AutoConfig.for_model(arch, **{**BASE, **TINY_ARCHS[name]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # from_config leaves norms at 1 and biases at 0: randomize them so every weight matters
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch.startswith("gemma") else 1.0))
    return model
