"""The runtime sizes every thread pool itself (issue 13): a plain process gets one TVM worker per
usable core, not TVM's default of half the hardware threads, and --threads wins over the
environment."""

import os
import subprocess
import sys

from llmc.runtime.threads import usable_cores

PROBE = """
import os, sys
sys.path.insert(0, {repo!r})
from llmc.runtime.threads import configure_threads
n = configure_threads({threads})
import tvm
print(n, tvm.get_global_func("runtime.NumThreads")(), os.environ["OMP_WAIT_POLICY"], os.environ["RAYON_NUM_THREADS"])
"""


def _probe(threads, env):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS") and k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=repo, threads=threads)], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_a_plain_process_uses_every_usable_core():
    count, tvm_threads, policy, rayon = _probe(None, {})
    assert int(count) == int(tvm_threads) == int(rayon) == usable_cores()
    assert policy == "PASSIVE"


def test_threads_overrides_the_environment():
    count, tvm_threads, _, rayon = _probe(1, {"TVM_NUM_THREADS": "7", "RAYON_NUM_THREADS": "7"})
    assert int(count) == int(tvm_threads) == int(rayon) == 1


def test_without_threads_a_user_setting_stays():
    _, tvm_threads, policy, _ = _probe(None, {"TVM_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    assert int(tvm_threads) == 1 and policy == "ACTIVE"
