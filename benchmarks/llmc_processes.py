"""llmc measured the way a user runs it: whole ``llmc run`` processes in a plain environment.

The in-process Engine row of ``cpu.py`` runs inside the benchmark's tuned process (its own
OpenMP settings, torch already loaded). Issue 13 found the CLI 35-50% slower than that row
because of what the process set up (or failed to) on its own. This row keeps them honest: it
starts ``llmc run`` with every threading variable removed from the environment and derives the
rates from wall-clock differences of whole processes, so start-up, tokenizing, sampling and
anything else that runs in the process is inside the figure:

  prefill-N   (N - n0) / (wall(N-token prompt) - wall(n0-token prompt)), both ``--max-tokens 1``
  decode-M    M / (wall(--max-tokens M+1) - wall(--max-tokens 1)), same prompt

Token counts come from ``llmc run -v``'s own summary line, so a prompt text that re-tokenizes
to a slightly different length, or an early end of sequence, is accounted for.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

# Variables a user would not have set: the runtime must reach its speed without them.
THREADING_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "TVM_NUM_THREADS",
                       "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS",
                       "KMP_BLOCKTIME", "OMP_PROC_BIND", "OMP_PLACES")
SUMMARY = re.compile(r"prompt (\d+) tokens in [\d.]+s .*?generated (\d+) tokens")
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

    def run_once(self, ids, max_tokens: int) -> tuple[float, int, int]:
        """One ``llmc run`` process; returns (wall seconds, prompt tokens, generated tokens)."""
        cmd = llmc_command() + ["run", self.artifact, "--prompt", self.detokenize(ids),
                                "--max-tokens", str(max_tokens), "-v"] + self.thread_args
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise ProcessRunFailed(f"{' '.join(cmd[:3])} exited {proc.returncode}: {proc.stderr[-500:]}")
        m = SUMMARY.search(proc.stderr) or SUMMARY.search(proc.stdout)
        if not m:
            raise ProcessRunFailed("llmc run -v printed no 'prompt N tokens ... generated M tokens' line")
        return wall, int(m.group(1)), int(m.group(2))

    def measure(self, task, prompt_ids, meter):
        """(seconds for task['tokens'] tokens, meter reading, None), like cpu.run_task."""
        meter.start()
        if task["kind"] == "prefill":
            w0, n0, _ = self.run_once(prompt_ids[:BASE_PROMPT], 1)
            w1, n1, _ = self.run_once(prompt_ids[:task["prompt"]], 1)
            tokens = n1 - n0
        else:
            ids = prompt_ids[:task["prompt"]]
            w0, _, g0 = self.run_once(ids, 1)
            w1, _, g1 = self.run_once(ids, task["tokens"] + 1)
            tokens = g1 - g0
        m = meter.stop()
        if tokens <= 0 or w1 <= w0:
            raise ProcessRunFailed(f"no usable difference ({tokens} tokens, {w1 - w0:.3f} s)")
        seconds = (w1 - w0) * task["tokens"] / tokens  # rate over the tokens that really ran
        return seconds, m, None
