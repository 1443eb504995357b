"""The registry sweep as a ratchet: every model type recorded as passing in
arch_expectations.json must still pass (interpreter vs transformers, prefill + decode).

The default run checks a representative subset (one per mechanism: plain, LayerNorm,
partial/interleaved RoPE, MoE, ...); ``--runslow`` sweeps the whole registry and also
fails when a recorded failure now passes or fails differently, so the table stays true
(regenerate it with ``python -m tests.frontend.arch_sweep --update-expectations``)."""

import pytest

from tests.frontend.arch_sweep import load_expectations, registry, sweep_one

EXPECTED = load_expectations()
# one model type per mechanism the frontend has to get right; all must be recorded as passing
FAST_SUBSET = ["llama", "gpt2", "gpt_neox", "phi", "olmo", "cohere", "mixtral", "qwen2_moe", "olmoe", "gptj", "gpt_oss",
               "gpt_neo", "bloom", "llama4_text",  # self-computed attention, ALiBi, chunked attention
               "lfm2", "falcon_mamba"]  # recurrent state: a short convolution; a selective scan without attention


def _check(model_type: str, strict: bool):
    want = EXPECTED.get(model_type)
    assert want is not None, (f"{model_type} is in transformers' registry but not in arch_expectations.json: "
                              f"run python -m tests.frontend.arch_sweep --update-expectations")
    got = sweep_one(model_type)
    if want["status"] == "pass":
        assert got.status == "pass", f"{model_type} regressed: {got.stage}: {got.reason}"
    elif strict:
        assert got.status == want["status"] and got.stage == want["stage"], (
            f"{model_type} was recorded as {want['status']} at {want['stage']} ({want['reason']}) and is now "
            f"{got.status} at {got.stage} ({got.reason}): update arch_expectations.json")
    if got.status == "fail":  # every failure names the op or construct that stopped it
        assert got.reason.strip(), f"{model_type} failed at {got.stage} without a reason"


@pytest.mark.parametrize("model_type", FAST_SUBSET)
def test_representative_arch_passes(model_type):
    assert EXPECTED[model_type]["status"] == "pass", f"{model_type} is in the fast subset but not recorded as passing"
    _check(model_type, strict=False)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", registry())
def test_registry_arch_matches_expectation(model_type):
    _check(model_type, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(mt for mt, e in EXPECTED.items() if e.get("cpu") == "pass"))
def test_recorded_cpu_pass_still_compiles_and_matches(model_type):
    """Each model type recorded as passing through cpu: compiled, greedy tokens equal HF's."""
    from tests.frontend.arch_sweep import cpu_one

    status, reason = cpu_one(model_type)
    assert status == "pass", f"{model_type} regressed on cpu: {reason}"
