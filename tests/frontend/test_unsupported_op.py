"""An aten op without an import rule fails with the op, the node and the source line."""

import pytest
import torch

from llmc.compiler.frontend import UnsupportedOpError, import_program


class UsesCumprod(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)

    def forward(self, input_ids, position_ids):
        h = self.emb(input_ids)
        return torch.cumprod(h, dim=-1)  # no llmc import rule for cumprod


def test_unsupported_op_names_op_node_and_source_line():
    T = torch.export.Dim("T", min=1, max=64)
    ids, pos = torch.arange(4)[None], torch.arange(4)[None]
    program = torch.export.export(UsesCumprod(), (ids, pos), dynamic_shapes=({1: T}, {1: T}), strict=False)
    with pytest.raises(UnsupportedOpError) as err:
        import_program(program, "m", "T", {"input_ids": "input_ids", "position_ids": "positions"})
    message = str(err.value)
    assert "aten.cumprod.default" in message
    assert "%cumprod" in message
    assert "test_unsupported_op.py" in message and "torch.cumprod(h, dim=-1)" in message
    assert "aten.linear.default" in message  # lists what is supported
    assert "Fix:" in message
