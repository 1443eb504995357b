"""One benchmark engine in a process of its own, driven over a pipe by ``cpu.py``.

Why: llama.cpp is at its best only with libgomp's default spinning, and spinning threads in the
benchmark's process would steal the two cores from every other engine; and each engine's peak
resident memory is only its own when it has a process to itself. The child builds the engine
with ``cpu.py``'s classes, times each task itself (same code as in-process, ``cpu.run_task``)
and reports its own CPU jiffies, so the parent can tell its work from other processes' when it
drops disturbed measurements.

Protocol: one JSON object per line each way. The parent sends ``{"op": "task", "task": ...,
"ids": [...]}`` (or ``warm_up`` / ``info`` / ``quit``); the child answers ``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _jiffies_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # utime + stime of every thread


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class ProcessEngine:
    """cpu.py's engine interface (``measure``) over a child process."""

    def __init__(self, name: str, spec: dict, env: dict, label: str = ""):
        self.name, self.spec = name, spec
        self.decodes = spec.get("decodes", True)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True, cwd=HERE)
        reply = self._call({"op": "load", "spec": spec})
        self.config = {**reply.get("config", {}), "process": "own", "env_omp_wait_policy": env.get("OMP_WAIT_POLICY")}
        self.label = label

    def _call(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the engine process exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {reply.get('error')}")
        return reply

    def warm_up(self, prompt_ids):
        self._call({"op": "warm_up", "ids": prompt_ids})

    def measure(self, task, prompt_ids, meter):
        """(seconds, meter reading with the child's CPU counted as ours, generated tokens)."""
        j0 = _jiffies_of(self.proc.pid)
        meter.start()
        reply = self._call({"op": "task", "task": task, "ids": prompt_ids})
        m = meter.stop()
        child = _jiffies_of(self.proc.pid) - j0
        m["other_jiffies"] = max(0, m["other_jiffies"] - child)
        m["own_jiffies"] += child
        m["other_cores"] = (m["other_jiffies"] / os.sysconf("SC_CLK_TCK")) / m["wall_s"] if m["wall_s"] > 0 else 0.0
        return reply["seconds"], m, reply.get("generated")

    def peak_rss_mb(self) -> float:
        return _peak_rss_mb(self.proc.pid)

    def close(self):
        if self.proc.poll() is None:
            try:
                self._call({"op": "quit"})
            except Exception:
                pass
            self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------ child side

def _child() -> int:
    sys.path.insert(0, HERE)
    import cpu  # noqa: E402  (its import sets OMP_WAIT_POLICY; the parent's env decides below)

    policy = os.environ.get("LLMC_BENCH_OMP_WAIT_POLICY")
    if policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    elif policy:
        os.environ["OMP_WAIT_POLICY"] = policy
    engine, meter = None, cpu.CpuMeter()
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "load":
                spec = msg["spec"]
                threads = spec["threads"]
                if spec["kind"] == "llamacpp":
                    from llmc.compiler.frontend.hf import resolve_source

                    engine = cpu.LlamaCppEngine(resolve_source(spec.get("source", "smollm2")), threads,
                                                spec["n_ctx"])
                elif spec["kind"] == "hf":
                    import torch

                    from llmc.compiler.frontend.hf import resolve_source

                    torch.set_num_threads(threads)
                    engine = cpu.HFEngine(resolve_source(spec.get("source", "smollm2")), threads)
                else:
                    from llmc.runtime.executor_cpu import keep_torch_out

                    keep_torch_out()  # as `llmc run` does: TVM would import torch (~200 MB) otherwise
                    engine = cpu.LlmcEngine(spec["artifact"], threads)
                reply = {"config": engine.config}
            elif msg["op"] == "warm_up":
                for task in msg.get("tasks", []):
                    cpu.run_task(engine, task, msg["ids"], meter)
                engine.reset()
                engine.prefill(engine.prepare(msg["ids"][:16]))
                reply = {}
            elif msg["op"] == "task":
                seconds, _, gen = cpu.run_task(engine, msg["task"], msg["ids"], meter)
                reply = {"seconds": seconds, "generated": gen}
            elif msg["op"] == "quit":
                print(json.dumps({"ok": True}), flush=True)
                return 0
            else:
                raise ValueError(f"unknown op {msg['op']}")
            print(json.dumps({"ok": True, **reply}), flush=True)
        except Exception as exc:  # the parent reports it and carries on with the other engines
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


if __name__ == "__main__" and "--child" in sys.argv:
    sys.exit(_child())
