"""``llmc verify ARTIFACT MODEL``: exit 0 with the figures when the artifact computes what
transformers computes; exit 1 when the weights differ (deliberately altered)."""

import subprocess
import sys

import pytest
import torch

from tests.codegen.helpers import compile_cpu
from tests.conftest import require_bundled_model


def llmc(*args):
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama saved as an HF directory, its cpu artifact, and a copy with altered weights."""
    from llmc.compiler.frontend import import_hf_model
    from tests.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("verify")
    model = tiny_model("llama")
    model.save_pretrained(root / "hf")
    compile_cpu(import_hf_model(model), root / "artifact", max_seq_len=128, cache_dir=root / "cache")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.1)  # a 10% change in one matrix
    model.save_pretrained(root / "altered")
    return root


def test_verify_passes_on_a_faithful_artifact(tiny):
    out = llmc("verify", str(tiny / "artifact"), str(tiny / "hf"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("16/16") == 3 and "ok: max logit error" in out.stdout


def test_verify_fails_when_weights_differ(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"  # no tokenizer in the artifact: prompts are token ids
    prompts.write_text("5 6 7 8\n9 10 11 12 13 14 15\n")
    out = llmc("verify", str(tiny / "artifact"), str(tiny / "altered"), "--prompts", str(prompts), "--max-tokens", "4")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "MISMATCH" in out.stdout and out.stdout.count("FAIL") == 2


def test_prompt_files_must_be_token_ids_without_a_tokenizer():
    from llmc.compiler.verify import DEFAULT_PROMPTS, _prompt_ids

    assert _prompt_ids(["5 6 7"], None, 128) == [("5 6 7", [5, 6, 7])]
    assert [len(ids) for _, ids in _prompt_ids(DEFAULT_PROMPTS, None, 128)] == [5, 17, 33]
    with pytest.raises(ValueError, match="space-separated token ids"):
        _prompt_ids(["not token ids"], None, 128)
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        _prompt_ids(["5 200"], None, 128)


@pytest.mark.model
@pytest.mark.slow
def test_verify_smollm2(tmp_path):
    """The bundled SmolLM2 compiled with float weights (``--quant none``: what checks the
    compiler itself; the default keeps the GGUF's quantized weights and int8 activations,
    whose logits differ from transformers' by design) verifies against transformers; altering
    a weight in the artifact (checksums rewritten so it loads) makes verify exit 1."""
    require_bundled_model()
    import json

    from safetensors.numpy import load_file, save_file

    from llmc.runtime.artifact import WEIGHTS, sha256_file

    art = tmp_path / "smollm2"
    assert llmc("compile", "smollm2", "--target", "cpu", "--quant", "none", "-o", str(art), "-q").returncode == 0
    out = llmc("verify", str(art), "smollm2")
    assert out.returncode == 0, out.stdout + out.stderr
    weights = load_file(str(art / WEIGHTS))
    name = next(n for n in weights if "down_proj" in n)
    weights[name] = weights[name] * 1.05
    save_file(weights, str(art / WEIGHTS))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"][WEIGHTS] = sha256_file(str(art / WEIGHTS))
    (art / "manifest.json").write_text(json.dumps(manifest))
    out = llmc("verify", str(art), "smollm2")
    assert out.returncode == 1, out.stdout + out.stderr
