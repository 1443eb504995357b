"""GGUF files converted once into a Hugging Face directory, cached by content hash.

Why: transformers' GGUF loader spends 15-20 s per load on a 135M model (it parses the
vocabulary field by field, twice, and rebuilds gguf's tensor-name map for every module),
and converting the tokenizer costs another 3-4 s. The converted directory (config.json,
model.safetensors in fp32, tokenizer.json + chat template) loads in about a second, so
every compile after the first one of a GGUF skips that work.

The key is the sha256 of the GGUF file plus the transformers/gguf versions and this
module's conversion version, so an edited file or an upgraded converter never reuses a
stale conversion. Entries are written to a temporary directory and renamed into place,
so an interrupted conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

from ..cache import cache_root

log = logging.getLogger("llmc.frontend")
progress = logging.getLogger("llmc.progress")

CONVERSION_VERSION = 1
META_FILE = "llmc-conversion.json"
DEFAULT_MAX_GB = 20.0  # fp32 conversions are big (4 bytes per parameter): keep the cache bounded
STALE_STAGE_SECONDS = 24 * 3600  # a staging dir this old belongs to a killed conversion


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_KEYS: dict[tuple, str] = {}


def conversion_key(gguf_path: str) -> str:
    """Content hash + converter versions; memoized per (path, size, mtime) within a process."""
    st = os.stat(gguf_path)
    memo = (os.path.abspath(gguf_path), st.st_size, st.st_mtime_ns)
    if memo not in _KEYS:
        _KEYS[memo] = _conversion_key(gguf_path)
    return _KEYS[memo]


def _conversion_key(gguf_path: str) -> str:
    from importlib.metadata import version

    versions = {"llmc_conversion": CONVERSION_VERSION, "transformers": version("transformers"),
                "gguf": version("gguf")}
    h = hashlib.sha256(file_sha256(gguf_path).encode())
    h.update(json.dumps(versions, sort_keys=True).encode())
    return h.hexdigest()[:32]


def converted_dir(gguf_path: str, cache_dir: Optional[str] = None) -> str:
    """The cached HF directory for ``gguf_path``, converting (once) if there is none yet."""
    t0 = time.perf_counter()
    root = os.path.join(cache_dir or cache_root(), "models")
    key = conversion_key(gguf_path)
    target = os.path.join(root, key)
    if _complete(target):
        os.utime(os.path.join(target, META_FILE))  # most recently used: evicted last
        log.info("GGUF conversion cache hit: %s (hash %.1fs)", target, time.perf_counter() - t0)
        return target
    progress.info("converting %s into a Hugging Face directory (once per file; cached in %s)", gguf_path, root)
    os.makedirs(root, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
    try:
        _convert(gguf_path, stage)
        _write_meta(stage, gguf_path, key)
        if os.path.exists(target):  # an incomplete leftover: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(stage, target)
        except OSError:  # another process finished the same conversion first
            if not _complete(target):
                raise
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    progress.info("converted the GGUF in %.1fs", time.perf_counter() - t0)
    evict(root, keep=target)
    return target


def max_cache_bytes() -> int:
    """``$LLMC_CACHE_MAX_GB`` (default 20) gigabytes for all cached conversions together."""
    try:
        return int(float(os.environ.get("LLMC_CACHE_MAX_GB", DEFAULT_MAX_GB)) * (1 << 30))
    except ValueError:
        log.warning("LLMC_CACHE_MAX_GB=%r is not a number; using %s", os.environ["LLMC_CACHE_MAX_GB"],
                    DEFAULT_MAX_GB)
        return int(DEFAULT_MAX_GB * (1 << 30))


def evict(root: str, keep: str) -> None:
    """Remove least recently used conversions until the cache fits ``max_cache_bytes`` (never
    ``keep``, the one just made or used), and staging dirs left by killed conversions."""
    now, entries = time.time(), []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("."):
            if now - os.path.getmtime(path) > STALE_STAGE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
            continue
        files = _recorded_files(path)
        if files is not None:
            entries.append((os.path.getmtime(os.path.join(path, META_FILE)), sum(files.values()), path))
    total, limit = sum(size for _, size, _ in entries), max_cache_bytes()
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if os.path.abspath(path) == os.path.abspath(keep):
            continue
        log.info("GGUF conversion cache over %.1f GB: removing the least recently used %s", limit / (1 << 30), path)
        shutil.rmtree(path, ignore_errors=True)
        total -= size
    if total > limit:
        log.warning("the GGUF conversion %s alone is larger than LLMC_CACHE_MAX_GB (%.1f GB)", keep, limit / (1 << 30))


def has_tokenizer(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "tokenizer_config.json"))


def discard(directory: str) -> None:
    """Drop a cached conversion that failed to load (the next compile converts again)."""
    log.warning("discarding the unreadable GGUF conversion %s; converting again", directory)
    shutil.rmtree(directory, ignore_errors=True)


def _recorded_files(directory: str) -> Optional[dict[str, int]]:
    """{file: size} of a complete entry (every recorded file present at its size), else None."""
    try:
        with open(os.path.join(directory, META_FILE)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return None
    complete = all(os.path.isfile(os.path.join(directory, name)) and os.path.getsize(os.path.join(directory, name)) == size
                   for name, size in files.items())
    return files if complete else None


def _complete(directory: str) -> bool:
    return _recorded_files(directory) is not None


def _convert(gguf_path: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(gguf_path))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype="float32")
    log.info("  read and dequantized the GGUF weights (%.1fs)", time.perf_counter() - t0)
    _save_model(model, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (OSError, ValueError) as exc:
        log.info("  no tokenizer in %s: %s", gguf_path, exc)
        tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    log.info("  wrote the converted model%s (%.1fs)", " and tokenizer" if tokenizer else "", time.perf_counter() - t0)


def _save_model(model, out: str) -> None:
    """config.json + model.safetensors. (transformers refuses save_pretrained on a model that
    came from a GGUF; the dequantized fp32 weights are what we want anyway.)"""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight: from_pretrained ties it again
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def _write_meta(directory: str, gguf_path: str, key: str) -> None:
    files = {name: os.path.getsize(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
             if os.path.isfile(os.path.join(directory, name))}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump({"source": os.path.abspath(gguf_path), "key": key, "files": files}, f, indent=1)
