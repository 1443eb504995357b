"""The compiled artifact's format, shared by the compiler's writer and the runtime's loader.

An artifact is one directory:

    manifest.json      format version, llmc version, model config, target, CPU, dtypes,
                       kernel list, execution plan, KV cache geometry, sha256 of every file
    weights.safetensors  the weights, in the layouts the kernels read
    kernels/step.so    the compiled step (all kernels plus the code that calls them in order)
    tokenizer.json     the tokenizer (HF tokenizers format), plus the chat template in the manifest

The loader refuses an artifact whose format version, target, CPU features or checksums do not
match, with a message that says what to do. Nothing here imports the compiler or transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

FORMAT_VERSION = 3  # 3: the paged, batched step (block pools, block tables); 2: transposed key cache
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER = "tokenizer.json"
STEP_LIBRARY = "kernels/step.so"


class ArtifactError(Exception):
    """The artifact cannot be used; the message says why and what to do."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def checksums(root: str, files: list[str]) -> dict[str, str]:
    return {name: sha256_file(os.path.join(root, name)) for name in files}


@dataclass
class Manifest:
    """The parsed manifest; ``data`` is the JSON object as written."""

    root: str
    data: dict[str, Any]

    @property
    def target(self) -> dict[str, Any]:
        return self.data["target"]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def kv_cache(self) -> dict[str, Any]:
        return self.data["kv_cache"]

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)


def write_manifest(root: str, data: dict[str, Any]) -> None:
    data = dict(data, format_version=FORMAT_VERSION)
    files = sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, fs in os.walk(root) for f in fs if f != MANIFEST
    )
    data["files"] = checksums(root, files)
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


@contextlib.contextmanager
def staged(out_dir: str):
    """A fresh staging directory beside ``out_dir``: published as ``out_dir`` when the block ends,
    removed when it raises, so a failed compile leaves an existing artifact untouched."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".llmc-", dir=parent)
    os.chmod(stage, 0o755)
    try:
        yield stage
        publish(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish(stage: str, out_dir: str) -> None:
    """Move a finished staging directory to ``out_dir``, replacing an older artifact there only
    once the new one is complete (a failed compile never leaves half an artifact)."""
    if os.path.exists(out_dir):
        backup = out_dir.rstrip("/") + ".old"
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out_dir, backup)
        os.replace(stage, out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(stage, out_dir)


def read_manifest(root: str, verify_checksums: bool = True) -> Manifest:
    """Read and validate an artifact's manifest (format version, files, checksums)."""
    if not os.path.isdir(root):
        raise ArtifactError(f"{root} is not an artifact directory; build one with "
                            f"`llmc compile MODEL --target cpu -o {root}`")
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise ArtifactError(f"{root} has no {MANIFEST}: it is not an llmc artifact, or its build was "
                            f"interrupted; compile it again")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is corrupt, compile it again") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{root} has artifact format version {version}, but this runtime reads version "
                            f"{FORMAT_VERSION}; recompile the model with this llmc (`llmc compile ...`) "
                            f"or use the llmc version that built it ({data.get('llmc_version', 'unknown')})")
    for name, digest in data.get("files", {}).items():
        file = os.path.join(root, name)
        if not os.path.exists(file):
            raise ArtifactError(f"{root} is missing {name}; the artifact is incomplete, compile it again")
        if verify_checksums and sha256_file(file) != digest:
            raise ArtifactError(f"{name} in {root} does not match its checksum in {MANIFEST}: the file is "
                                f"corrupt or was modified; compile the model again")
    return Manifest(root, data)


def check_target(manifest: Manifest, runtime_target: str, cpu_flags: Optional[set[str]] = None) -> None:
    """Refuse an artifact built for another target or for CPU features this machine lacks."""
    target = manifest.target
    if target.get("kind") != runtime_target:
        raise ArtifactError(f"{manifest.root} was compiled for target '{target.get('kind')}', but this runtime "
                            f"executes '{runtime_target}'; compile with `--target {runtime_target}`")
    from .cpu_features import host_arch

    arch = target.get("arch", "x86_64")  # artifacts before the arch field were all x86-64
    if runtime_target == "cpu" and arch != host_arch():
        raise ArtifactError(f"{manifest.root} was compiled for {arch} (--mcpu {target.get('mcpu')}), but this "
                            f"machine is {host_arch()}; copy it to an {arch} machine, or compile for this one "
                            f"(`llmc compile MODEL --target cpu` without --mcpu)")
    required = set(target.get("required_cpu_features", []))
    if cpu_flags is not None and required - cpu_flags:
        missing = ", ".join(sorted(required - cpu_flags))
        raise ArtifactError(f"{manifest.root} was compiled for CPU '{target.get('mcpu')}' and needs CPU features "
                            f"this machine lacks ({missing}); recompile on this machine or with "
                            f"`--mcpu` naming a CPU this machine is compatible with")
