"""KV pools sized per layer (MiMo-V2: layers with different KV head counts): the cpu target's
cache geometry lists each layer's shape and the block budget counts each layer's own bytes."""

import pytest

from llmc.compiler.ir import parse_module
from llmc.compiler.passes.paged_kv import PagedKV

TWO_SHAPES = """module @m {
  param @w : f32[16, 64]
  func @forward(%input_ids: i64[T], %positions: i64[T]) -> (f32[T, 32]) {
    %w = param() {name = "w"} : f32[16, 64]
    %x = embedding(%w, %input_ids) : f32[T, 64]
    %a = reshape(%x) {shape = [T, 4, 16]} : f32[T, 4, 16]
    %k0 = reshape(%x) {shape = [T, 4, 16]} : f32[T, 4, 16]
    %o0 = attention(%a, %k0, %k0, %positions) {layer = 0, scale = 0.25, window = 0, softcap = 0.0} : f32[T, 4, 16]
    %h = slice(%x) {axis = 1, start = 0, end = 32, step = 1} : f32[T, 32]
    %k1 = reshape(%h) {shape = [T, 2, 16]} : f32[T, 2, 16]
    %o1 = attention(%a, %k1, %k1, %positions) {layer = 1, scale = 0.25, window = 0, softcap = 0.0} : f32[T, 4, 16]
    %y = reshape(%o1) {shape = [T, 64]} : f32[T, 64]
    %z = slice(%y) {axis = 1, start = 0, end = 32, step = 1} : f32[T, 32]
    return %z
  }
}
"""


def test_cache_geometry_lists_each_layers_pool_shape():
    pytest.importorskip("tvm")
    from llmc.compiler.codegen.tvm.lower import cache_geometry

    module = PagedKV(block_size=16).run(parse_module(TWO_SHAPES))
    geom = cache_geometry(module)
    assert geom.per_layer == [(4, 16, 16), (2, 16, 16)]
    assert geom.layer(1).kv_heads == 2 and geom.layer(0).kv_heads == 4
    assert geom.bytes_per_block == 16 * 4 * (4 * 32 + 2 * 32)
