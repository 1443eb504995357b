#!/usr/bin/env python3
"""CPU benchmark: llmc against HF transformers and llama.cpp on the bundled SmolLM2-135M GGUF.

Measures, in one run and with the same thread count for every engine:

  prefill-128, prefill-512   tokens/s of one step over a 128- / 512-token prompt, empty cache
  decode-128                 tokens/s of 128 greedy one-token steps after a 128-token prompt
                             (only the decode steps are timed)

Engines: ``hf`` (transformers fp32 eager; also the ``logits_to_keep=1`` variant, labelled
separately), ``llamacpp`` (llama-cpp-python, optional: ``pip install -e .[bench]``) and
``llmc`` (``llmc.runtime.Engine`` over a compiled artifact).

Method (see benchmarks/README.md): OMP_WAIT_POLICY=PASSIVE, fixed threads, a warm-up per
engine, engines interleaved per repetition, a bounded wait for an idle machine before each
measurement, measurements during which other processes used CPU (from /proc/stat) dropped,
medians, ratios only between engines measured in this run.

    python benchmarks/cpu.py                           # all engines, 5 repetitions
    python benchmarks/cpu.py --engines hf,llamacpp --quick

Issue 10's comparison in one command (each engine in a process of its own: llama.cpp spinning
as at its best, HF fp32 eager, llmc's host build and its x86-64-v3 build of the Q4_1 GGUF;
artifact sizes, peak RSS and the per-kernel profiles of both llmc builds):

    llmc compile smollm2 -o out/smollm2-q41 && llmc compile smollm2 --mcpu x86-64-v3 -o out/smollm2-q41-v3
    python benchmarks/cpu.py --engines hf,llamacpp,llmc --artifact out/smollm2-q41 \
        --artifact out/smollm2-q41-v3 --repeats 3 --profile

Another GGUF of the model (e.g. the bundled file requantized to Q4_K_M, see
benchmarks/kquant.py): ``--gguf FILE`` makes llama.cpp and HF load that file; give
``--artifact`` an llmc build of the same file.

    llmc compile /tmp/kquant/SmolLM2-135M-Instruct.Q4_K_M.gguf -o out/smollm2-q4km
    python benchmarks/cpu.py --engines llamacpp,llmc --gguf /tmp/kquant/SmolLM2-135M-Instruct.Q4_K_M.gguf \
        --artifact out/smollm2-q4km --repeats 3
"""

import os

# Before torch or llama_cpp are imported (both use OpenMP, whose default spin-waiting makes
# idle worker threads burn the shared cores).
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import datetime
import gc
import hashlib
import importlib.metadata
import inspect
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARTIFACT = "out/smollm2-cpu"
BUILD_HINT = "llmc compile smollm2 --target cpu -o out/smollm2-cpu"
LLAMACPP_MISSING = "not installed (pip install -e .[bench])"

ENGINE_ORDER = ["hf", "hf-keep1", "llamacpp", "llmc", "llmc-run"]
ENGINE_LABELS = {
    "hf": "HF fp32 eager",
    "hf-keep1": "HF keep1",
    "llamacpp": "llama.cpp",
    "llmc": "llmc",
    "llmc-run": "llmc run (plain env)",
}

# A fixed English text; its token ids (truncated to each length) are the prompts.
PROMPT_TEXT = """\
The lighthouse on the northern cape was built in the spring of a year that nobody in the village
could later agree upon. Some said it was the year of the great storm, when the harbour wall broke
and three fishing boats were carried half a mile inland; others insisted that the storm came
afterwards, and that the light had already been burning for a whole winter when the sea rose.
What everyone agreed on was the keeper. He arrived on the weekly coach with a wooden trunk, a
crate of books and a small brass telescope, and he walked the four miles from the crossroads to
the cape without asking anyone the way.

He was a patient man who kept careful records. Every evening at dusk he climbed the hundred and
twelve steps of the tower, trimmed the wicks, polished the great lens with a soft cloth and wrote
the time of lighting in a ledger bound in green leather. Every morning he wrote the time at which
he put the light out, the direction and strength of the wind, the state of the sea, and the names
of any ships that had passed close enough to be read through the telescope. Over the years the
ledgers filled a shelf, then a second shelf, and then most of the small room at the foot of the
tower where he slept.

Children from the village sometimes walked out to the cape on summer afternoons. He let them climb
the stairs and look through the lens, which turned the distant islands upside down and made the
gulls on the rocks look as large as geese. He explained how the light was focused into a beam, how
the clockwork turned the lens so that the beam swept the water once every twenty seconds, and how
a captain far out at sea could count the seconds between flashes and know, without any other sign,
exactly which lighthouse he was looking at. Each light along the coast had its own rhythm, he told
them, the way each bird has its own song.

In autumn the work grew harder. The winds came from the west and carried salt spray as high as the
lantern room, and the glass had to be cleaned twice a night. Fog rolled in from the sea without
warning, and then the keeper wound the mechanism of the fog bell and listened, between its strokes,
for the horns of ships feeling their way along the channel. On the worst nights he did not sleep at
all. He sat by the lamp with a pot of tea and a book, and every quarter of an hour he went out onto
the gallery to check that the beam was still turning and that no ice had formed on the panes.

The village changed slowly around him. The harbour wall was rebuilt in stone, a railway line reached
the next town along the coast, and the fishing boats were fitted with engines that could be heard
long before their lights were seen. A telegraph cable was laid across the bay, and news that once
took a week to arrive now came in an afternoon. Through all of it the light turned at the same pace,
and the ledgers recorded the same careful columns of figures: the hour, the wind, the sea, the ships.

When the keeper finally retired, the harbour master asked him what he would miss most. He thought
about it for a long time before answering. It was not the view, he said, although the view was very
fine, nor the quiet, although he had grown used to it. It was the feeling, every evening, of
striking a match in the dark and knowing that somewhere out on the water a stranger would see the
light and understand, without a word being spoken, where the rocks were and which way lay home.

His ledgers were taken to the library in the county town, where they fill three long shelves in a
room that few people visit. Historians of the weather have studied them, and so have engineers who
wanted to know how often the channel was closed by fog, and once a novelist spent a whole winter
reading them from the first page to the last. She said afterwards that they were the most honest
book she had ever read, because the man who wrote them had never once imagined that anyone would.
"""


# ------------------------------------------------------------------------------------------
# CPU accounting from /proc

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
SLACK_JIFFIES = 2  # /proc/stat and /proc/self/stat are sampled separately: allow rounding


def _machine_busy_jiffies():
    """Busy jiffies of the whole machine (all CPUs), from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    fields += [0] * (8 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    # guest time is already inside user/nice; steal is CPU taken by other VMs: count it busy.
    return user + nice + system + irq + softirq + steal


def _own_jiffies():
    """utime + stime of this process (all its threads) and of its waited-for children (the
    ``llmc run`` processes of the llmc-run row), from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        text = f.read()
    rest = text[text.rindex(")") + 2:].split()  # rest[0] is field 3 (state)
    return sum(int(x) for x in rest[11:15])  # fields 14-17: utime, stime, cutime, cstime


class CpuMeter:
    """Other processes' CPU use over an interval: machine busy jiffies minus our own."""

    def start(self):
        self.busy0 = _machine_busy_jiffies()
        self.own0 = _own_jiffies()
        self.t0 = time.perf_counter()

    def stop(self):
        wall = time.perf_counter() - self.t0
        own = _own_jiffies() - self.own0
        busy = _machine_busy_jiffies() - self.busy0
        other = max(0, busy - own)
        return {
            "wall_s": wall,
            "own_jiffies": own,
            "other_jiffies": other,
            "other_cores": (other / CLK_TCK) / wall if wall > 0 else 0.0,
        }


def is_disturbed(other_jiffies, wall_s, max_other_cores):
    """True when other processes used more than max_other_cores on average over wall_s."""
    allowed = max(SLACK_JIFFIES, max_other_cores * wall_s * CLK_TCK)
    return other_jiffies > allowed


def wait_idle(max_wait_s, max_other_cores, window_s=0.25):
    """Wait (at most max_wait_s) for a window in which other processes were quiet.

    Returns (seconds waited, whether an idle window was seen)."""
    t0 = time.perf_counter()
    meter = CpuMeter()
    while True:
        meter.start()
        time.sleep(window_s)
        m = meter.stop()
        if not is_disturbed(m["other_jiffies"], m["wall_s"], max_other_cores):
            return time.perf_counter() - t0, True
        if time.perf_counter() - t0 >= max_wait_s:
            return time.perf_counter() - t0, False


# ------------------------------------------------------------------------------------------
# Engines. Each one: reset() empties the cache (untimed); prefill(x) runs one step over a
# prepared prompt (timed); start_decode(ids) resets, prefills and returns the first greedy
# token (untimed); decode_step(tok) feeds one token and returns the next greedy one (timed).


class EngineUnavailable(Exception):
    pass


class HFEngine:
    name = "hf"
    decodes = True

    def __init__(self, src, threads, logits_to_keep=None, model=None):
        import torch

        self.torch = torch
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                src.path, gguf_file=src.gguf_file, dtype=torch.float32,
                attn_implementation="eager").eval()
        self.model = model
        self.has_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefill_kwargs = {}
        if logits_to_keep is not None:
            if not self.has_keep:
                raise EngineUnavailable("this transformers has no logits_to_keep argument")
            self.prefill_kwargs["logits_to_keep"] = logits_to_keep
        self.config = {"dtype": "float32", "attn_implementation": "eager",
                       "torch_threads": torch.get_num_threads(), **self.prefill_kwargs}
        self.pkv = None

    def prepare(self, ids):
        return self.torch.tensor([ids], dtype=self.torch.long)

    def reset(self):
        self.pkv = None

    def prefill(self, x):
        with self.torch.inference_mode():
            return self.model(input_ids=x, use_cache=True, **self.prefill_kwargs)

    def start_decode(self, ids):
        self.reset()
        kw = {"logits_to_keep": 1} if self.has_keep else {}
        with self.torch.inference_mode():
            out = self.model(input_ids=self.prepare(ids), use_cache=True, **kw)
        self.pkv = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def decode_step(self, tok):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[tok]], dtype=torch.long),
                             past_key_values=self.pkv, use_cache=True)
        self.pkv = out.past_key_values
        return int(out.logits[0, -1].argmax())


class HFKeep1Engine(HFEngine):
    """The same model, prefill computing logits for the last row only."""

    name = "hf-keep1"
    decodes = False  # a one-token decode step is the same computation as "hf"

    def __init__(self, src, threads, model):
        super().__init__(src, threads, logits_to_keep=1, model=model)


class LlamaCppEngine:
    name = "llamacpp"
    decodes = True

    def __init__(self, src, threads, n_ctx):
        try:
            import llama_cpp
        except ImportError as exc:
            raise EngineUnavailable(LLAMACPP_MISSING) from exc
        import numpy as np

        self.np = np
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=os.path.join(src.path, src.gguf_file), n_ctx=n_ctx, n_threads=threads,
            n_threads_batch=threads, n_batch=512, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.config = {"n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads,
                       "n_batch": 512, "logits_all": False}

    def prepare(self, ids):
        return list(ids)

    def reset(self):
        self.llm.reset()

    def prefill(self, x):
        self.llm.eval(x)

    def _greedy(self):
        # logits_all=False: llama.cpp keeps the last token's logits only; Llama.scores is not
        # filled then, so read them from the context.
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def start_decode(self, ids):
        self.reset()
        self.llm.eval(list(ids))
        return self._greedy()

    def decode_step(self, tok):
        self.llm.eval([tok])
        return self._greedy()


class LlmcEngine:
    name = "llmc"
    decodes = True

    def __init__(self, artifact, threads):
        try:
            from llmc.runtime import Engine
        except ImportError as exc:
            raise EngineUnavailable(f"llmc.runtime.Engine not importable ({exc})") from exc
        import numpy as np

        self.np = np
        self.eng = Engine.load(artifact, threads=threads)
        self.config = {"artifact": os.path.abspath(artifact), "threads": threads,
                       "quant": self.eng.manifest.model.get("quant", "none")}  # gguf = the GGUF's own blocks

    def prepare(self, ids):
        return self.np.asarray(ids, dtype=self.np.int64)

    def reset(self):
        self.eng.reset()

    def prefill(self, x):
        return self.eng.step(x)

    def start_decode(self, ids):
        self.reset()
        return int(self.np.argmax(self.eng.step(self.prepare(ids))))

    def decode_step(self, tok):
        return int(self.np.argmax(self.eng.step(self.np.array([tok], dtype=self.np.int64))))


# ------------------------------------------------------------------------------------------
# Tasks and measurement


def make_tasks(prefill_lengths, decode_prompt, decode_tokens):
    tasks = [{"name": f"prefill-{n}", "kind": "prefill", "prompt": n, "tokens": n}
             for n in prefill_lengths]
    tasks.append({"name": f"decode-{decode_tokens}", "kind": "decode", "prompt": decode_prompt,
                  "tokens": decode_tokens})
    return tasks


def run_task(engine, task, prompt_ids, meter):
    """One measurement; returns (seconds, meter reading, generated tokens or None)."""
    if hasattr(engine, "measure"):  # whole processes, timed by the engine itself
        return engine.measure(task, prompt_ids, meter)
    ids = prompt_ids[: task["prompt"]]
    gc.collect()
    if task["kind"] == "prefill":
        x = engine.prepare(ids)
        engine.reset()
        meter.start()
        t0 = time.perf_counter()
        kept_alive = [engine.prefill(x)]  # the output is freed after the clock stops
        seconds = time.perf_counter() - t0
        m = meter.stop()
        kept_alive.clear()
        return seconds, m, None
    tok = engine.start_decode(ids)
    generated = [tok]
    step = engine.decode_step
    meter.start()
    t0 = time.perf_counter()
    for _ in range(task["tokens"]):
        tok = step(tok)
        generated.append(tok)
    seconds = time.perf_counter() - t0
    m = meter.stop()
    return seconds, m, generated


def engine_supports(engine, task):
    return task["kind"] == "prefill" or engine.decodes


def make_detokenizer(src):
    """Token ids -> text, for the llmc-run row's --prompt (the tokenizer of the GGUF itself)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    return lambda ids: tok.decode(list(ids))


def tokenize_prompt(src, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    ids = tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    base = list(ids)
    while len(ids) < n:  # only for lengths beyond the text: repeat it
        ids = ids + base
    return [int(i) for i in ids[:n]], len(base)


# ------------------------------------------------------------------------------------------
# Reporting


def versions():
    out = {"python": platform.python_version()}
    for key, dist in [("torch", "torch"), ("transformers", "transformers"),
                      ("llama_cpp", "llama-cpp-python"), ("tvm", "apache-tvm"),
                      ("llmc", "llmc"), ("numpy", "numpy"), ("gguf", "gguf")]:
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    if out["tvm"] is None:  # a source build of TVM has no apache-tvm distribution
        try:
            import tvm  # noqa: F401

            out["tvm"] = getattr(tvm, "__version__", "importable, version unknown")
        except Exception:
            pass
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        out["llmc_git"] = rev + ("-dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        out["llmc_git"] = None
    return out


def machine(threads):
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"cpu_model": model, "cores": NCPU, "cores_available": affinity, "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "kernel": platform.release(), "clk_tck": CLK_TCK}


def omp_settings():
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    spin = os.environ.get("GOMP_SPINCOUNT")
    return f"OMP_WAIT_POLICY={policy}" + (f", GOMP_SPINCOUNT={spin}" if spin is not None else "")


def summarize(runs):
    kept = [r for r in runs if r["kept"]]
    use = kept if kept else runs
    if not use:
        return None
    tok_s = statistics.median(r["tok_s"] for r in use)
    return {"median_tok_s": tok_s, "median_seconds": statistics.median(r["seconds"] for r in use),
            "kept": len(kept), "dropped": len(runs) - len(kept), "runs": len(runs),
            "all_disturbed": not kept}


def fmt_rate(s):
    if s is None:
        return "-"
    return f"{s['median_tok_s']:.1f}" + ("!" if s["all_disturbed"] else "")


def print_table(rows, columns):
    widths = [max(len(str(r[i])) for r in [columns] + rows) for i in range(len(columns))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    print(line(columns))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


# ------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="hf,llamacpp,llmc",
                   help="comma-separated subset of hf,llamacpp,llmc (hf also records its "
                        "logits_to_keep=1 prefill variant); default all")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions per measurement (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repetition, prompts 32/64, 16 decode tokens")
    p.add_argument("--artifact", action="append", default=None,
                   help=f"llmc artifact directory; repeat for several llmc rows, e.g. a host build and an "
                        f"--mcpu x86-64-v3 build (default {DEFAULT_ARTIFACT})")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="the GGUF llama.cpp and HF load (default: the bundled SmolLM2 Q4_1); llmc runs "
                        "--artifact, so build that from the same file")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run hf, llamacpp and each llmc artifact in a process of its own (default; llama.cpp "
                        "then spins as at its best without stealing the others' cores, and each engine's "
                        "peak RSS is its own); --no-isolate runs them in this process")
    p.add_argument("--profile", action="store_true",
                   help="also print and record a per-kernel profile of each llmc artifact's 512-token "
                        "prefill and decode step (benchmarks/kernel_profile.py)")
    p.add_argument("--json", default=None,
                   help="where to write the results (default benchmarks/results/cpu.json, "
                        "cpu-quick.json with --quick)")
    p.add_argument("--max-other-cpu", type=float, default=0.10,
                   help="drop a measurement when other processes used more than this many "
                        "cores on average during it (default 0.10)")
    p.add_argument("--idle-wait", type=float, default=5.0,
                   help="wait at most this many seconds for an idle machine before each "
                        "measurement (default 5)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "unset"],
                   help="OMP_WAIT_POLICY for torch and llama.cpp (default PASSIVE; 'unset' leaves "
                        "libgomp's default: spin ~3 ms, then sleep); see benchmarks/README.md")
    p.add_argument("--gomp-spincount", type=int, default=None,
                   help="set GOMP_SPINCOUNT (libgomp's spins before a waiting thread sleeps; it "
                        "overrides the wait policy's spin count); default: not set")
    p.add_argument("--max-extra-rounds", type=int, default=None,
                   help="extra rounds, for the measurements short of --repeats undisturbed "
                        "ones (default: --repeats; 0 disables)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.prefill, args.decode_prompt, args.decode_tokens = [32, 64], 32, 16
    else:
        args.prefill, args.decode_prompt, args.decode_tokens = [128, 512], 128, 128
    if args.max_extra_rounds is None:
        args.max_extra_rounds = args.repeats
    if args.json is None:
        name = "cpu-quick.json" if args.quick else "cpu.json"
        args.json = os.path.join(REPO, "benchmarks", "results", name)
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in wanted if e not in ("hf", "llamacpp", "llmc", "llmc-run")]
    if bad or not wanted:
        p.error(f"--engines takes a comma-separated subset of hf,llamacpp,llmc,llmc-run (got {args.engines!r})")
    args.engine_list = wanted
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be at least 1")
    if args.gguf is not None:
        if not (args.gguf.endswith(".gguf") and os.path.isfile(args.gguf)):
            p.error(f"--gguf {args.gguf}: not a .gguf file")
        args.gguf = os.path.abspath(args.gguf)
    return args


def llmc_label(artifact):
    """``llmc <quant> [int8-dot] <mcpu>`` from an artifact's manifest (int8-dot: the quantized
    linears run on integer dot products with int8 activations)."""
    try:
        with open(os.path.join(artifact, "manifest.json")) as f:
            m = json.load(f)
        layouts = {w.get("layout", "") for w in m["plan"]["weights"].values()}
        kernels = " int8-dot" if any(lay.startswith("intdot") for lay in layouts) else ""
        cpu = m["target"].get("mcpu", "?") + "".join(m["target"].get("mattr", []))
        return f"llmc {m['model'].get('quant', 'none')}{kernels} {cpu}"
    except (OSError, ValueError, KeyError):
        return f"llmc {os.path.basename(artifact.rstrip('/'))}"


def warn_other_source(artifact, model_spec, gguf_path):
    """Say so when an artifact was built from another model than llama.cpp and HF load."""
    try:
        with open(os.path.join(artifact, "manifest.json")) as f:
            source = json.load(f)["model"].get("source", "")
    except (OSError, ValueError, KeyError):
        return
    same = source == model_spec or (source.endswith(".gguf") and os.path.isfile(source)
                                    and os.path.samefile(source, gguf_path))
    if source and not same:
        print(f"warning: {artifact} was built from {source}, llama.cpp and HF load {gguf_path} "
              f"(--gguf picks their file)")


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def profiles(args, artifacts, threads):
    """Per-kernel profiles of each llmc artifact (benchmarks/kernel_profile.py, own process)."""
    if not args.profile:
        return None
    out = {}
    for art in artifacts:
        if not os.path.isdir(art):
            continue
        tmp = os.path.join(os.path.dirname(os.path.abspath(args.json)), f".profile-{os.getpid()}.json")
        r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_profile.py"), art,
                            "--threads", str(threads), "--json", tmp], capture_output=True, text=True)
        print(f"\nper-kernel profile of {llmc_label(art)} ({art}):")
        print(r.stdout or r.stderr[-2000:])
        if r.returncode == 0 and os.path.exists(tmp):
            with open(tmp) as f:
                out[art] = {"label": llmc_label(art), "profile": json.load(f), "text": r.stdout}
            os.remove(tmp)
    return out


def resolve_artifact(path):
    if os.path.isdir(path) or os.path.isabs(path):
        return path
    in_repo = os.path.join(REPO, path)
    return in_repo if os.path.isdir(in_repo) else path


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t = args.threads
    # OpenMP reads these once, when the runtime loads: torch and llama_cpp are imported below.
    if "torch" in sys.modules or "llama_cpp" in sys.modules:
        print("warning: torch or llama_cpp was imported before benchmarks/cpu.py set the OpenMP "
              "environment; run it as a script for the settings to apply", file=sys.stderr)
    if args.omp_wait_policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.gomp_spincount is not None:
        os.environ["GOMP_SPINCOUNT"] = str(args.gomp_spincount)
    os.environ.setdefault("OMP_NUM_THREADS", str(t))

    import torch

    torch.set_num_threads(t)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from llmc.compiler.frontend.hf import resolve_source

    model_spec = args.gguf or "smollm2"
    src = resolve_source(model_spec)
    gguf_path = os.path.join(src.path, src.gguf_file)
    tasks = make_tasks(args.prefill, args.decode_prompt, args.decode_tokens)
    n_prompt = max(t_["prompt"] for t_ in tasks)
    n_ctx = max(1024, args.decode_prompt + args.decode_tokens + 8, max(args.prefill) + 8)

    print(f"model: {gguf_path}")
    print(f"threads: {t}, {omp_settings()}, repeats: {args.repeats}"
          f", drop when other processes use > {args.max_other_cpu} cores")
    prompt_ids, text_tokens = tokenize_prompt(src, n_prompt)

    # ---- load and warm up
    engines, status, load_info = [], {}, {}
    hf_model = None
    artifacts = args.artifact or [DEFAULT_ARTIFACT]
    wanted = []
    for name in args.engine_list:
        if name == "llmc":  # one row per artifact: llmc, llmc-2, ...
            wanted += [("llmc" if i == 0 else f"llmc-{i + 1}", "llmc", a) for i, a in enumerate(artifacts)]
        else:
            wanted.append((name, name, artifacts[0]))
    for name, kind, art in wanted:
        t0 = time.perf_counter()
        try:
            if kind in ("llmc", "llmc-run"):
                artifact = resolve_artifact(art)
                if not os.path.isdir(artifact):
                    print(f"llmc: artifact {art} not found; build it with:\n"
                          f"    {BUILD_HINT}\n  (or pass --artifact DIR); skipping llmc")
                    raise EngineUnavailable(f"no artifact ({BUILD_HINT})")
                if kind == "llmc":
                    ENGINE_LABELS[name] = llmc_label(artifact)
                    warn_other_source(artifact, model_spec, gguf_path)
                    if name not in ENGINE_ORDER:
                        ENGINE_ORDER.insert(ENGINE_ORDER.index("llmc-run"), name)
            if args.isolate and kind in ("hf", "llamacpp", "llmc"):
                from engine_process import ProcessEngine

                env = dict(os.environ)
                # llama.cpp at its best: libgomp's default spinning (it has the cores to itself
                # while it runs); torch keeps the benchmark's policy
                env["LLMC_BENCH_OMP_WAIT_POLICY"] = "unset" if kind == "llamacpp" else args.omp_wait_policy
                if kind == "llamacpp":
                    try:
                        import importlib.util

                        if importlib.util.find_spec("llama_cpp") is None:
                            raise ImportError
                    except ImportError as exc:
                        raise EngineUnavailable(LLAMACPP_MISSING) from exc
                spec = {"kind": kind, "threads": t, "n_ctx": n_ctx, "source": model_spec,
                        "artifact": resolve_artifact(art) if kind == "llmc" else None}
                eng = ProcessEngine(name, spec, env)
                made = [eng]
            elif kind == "hf":
                eng = HFEngine(src, t)
                hf_model = eng.model
                made = [eng]
                try:
                    made.append(HFKeep1Engine(src, t, hf_model))
                except EngineUnavailable as exc:
                    status["hf-keep1"] = str(exc)
            elif kind == "llamacpp":
                made = [LlamaCppEngine(src, t, n_ctx)]
            elif kind == "llmc-run":
                from llmc_processes import LlmcRunProcesses

                made = [LlmcRunProcesses(resolve_artifact(art), t, make_detokenizer(src))]
            else:
                made = [LlmcEngine(resolve_artifact(art), t)]
                made[0].name = name
        except EngineUnavailable as exc:
            status[name] = str(exc)
            print(f"{name}: {exc}")
            continue
        except Exception as exc:  # an engine that fails to load must not stop the others
            status[name] = f"load failed: {type(exc).__name__}: {exc}"
            print(f"{name}: load failed:")
            traceback.print_exc()
            continue
        load_s = time.perf_counter() - t0
        for eng in made:
            status[eng.name] = "ok"
            load_info[eng.name] = {"load_s": load_s, "config": eng.config}
            if kind == "llmc":
                load_info[eng.name]["artifact_bytes"] = dir_bytes(resolve_artifact(art))
            if kind == "llamacpp":
                load_info[eng.name]["artifact_bytes"] = os.path.getsize(gguf_path)
            engines.append(eng)
        print(f"{name}: loaded in {load_s:.1f} s")

    meter = CpuMeter()
    greedy = {}
    for eng in list(engines):
        t0 = time.perf_counter()
        try:
            if hasattr(eng, "warm_up"):
                eng.warm_up(prompt_ids)
            for task in tasks:
                if engine_supports(eng, task):
                    _, _, gen = run_task(eng, task, prompt_ids, meter)
                    if gen is not None:
                        greedy[eng.name] = gen
        except Exception as exc:
            status[eng.name] = f"failed in warm-up: {type(exc).__name__}: {exc}"
            print(f"{eng.name}: failed in warm-up:")
            traceback.print_exc()
            engines.remove(eng)
            continue
        load_info[eng.name]["warmup_s"] = time.perf_counter() - t0
        print(f"{eng.name}: warmed up in {time.perf_counter() - t0:.1f} s")
    engines.sort(key=lambda e: ENGINE_ORDER.index(e.name))
    for e in engines:  # the tasks ran once in warm-up: peak memory of a loaded, used engine
        if hasattr(e, "peak_rss_mb"):
            load_info[e.name]["peak_rss_mb"] = round(e.peak_rss_mb(), 1)

    # ---- measure: rounds, engines interleaved per task, order rotated per round
    runs = {e.name: {task["name"]: [] for task in tasks if engine_supports(e, task)} for e in engines}

    def kept_count(e, task):
        return sum(r["kept"] for r in runs[e.name][task["name"]])

    total_rounds = args.repeats + args.max_extra_rounds
    t_start = time.perf_counter()
    for rnd in range(total_rounds):
        extra = rnd >= args.repeats
        if extra and all(kept_count(e, task) >= args.repeats
                         for e in engines for task in tasks if engine_supports(e, task)):
            break
        k = rnd % max(1, len(engines))
        order = engines[k:] + engines[:k]
        for task in tasks:
            for eng in order:
                if not engine_supports(eng, task):
                    continue
                if extra and kept_count(eng, task) >= args.repeats:
                    continue
                waited, idle = wait_idle(args.idle_wait, args.max_other_cpu)
                try:
                    seconds, m, _ = run_task(eng, task, prompt_ids, meter)
                except Exception as exc:
                    print(f"{eng.name}: {task['name']} failed: {type(exc).__name__}: {exc}")
                    continue
                disturbed = is_disturbed(m["other_jiffies"], m["wall_s"], args.max_other_cpu)
                rec = {"round": rnd + 1, "seconds": seconds, "tok_s": task["tokens"] / seconds,
                       "other_cores": round(m["other_cores"], 4),
                       "other_jiffies": m["other_jiffies"], "own_jiffies": m["own_jiffies"],
                       **({"process": m["process"]} if "process" in m else {}),
                       "idle_wait_s": round(waited, 3), "idle_before": idle,
                       "kept": not disturbed}
                runs[eng.name][task["name"]].append(rec)
                print(f"  round {rnd + 1}{' (extra)' if extra else ''} {task['name']:>12} "
                      f"{eng.name:>9}: {rec['tok_s']:8.1f} tok/s   other CPU "
                      f"{m['other_cores']:.2f} cores{'  DROPPED' if disturbed else ''}", flush=True)
    measure_s = time.perf_counter() - t_start

    # ---- summarize
    summary = {e: {task: summarize(r) for task, r in per.items()} for e, per in runs.items()}
    llmcs = [e for e in ENGINE_ORDER if e == "llmc" or e.startswith("llmc-") and e != "llmc-run"]
    ratio_pairs = [(f"{x}/{d}", x, d) for x in llmcs for d in ("hf", "hf-keep1", "llamacpp")]
    ratio_pairs.append(("llmc run/llmc", "llmc-run", "llmc"))
    ratios = {}
    for key, num, den in ratio_pairs:
        if num not in summary or den not in summary:
            continue
        ratios[key] = {}
        for task in tasks:
            a, b = summary[num].get(task["name"]), summary[den].get(task["name"])
            if a and b:
                ratios[key][task["name"]] = {
                    "ratio": a["median_tok_s"] / b["median_tok_s"],
                    "from_disturbed": a["all_disturbed"] or b["all_disturbed"]}

    # ---- table
    shown = [e for e in ENGINE_ORDER if e in status]
    if "llamacpp" not in shown and "llamacpp" in args.engine_list:
        shown.append("llamacpp")
    short = {"hf": "HF", "hf-keep1": "HF keep1", "llamacpp": "llama.cpp"}
    ratio_cols = [(f"{x}/{d}", f"{x}/{short[d]}") for x in llmcs for d in ("hf", "hf-keep1", "llamacpp")]
    ratio_cols.append(("llmc run/llmc", "llmc run/llmc"))
    ratio_cols = [(k, label) for k, label in ratio_cols if k in ratios]
    cols = ["tok/s"] + [ENGINE_LABELS[e] for e in shown] + [label for _, label in ratio_cols]
    rows, kept_rows = [], []
    for task in tasks:
        label = task["name"] if task["kind"] == "prefill" else \
            f"{task['name']} (after {task['prompt']})"
        row, krow = [label], [label]
        for e in shown:
            if status.get(e) != "ok":
                row.append(status.get(e, "-"))
                krow.append("-")
                continue
            s = summary[e].get(task["name"])
            row.append(fmt_rate(s))
            krow.append(f"{s['kept']}/{s['runs']}" if s else "-")
        for key, _ in ratio_cols:
            r = ratios.get(key, {}).get(task["name"])
            row.append("-" if r is None else f"{r['ratio']:.2f}" + ("!" if r["from_disturbed"] else ""))
        rows.append(row)
        kept_rows.append(krow)

    print()
    cpu = machine(t)
    print(f"{src.gguf_file}, {cpu['cpu_model']}, {t} threads, "
          f"{omp_settings()}, median tok/s over undisturbed repetitions")
    print_table(rows, cols)
    print()
    print("repetitions kept/run (dropped = other processes used CPU during the measurement):")
    print_table(kept_rows, ["kept/run"] + [ENGINE_LABELS[e] for e in shown])
    total_dropped = sum(s["dropped"] for per in summary.values() for s in per.values() if s)
    total_runs = sum(s["runs"] for per in summary.values() for s in per.values() if s)
    print(f"dropped {total_dropped} of {total_runs} measurements; "
          f"'!' = every repetition was disturbed, median of all of them shown")
    print("HF = logits for every prompt row (as users run it); HF keep1 = logits_to_keep=1; "
          "ratios > 1: llmc faster")
    for e in shown:
        info = load_info.get(e, {})
        extra = []
        if "artifact_bytes" in info:
            extra.append(f"artifact {info['artifact_bytes'] / 1e6:.1f} MB")
        if "peak_rss_mb" in info:
            extra.append(f"peak RSS {info['peak_rss_mb']:.0f} MB (own process, after warm-up)")
        if extra:
            print(f"{ENGINE_LABELS[e]}: {', '.join(extra)}")
    if "hf" in greedy:
        for e, gen in greedy.items():
            if e == "hf":
                continue
            n = min(len(gen), len(greedy["hf"]))
            same = next((i for i in range(n) if gen[i] != greedy["hf"][i]), n)
            print(f"greedy decode (sanity check, warm-up run): {ENGINE_LABELS[e]} = HF for the first "
                  f"{same} of {n} tokens (near-ties flip between fp32 and quantized compute)")

    result = {
        "benchmark": "llmc cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else argv),
        "model": {"source": model_spec, "gguf": gguf_path,
                  "gguf_bytes": os.path.getsize(gguf_path)},
        "machine": cpu,
        "versions": versions(),
        "settings": {"threads": t, "repeats": args.repeats, "quick": args.quick,
                     "max_extra_rounds": args.max_extra_rounds,
                     "max_other_cpu_cores": args.max_other_cpu, "slack_jiffies": SLACK_JIFFIES,
                     "idle_wait_s": args.idle_wait, "engines_requested": args.engine_list,
                     "artifact": args.artifact},
        "prompt": {"text_sha256": hashlib.sha256(PROMPT_TEXT.encode()).hexdigest(),
                   "text_tokens": text_tokens, "token_ids": prompt_ids,
                   "token_ids_sha256": hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()},
        "tasks": tasks,
        "engines": {e: {"label": ENGINE_LABELS[e], "status": status[e], **load_info.get(e, {})}
                    for e in status},
        "results": {e: {task: {**(summary[e][task] or {}), "measurements": runs[e][task]}
                        for task in runs[e]} for e in runs},
        "ratios": ratios,
        "profiles": profiles(args, [resolve_artifact(a) for a in (args.artifact or [DEFAULT_ARTIFACT])], t),
        "greedy_tokens": greedy,
        "measure_s": measure_s,
    }
    if "llamacpp" in status and status["llamacpp"] == "ok":
        import llama_cpp

        result["versions"]["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.json)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
