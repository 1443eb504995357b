import pytest

from tests.tiny_models import TINY_ARCHS, tiny_model


@pytest.fixture(scope="module", params=sorted(TINY_ARCHS))
def tiny_imported(request):
    """(architecture name, ImportedModel) for each tiny architecture, imported once per module."""
    from llmc.compiler.frontend import import_hf_model

    return request.param, import_hf_model(tiny_model(request.param))
