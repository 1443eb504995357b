"""artifact.staged: a compile that fails part-way leaves the previous artifact as it was and no
staging directory behind; one that finishes replaces it whole."""

import os

import pytest

from llmc.runtime import artifact


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".llmc-") or n.endswith(".old")]


def test_failed_write_keeps_the_previous_artifact(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text("previous")
    with pytest.raises(RuntimeError, match="kernel build failed"):
        with artifact.staged(str(out)) as stage:
            with open(os.path.join(stage, "manifest.json"), "w") as f:
                f.write("half")
            raise RuntimeError("kernel build failed")
    assert (out / "manifest.json").read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_finished_write_replaces_the_previous_artifact(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    with artifact.staged(str(out)) as stage:
        with open(os.path.join(stage, "manifest.json"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(out)) == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "new"
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o755)
    assert _leftovers(tmp_path) == []
