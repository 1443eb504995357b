"""The runtime's tokenizer (against transformers on the bundled SmolLM2) and its numpy sampler.

transformers is used here only to build the reference and the tokenizer.json; the runtime
modules themselves must import neither it nor torch nor the compiler (checked in a subprocess).
"""

import subprocess
import sys

import numpy as np
import pytest

from llmc.runtime.sampler import Sampler, SamplingParams
from llmc.runtime.tokenizer import StreamDecoder, Tokenizer
from tests.conftest import require_bundled_model

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve café, Ångström, Straße, Żółć, 日本語のテキスト",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧 in one line",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # comment\n\tindented\n",
    "  leading spaces and trailing   ",
]

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France? Réponds en français 🇫🇷"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(HF tokenizer, runtime Tokenizer) for the bundled SmolLM2, built once per module."""
    require_bundled_model()
    from transformers import AutoTokenizer

    from llmc.compiler.frontend.hf import resolve_source

    src = resolve_source("smollm2")
    hf = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    hf.backend_tokenizer.save(path)
    ours = Tokenizer(path, chat_template=hf.chat_template, bos_token=hf.bos_token, eos_token=hf.eos_token,
                     eos_token_ids=[hf.eos_token_id])
    return hf, ours


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizers, text):
    hf, ours = tokenizers
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids) == text


def test_special_token_ids(tokenizers):
    hf, ours = tokenizers
    assert hf.eos_token_id in ours.eos_token_ids
    assert ours.bos_token_id == hf.bos_token_id


def test_chat_template_matches_transformers(tokenizers):
    hf, ours = tokenizers
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == expected
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected


def test_chat_template_features(tmp_path, tokenizers):
    _, ours = tokenizers
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                "{{ bos_token }}{{ messages | tojson }}{{ eos_token }}")
    tok = Tokenizer(ours.path, chat_template=template, bos_token="<s>", eos_token="</s>", eos_token_ids=[])
    out = tok.apply_chat_template([{"role": "user", "content": "<é>"}])
    assert out == '<s>[{"role": "user", "content": "<é>"}]</s>'
    with pytest.raises(Exception, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_chat_without_template_is_a_clear_error(tokenizers):
    _, ours = tokenizers
    tok = Tokenizer(ours.path, chat_template=None, bos_token=None, eos_token=None, eos_token_ids=[0])
    with pytest.raises(ValueError, match="no chat template.*plain text prompt"):
        tok.apply_chat_template(MESSAGES)


def test_stream_decoder_reassembles_multibyte_text(tokenizers):
    _, ours = tokenizers
    text = "".join(TEXTS)
    ids = ours.encode(text)
    # The test is only meaningful if some character is split across tokens.
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == text


def test_runtime_imports_neither_transformers_torch_nor_compiler():
    code = ("import sys, llmc.runtime.tokenizer, llmc.runtime.sampler, llmc.runtime.engine, "
            "llmc.runtime.scheduler, llmc.runtime.async_engine, llmc.runtime.server; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch') "
            "or m == 'llmc.compiler' or m.startswith('llmc.compiler.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- sampler ---------------------------------------------------------------------------------

def _logits(seed=0, vocab=100):
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32)


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams())
    for seed in range(5):
        logits = _logits(seed)
        assert sampler.sample(logits, []) == int(np.argmax(logits))


def _run(params, steps=30):
    sampler = Sampler(params)
    return [sampler.sample(_logits(step), []) for step in range(steps)]


def test_same_seed_same_sequence_different_seed_differs():
    a = _run(SamplingParams(temperature=1.0, seed=1))
    assert a == _run(SamplingParams(temperature=1.0, seed=1))
    assert a != _run(SamplingParams(temperature=1.0, seed=2))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature):
    greedy = _run(SamplingParams())
    assert _run(SamplingParams(temperature=temperature, top_k=1, seed=3)) == greedy


def test_tiny_top_p_is_greedy():
    assert _run(SamplingParams(temperature=2.0, top_p=1e-6, seed=4)) == _run(SamplingParams())


def test_top_k_limits_candidates():
    logits = _logits(7)
    top = set(np.argsort(-logits)[:3].tolist())
    sampler = Sampler(SamplingParams(temperature=10.0, top_k=3, seed=0))
    assert {sampler.sample(logits, []) for _ in range(300)} == top


def test_min_p_drops_unlikely_tokens():
    # probabilities ~ [0.5, 0.3, 0.15, 0.05]: min_p=0.2 keeps those >= 0.1, i.e. tokens 0, 1, 2.
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=0.2, seed=0))
    assert {sampler.sample(logits, []) for _ in range(500)} == {0, 1, 2}
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=0.9, seed=0))
    assert {sampler.sample(logits, []) for _ in range(50)} == {0}


def test_repetition_penalty_lowers_repeated_token():
    # Token 0 leads slightly; after it was generated, a penalty makes token 1 the greedy choice.
    logits = np.array([2.0, 1.8, -1.0, -3.0])
    assert Sampler(SamplingParams()).sample(logits, [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.3)).sample(logits, [0, 0]) == 1
    # Negative logits are pushed further down, not up.
    logits = np.array([-1.0, -1.1, -5.0])
    assert Sampler(SamplingParams(repetition_penalty=1.3)).sample(logits, [0]) == 1
    # And with sampling, the repeated token's frequency drops (p = 0.5 -> sigmoid(-0.5) = 0.38).
    logits = np.array([1.0, 1.0])
    plain = Sampler(SamplingParams(temperature=1.0, seed=0))
    penal = Sampler(SamplingParams(temperature=1.0, seed=0, repetition_penalty=2.0))
    assert (sum(penal.sample(logits, [0]) == 0 for _ in range(4000))
            < sum(plain.sample(logits, [0]) == 0 for _ in range(4000)) - 300)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("seed", -1), ("seed", "x"), ("max_tokens", -1), ("prompt_logprobs", 21), ("stop_token_ids", [1, -2]), ("stop_token_ids", 3),
])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_token_ids_normalized():
    assert SamplingParams(stop_token_ids=[np.int64(2), 5]).stop_token_ids == (2, 5)
