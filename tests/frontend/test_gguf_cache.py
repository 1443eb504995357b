"""The GGUF conversion cache: content-hash keys, atomic entries, damaged entries converted again.

The converter itself is replaced by a stand-in here (a real conversion takes ~20 s);
tests/models/test_gguf_conversion.py checks a real one against transformers' GGUF loader."""

import json
import os

import pytest

from llmc.compiler.frontend import gguf_cache, hf


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    return path


@pytest.fixture
def conversions(monkeypatch, tmp_path):
    """Replace the slow transformers conversion by one that writes two small files."""
    calls = []

    def convert(gguf_path, out):
        calls.append(gguf_path)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)
        with open(os.path.join(out, "model.safetensors"), "wb") as f:
            f.write(b"x" * 100)

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMC_NO_CACHE", raising=False)
    return calls


def test_second_lookup_reuses_the_conversion(fake_gguf, conversions):
    first = gguf_cache.converted_dir(str(fake_gguf))
    second = gguf_cache.converted_dir(str(fake_gguf))
    assert first == second and len(conversions) == 1
    meta = json.loads(open(os.path.join(first, gguf_cache.META_FILE)).read())
    assert meta["files"] == {"config.json": 23, "model.safetensors": 100}
    assert os.path.dirname(first) == os.path.join(os.environ["LLMC_CACHE_DIR"], "models")


def test_key_follows_the_file_content(fake_gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(fake_gguf.read_bytes())
    assert gguf_cache.conversion_key(str(fake_gguf)) == gguf_cache.conversion_key(str(copy))
    copy.write_bytes(fake_gguf.read_bytes() + b"more")
    assert gguf_cache.conversion_key(str(fake_gguf)) != gguf_cache.conversion_key(str(copy))


def test_truncated_entry_is_converted_again(fake_gguf, conversions):
    entry = gguf_cache.converted_dir(str(fake_gguf))
    with open(os.path.join(entry, "model.safetensors"), "wb") as f:
        f.write(b"x" * 10)  # cut short, as by a full disk
    assert gguf_cache.converted_dir(str(fake_gguf)) == entry
    assert len(conversions) == 2 and os.path.getsize(os.path.join(entry, "model.safetensors")) == 100


def test_failed_conversion_leaves_nothing_behind(fake_gguf, monkeypatch, tmp_path):
    def convert(gguf_path, out):
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_cache.converted_dir(str(fake_gguf))
    assert os.listdir(tmp_path / "cache" / "models") == []


class FakeLoader:
    """Stands in for AutoModelForCausalLM: records where it was asked to load from."""

    calls = []
    fail_once = False

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.calls.append((path, kwargs.get("gguf_file")))
        if cls.fail_once:
            cls.fail_once = False
            raise OSError("unreadable safetensors header")
        return path


def test_unreadable_cache_entry_is_discarded_and_rebuilt(fake_gguf, conversions):
    FakeLoader.calls, FakeLoader.fail_once = [], True
    source = hf.resolve_source(str(fake_gguf))
    loaded = hf._from_pretrained(FakeLoader, source, use_cache=True)
    assert len(conversions) == 2  # converted, failed to load, converted again
    assert loaded == FakeLoader.calls[-1][0] and FakeLoader.calls[-1][1] is None


def test_no_cache_reads_the_gguf_directly(fake_gguf, conversions, monkeypatch):
    FakeLoader.calls, FakeLoader.fail_once = [], False
    source = hf.resolve_source(str(fake_gguf))
    monkeypatch.setenv("LLMC_NO_CACHE", "1")
    hf._from_pretrained(FakeLoader, source, use_cache=True)
    hf._from_pretrained(FakeLoader, source, use_cache=True)
    assert conversions == [] and FakeLoader.calls == [(source.path, "m.gguf")] * 2
    assert not os.path.exists(os.environ["LLMC_CACHE_DIR"])


def test_least_recently_used_conversions_are_evicted(tmp_path, conversions, monkeypatch):
    paths = []
    for i in range(3):
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(b"GGUF" + bytes([i]) * 64)
        paths.append(path)
    monkeypatch.setenv("LLMC_CACHE_MAX_GB", str(250 / (1 << 30)))  # room for two 123-byte entries
    first = gguf_cache.converted_dir(str(paths[0]))
    second = gguf_cache.converted_dir(str(paths[1]))
    os.utime(os.path.join(first, gguf_cache.META_FILE), (1, 1))
    os.utime(os.path.join(second, gguf_cache.META_FILE), (2, 2))
    gguf_cache.converted_dir(str(paths[0]))  # a hit makes the first entry the most recent
    third = gguf_cache.converted_dir(str(paths[2]))
    assert os.path.isdir(first) and os.path.isdir(third) and not os.path.exists(second)


def test_one_conversion_larger_than_the_limit_is_kept(fake_gguf, conversions, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE_MAX_GB", "0")
    entry = gguf_cache.converted_dir(str(fake_gguf))
    assert os.path.isdir(entry)


def test_staging_dirs_of_killed_conversions_are_removed(fake_gguf, conversions):
    root = os.path.join(os.environ["LLMC_CACHE_DIR"], "models")
    os.makedirs(os.path.join(root, ".deadbeef-killed"))
    os.utime(os.path.join(root, ".deadbeef-killed"), (1, 1))
    os.makedirs(os.path.join(root, ".cafe-running"))
    gguf_cache.converted_dir(str(fake_gguf))
    assert sorted(os.listdir(root)) == sorted([".cafe-running", gguf_cache.conversion_key(str(fake_gguf))])
