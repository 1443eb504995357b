"""The cpu artifact's weight file: bfloat16 weights (RecurrentGemma's normalizer buffer) keep their
exact bits through numpy, which has no bfloat16."""

import numpy as np
import torch
from safetensors.torch import load_file

from llmc.compiler.codegen.cpu import write_safetensors


def test_bf16_bits_are_written_as_bf16(tmp_path):
    w = torch.randn(3, 5).to(torch.bfloat16)
    f = torch.randn(4)
    path = str(tmp_path / "w.safetensors")
    write_safetensors({"w": w.view(torch.uint16).numpy(), "f": f.numpy(), "s": np.array(7, dtype=np.int64)},
                      {"w"}, path)
    back = load_file(path)
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], w)
    assert torch.equal(back["f"], f) and back["s"].shape == () and int(back["s"]) == 7
