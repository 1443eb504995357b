import pytest

from tests.runtime.fake import make_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("byte-tokenizer"))
