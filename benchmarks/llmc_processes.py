"""llmc measured the way a user runs it: whole ``llmc run`` processes in a plain environment.

The in-process Engine row of ``cpu.py`` runs inside the benchmark's tuned process (its own
OpenMP settings, torch already loaded). Issue 13 found the CLI 35-50% slower than that row
because of what the process set up (or failed to) on its own. This row keeps them honest: every
measurement is a fresh ``llmc run -v`` process started with every threading variable removed
from the environment, and the rates are the ones that process reports for itself:

  prefill-N   N-token prompt, ``--max-tokens 1``: prompt tokens / time to the first token
  decode-M    ``--max-tokens M+1``: M / time from the first token to the last

Whole-process wall-clock differences (what issue 13 first used) are recorded too, but start-up
varies by about a second between processes, more than a 512-token prefill takes at 700 tok/s,
so they only serve as a cross-check on slow engines.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from llmc.runtime.threads import POOL_VARIABLES

# Variables a user would not have set: the runtime must reach its speed without them (every
# pool size the runtime itself sets, plus the OpenMP waiting and placement knobs).
THREADING_VARIABLES = POOL_VARIABLES + ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                        "OMP_PROC_BIND", "OMP_PLACES")
SUMMARY = re.compile(r"prompt (\d+) tokens in ([\d.]+)s .*?generated (\d+) tokens in ([\d.]+)s")
BASE_PROMPT = 16


class ProcessRunFailed(RuntimeError):
    pass


def plain_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREADING_VARIABLES}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def llmc_command() -> list[str]:
    exe = shutil.which("llmc")
    return [exe] if exe else [sys.executable, "-m", "llmc.cli"]


class LlmcRunProcesses:
    """Engine-like object for cpu.py: ``measure`` times one task with a pair of processes."""

    name = "llmc-run"
    decodes = True

    def __init__(self, artifact: str, threads: int, detokenize):
        self.artifact = artifact
        self.threads = threads
        self.detokenize = detokenize  # token ids -> prompt text
        self.env = plain_environment()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # a user on this machine passes nothing; --threads only when the run asks for fewer cores
        self.thread_args = [] if threads == cores else ["--threads", str(threads)]
        self.config = {"command": llmc_command() + ["run", artifact, "-v"] + self.thread_args,
                       "environment": f"without {', '.join(THREADING_VARIABLES)}"}

    def warm_up(self, prompt_ids) -> None:
        """One untimed process first: the first start reads the artifact and Python's modules
        from disk, later ones from the page cache (a cold start is seconds slower)."""
        self.run_once(prompt_ids[:BASE_PROMPT], 1)

    def run_once(self, ids, max_tokens: int) -> dict:
        """One ``llmc run`` process: its wall time and the figures of its -v summary line."""
        cmd = llmc_command() + ["run", self.artifact, "--prompt", self.detokenize(ids),
                                "--max-tokens", str(max_tokens), "-v"] + self.thread_args
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise ProcessRunFailed(f"{' '.join(cmd[:3])} exited {proc.returncode}: {proc.stderr[-500:]}")
        m = SUMMARY.search(proc.stderr) or SUMMARY.search(proc.stdout)
        if not m:
            raise ProcessRunFailed("llmc run -v printed no 'prompt N tokens in Xs ... generated M tokens in Ys' line")
        return {"wall_s": wall, "prompt_tokens": int(m.group(1)), "prefill_s": float(m.group(2)),
                "generated": int(m.group(3)), "decode_s": float(m.group(4))}

    def measure(self, task, prompt_ids, meter):
        """(seconds for task['tokens'] tokens, meter reading, None), like cpu.run_task."""
        meter.start()
        if task["kind"] == "prefill":
            r = self.run_once(prompt_ids[:task["prompt"]], 1)
            tokens, seconds = r["prompt_tokens"], r["prefill_s"]
        else:
            r = self.run_once(prompt_ids[:task["prompt"]], task["tokens"] + 1)
            tokens, seconds = r["generated"] - 1, r["decode_s"]
        m = meter.stop()
        m["process"] = r
        if tokens <= 0 or seconds <= 0:
            raise ProcessRunFailed(f"llmc run reported {tokens} tokens in {seconds} s")
        return seconds * task["tokens"] / tokens, m, None  # rate over the tokens that really ran
