"""Structured output over the fake executor and the byte tokenizer: whatever the logits, a
constrained request's text follows its grammar (a JSON schema, any JSON object, a regex, a
choice, a Lark grammar); constrained and free requests share batches without changing each
other's tokens; preemption keeps the grammar's state; bad constraints are refused by name."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llmc.runtime.engine import Engine  # noqa: E402
from llmc.runtime.sampler import SamplingParams  # noqa: E402
from llmc.runtime.structured import GrammarError, grammar_from  # noqa: E402
from tests.runtime.fake import FakeExecutor, make_tokenizer, run_requests as run  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}
PROMPTS = [[(11 * i + 5 * j) % 250 + 1 for j in range(2 + 7 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def engine_for(tok, **kw):
    executor = FakeExecutor(**{k: kw.pop(k) for k in list(kw) if k in ("num_blocks", "block_size", "max_model_len")})
    return Engine(executor, tok, **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_whatever_the_logits(tok, temperature):
    grammar = grammar_from("json_schema", SCHEMA)
    params = [SamplingParams(max_tokens=250, temperature=temperature, seed=i, grammar=grammar)
              for i in range(len(PROMPTS))]
    for tokens, text, reason in run(engine_for(tok, num_blocks=256), PROMPTS, params):
        assert reason == "stop", text  # the grammar completed before max_tokens
        jsonschema.validate(json.loads(text), SCHEMA)
        assert ", " in text or "," not in text  # json.dumps' separators, no free whitespace


def test_json_object_regex_choice_and_lark(tok):
    def json_object(text, reason):  # an object may outgrow max_tokens under random logits: then a prefix
        return isinstance(json.loads(text), dict) if reason == "stop" else text.startswith("{")

    cases = [
        ("json_object", None, json_object),
        ("regex", r"[0-9]{3}-[a-z]{2,5}", lambda t, r: r == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        ("choice", ["yes", "no", 'maybe "so"'], lambda t, r: r == "stop" and t in ("yes", "no", 'maybe "so"')),
        ("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/',
         lambda t, r: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)?", t) and (r == "length") != t.endswith(")")),
    ]
    for kind, spec, ok in cases:
        grammar = grammar_from(kind, spec)
        for temperature in (0.0, 1.5):
            params = SamplingParams(max_tokens=200, temperature=temperature, seed=3, grammar=grammar)
            results = run(engine_for(tok), PROMPTS[:3], params)
            for _, text, reason in results:
                assert ok(text, reason), (kind, temperature, text, reason)
            if kind == "json_object" and temperature == 0:  # greedy: '{}' twice, one key with a long name
                assert all(reason == "stop" for _, _, reason in results)


def test_constrained_and_free_requests_batched_equal_alone(tok):
    grammar = grammar_from("json_schema", SCHEMA)
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=i, ignore_eos=True,
                             grammar=grammar if i % 2 else None) for i in range(len(PROMPTS))]
    batched = run(engine_for(tok, num_blocks=256), PROMPTS, params)
    alone = [run(engine_for(tok, num_blocks=256), [p], [params[i]])[0] for i, p in enumerate(PROMPTS)]
    assert batched == alone
    free = [b[0] for i, b in enumerate(batched) if i % 2 == 0]
    unconstrained = [run(engine_for(tok), [p], SamplingParams(max_tokens=40, temperature=0.8, seed=i,
                                                               ignore_eos=True))[0][0]
                     for i, p in enumerate(PROMPTS) if i % 2 == 0]
    assert free == unconstrained  # a free request's tokens do not change beside constrained ones


def test_grammar_state_survives_preemption(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "b": {"enum": ["x", "yy"]}, "c": {"type": "string", "maxLength": 6}},
              "required": ["a", "b", "c"], "additionalProperties": False}
    grammar = grammar_from("json_schema", schema)
    params = SamplingParams(max_tokens=60, grammar=grammar)
    prompts = PROMPTS * 2
    small = engine_for(tok, num_blocks=30, block_size=4, max_num_seqs=12, enable_prefix_caching=False)
    got = run(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert got == [run(engine_for(tok, num_blocks=256), [p], params)[0] for p in prompts]
    for _, text, reason in got:
        assert reason == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_max_tokens_cuts_a_constrained_output(tok):
    params = SamplingParams(max_tokens=5, grammar=grammar_from("json_schema", SCHEMA))
    tokens, text, reason = run(engine_for(tok), PROMPTS[:1], params)[0]
    assert reason == "length" and len(tokens) == 5 and text == '{"nam'  # one byte a token


def test_logprobs_are_over_the_allowed_tokens(tok):
    params = SamplingParams(max_tokens=8, logprobs=5, grammar=grammar_from("choice", ["yes", "no"]))
    engine = engine_for(tok)
    req = engine.add_request(PROMPTS[2], params)
    while engine.has_unfinished():
        engine.iterate()
    first = req.samples[0]
    assert {t for t, _ in first.top_logprobs} == {ord("y") + 1, ord("n") + 1}  # byte token ids
    assert np.isclose(sum(np.exp(lp) for _, lp in first.top_logprobs), 1.0)
    assert all(np.isfinite(s.logprob) for s in req.samples)


def test_bad_constraints_are_refused_by_name(tok):
    engine = engine_for(tok)
    with pytest.raises(GrammarError, match="not valid JSON"):
        grammar_from("json_schema", "{not json")
    with pytest.raises(GrammarError, match="must be an object"):
        grammar_from("json_schema", [1, 2])
    with pytest.raises(GrammarError, match="non-empty list"):
        grammar_from("choice", [])
    with pytest.raises(GrammarError, match="unknown constraint kind"):
        grammar_from("xml", "<a/>")
    for bad in (grammar_from("regex", "([0-9]"), grammar_from("grammar", "start: undefined_rule"),
                grammar_from("json_schema", {"type": "objectx"})):
        with pytest.raises(GrammarError, match="invalid constraint"):
            engine.check_grammar(bad)
        with pytest.raises(ValueError):
            engine.add_request(PROMPTS[0], SamplingParams(grammar=bad))
    assert not engine.requests and not engine.has_unfinished()  # nothing half-added
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(grammar=123)
    no_tokenizer = Engine(FakeExecutor())
    with pytest.raises(ValueError, match="tokenizer"):
        no_tokenizer.check_grammar(grammar_from("regex", "a+"))


def test_a_matcher_that_allows_nothing_leaves_the_end_tokens():
    import ctypes

    from llmc.runtime.structured import GrammarMatcher

    class Stuck:  # an llguidance matcher in an error state: an empty mask
        def unsafe_compute_mask_ptr(self, pointer, size):
            ctypes.memset(pointer, 0, size)

        def get_error(self):
            return "stuck"

    row = np.linspace(-1, 1, 100).astype(np.float32)
    GrammarMatcher(Stuck(), 100, [0, 63, 95]).mask(row)
    assert np.flatnonzero(np.isfinite(row)).tolist() == [0, 63, 95]
    assert row[63] == np.float32(np.linspace(-1, 1, 100)[63])


def test_checked_grammars_are_compiled_once(tok):
    engine = engine_for(tok)
    grammar = grammar_from("json_schema", SCHEMA)
    engine.check_grammar(grammar)  # the server's thread: compiles and keeps it
    template = engine.grammars._templates[grammar]
    a, b = engine.grammars.matcher(grammar), engine.grammars.matcher(grammar)
    assert engine.grammars._templates[grammar] is template and a._matcher is not b._matcher
    a.accept(ord("{") + 1)  # advancing one copy leaves the template and the other copy at the start
    row = np.zeros(257, dtype=np.float32)
    b.mask(row)
    assert np.flatnonzero(np.isfinite(row)).tolist() == [ord("{") + 1]
