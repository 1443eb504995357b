import openai
import pytest

from tests.runtime.fake import make_tokenizer
from tests.server.helpers import fake_server


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("byte-tokenizer"))


@pytest.fixture(scope="module")
def live(byte_tokenizer):
    """An in-process server over the fake executor, one per test module."""
    with fake_server(tokenizer=byte_tokenizer, num_blocks=256, max_model_len=256, max_num_seqs=16,
                     max_num_batched_tokens=64) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
