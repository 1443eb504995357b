"""Kernel builders memoized by their arguments (compiler/codegen/tvm/memo.py): lowering asks for
a kernel once per op and entry point, and each distinct kernel must be built once. The
memoized lowering must be the very module the unmemoized one builds."""

import pytest

tvm = pytest.importorskip("tvm")

from llmc.compiler.codegen.llvm_cpu import resolve_cpu  # noqa: E402
from llmc.compiler.codegen.tvm import lower  # noqa: E402
from llmc.compiler.codegen.tvm.intdot import int_dot_isa  # noqa: E402
from llmc.compiler.codegen.tvm.memo import memoized_kernel  # noqa: E402
from llmc.compiler.driver import optimize_for_target  # noqa: E402
from llmc.compiler.frontend import ImportedModel, import_hf_model  # noqa: E402
from llmc.compiler.ir import parse_module, print_module  # noqa: E402

MEMOIZED = ("paged_attention_kernel", "kv_append_kernel", "intdot_linear_kernel", "quantize_rows_kernel")


def test_equal_arguments_give_the_same_kernel_object():
    built = []

    @memoized_kernel
    def builder(n, scale=1.0, slopes=None):
        built.append((n, scale, slopes))
        return object()

    first = builder(4, scale=0.5, slopes=[1.0, 2.0])
    assert builder(4, scale=0.5, slopes=[1.0, 2.0]) is first  # lists compared as tuples
    assert builder(4, scale=0.5, slopes=(1.0, 2.0)) is first
    assert builder(8, scale=0.5, slopes=[1.0, 2.0]) is not first
    assert builder(4, scale=1, slopes=None) is not builder(4, scale=1.0, slopes=None)  # int and float kept apart
    assert builder(4, slopes={"a": 1}) is not builder(4, slopes={"a": 1})  # unhashable: built each time
    assert len(built) == 6
    assert built[0] == (4, 0.5, (1.0, 2.0))  # the builder sees the frozen form


def test_an_error_inside_the_builder_is_not_swallowed():
    @memoized_kernel
    def builder(n):
        raise TypeError("bad shape")

    with pytest.raises(TypeError, match="bad shape"):
        builder(3)


@pytest.fixture(scope="module")
def optimized_llama():
    """A 4-layer tiny llama, Q4-quantized and optimized as `llmc compile` does."""
    from tests.tiny_models import BASE, TINY_ARCHS
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{**BASE, **TINY_ARCHS["llama"], "num_hidden_layers": 4})
    model = AutoModelForCausalLM.from_config(config).eval()
    imported = import_hf_model(model)
    copy = ImportedModel(parse_module(print_module(imported.module)), imported.weights, imported.config)
    optimize_for_target(copy, "cpu", quant="q4_g32")
    return copy.module


def _options():
    cpu = resolve_cpu(None)
    isa = int_dot_isa(cpu.arch, cpu.required_flags)
    if isa is None:
        pytest.skip("this CPU has no integer dot product: the intdot kernels are not used")
    return lower.AttentionOptions(intdot=isa)


def test_lowering_builds_each_kernel_once(optimized_llama):
    options = _options()
    for name in MEMOIZED:
        getattr(lower, name).cache_clear()
    lower.lower_to_relax(optimized_llama, options)
    info = {name: getattr(lower, name).cache_info() for name in MEMOIZED}
    # 4 layers x 2 entry points (prefill, decode): one attention kernel per entry point
    assert info["paged_attention_kernel"].misses == 2 and info["paged_attention_kernel"].hits == 6
    assert info["kv_append_kernel"].hits >= 6
    # 7 linears a layer (q, k, v, o, gate/up fused, down) repeat in every layer
    assert info["intdot_linear_kernel"].hits >= 3 * info["intdot_linear_kernel"].misses


@pytest.mark.slow  # builds every kernel of every layer again: ~30-60 s
def test_memoized_lowering_equals_building_every_kernel_afresh(optimized_llama, monkeypatch):
    options = _options()
    memoized, _ = lower.lower_to_relax(optimized_llama, options)
    for name in MEMOIZED:
        monkeypatch.setattr(lower, name, getattr(lower, name).__wrapped__)
    fresh, _ = lower.lower_to_relax(optimized_llama, options)
    tvm.ir.assert_structural_equal(memoized, fresh)


def test_fast_macro_lookup_builds_the_same_kernel_and_restores_tvm():
    from tvm.script.parser.core.parser import ScriptMacro

    from llmc.compiler.codegen.tvm.attention import kv_append_kernel
    from llmc.compiler.codegen.tvm.intdot import quantize_rows_kernel
    from llmc.compiler.codegen.tvm.memo import fast_macro_lookup

    original = ScriptMacro._find_parser_def
    for builder, args in ((quantize_rows_kernel, (576,)), (kv_append_kernel, (3, 64, 32, True, "float32", "float16"))):
        plain = builder.__wrapped__(*args)  # TVM's own lookup
        with fast_macro_lookup():
            assert ScriptMacro._find_parser_def is not original
            fast = builder.__wrapped__(*args)
        tvm.ir.assert_structural_equal(plain, fast)
    assert ScriptMacro._find_parser_def is original
    with pytest.raises(RuntimeError), fast_macro_lookup():  # no parser on the stack: TVM's own error
        ScriptMacro._find_parser_def(None)
    assert ScriptMacro._find_parser_def is original
