"""Artifacts of the tiny llama built ahead of time for GPU archs, once per test session."""

import os

import pytest


@pytest.fixture(scope="session")
def gpu_artifact(tmp_path_factory):
    """``gpu_artifact(kind, arch, dtype=None)`` -> artifact directory (built once per session,
    with its own kernel cache so the default run starts cold, as CI does)."""
    pytest.importorskip("triton")
    from llmc.compiler.codegen import CompileOptions
    from llmc.compiler.driver import compile_artifact
    from llmc.compiler.frontend import ImportedModel, import_hf_model
    from llmc.compiler.ir import parse_module, print_module
    from tests.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("gpu-artifacts")
    built, imported = {}, []

    def build(kind, arch, dtype=None):
        key = (kind, arch, dtype)
        if key not in built:
            if not imported:
                imported.append(import_hf_model(tiny_model("llama")))
            src = imported[0]
            copy = ImportedModel(parse_module(print_module(src.module)), src.weights, src.config)
            out = root / f"{kind}-{arch}-{dtype or 'bf16'}"
            old = os.environ.get("LLMC_CACHE_DIR")
            os.environ["LLMC_CACHE_DIR"] = str(root / "cache")
            try:
                compile_artifact(copy, None, kind, str(out), CompileOptions(arch=arch, dtype=dtype, max_seq_len=128))
            finally:
                if old is None:
                    os.environ.pop("LLMC_CACHE_DIR")
                else:
                    os.environ["LLMC_CACHE_DIR"] = old
            built[key] = str(out)
        return built[key]

    return build
