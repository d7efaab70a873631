"""
Speed and memory of the hot paths, each a ratio against a baseline measured in the same run.

    python bench.py                                   # default model on CPU: under 10 minutes on 2 cores
    python bench.py --only fanout,batcher --repeats 5
    python bench.py --tiny                            # tiny random model, tiny sizes: seconds
    python bench.py --model HuggingFaceTB/SmolLM2-360M-Instruct --out out/bench-360m.json

A ratio of two things timed side by side holds on a noisy, shared machine where absolute
times do not; absolute times are printed beside it, with the device. Timings are medians
of --repeats runs after a warm-up, the two sides alternating so that noise hits both.
OpenMP threads are told to sleep, not spin, while they wait (OMP_WAIT_POLICY=PASSIVE unless
set): on a busy shared CPU spinning threads stall each other and times jump 20-fold.

  fanout   one RLM rollout whose root sends K llm_query sub-calls, one per chunk of the
           context: async sub-calls batched by the Batcher vs the same calls one after
           another (RLM(..., allow_async=False), the original RLM). The root's reply is
           fixed code, not sampled, and every sub-call samples exactly --new-tokens tokens
           (end-of-turn suppressed), so both sides generate the same tokens.
  batcher  tokens/s of concurrent Batcher.sample requests (-> one policy.sample) vs one
           raw model.generate call on the same prompts and settings.
  memory   peak memory of Policy.logprobs (logits only where needed, in chunks) vs the
           plain way (logits for every position over the whole vocabulary, then
           log-softmax), on random token ids, every position scored; results must agree
           to 1e-4. Both as training scores them: with grad (the loss's forward pass;
           its graph is alive at the peak) and without (old and reference log-probs).
           Each side runs in a fresh process (glibc told to map every allocation of 64 KiB
           or more on its own, so RSS follows live tensors): after loading and a 16-token
           warm-up, the peak RSS (Linux VmHWM, reset through /proc/self/clear_refs) minus
           the RSS before scoring; on CUDA, torch.cuda.max_memory_allocated minus the
           memory allocated before. On CPU the default is 2 x 1024 tokens, not 8 x 2048
           (which would need ~29 GB with grad).
  repl     REPL start vs starting a bare `python -I -S -c pass`; a trivial execute
           round trip vs echoing one line through a pipe to a child process; starting a
           REPL with a 50M-character context vs piping the same characters to a fresh
           python that decodes them.
  tasks    tasks.make_task of 10M characters per family vs joining 10M characters of
           random words (random.choices + str.join).
  merge    the LoRA merge each sample() call runs first: merged weights kept between
           updates and swapped in vs cloning and merging every wrapped weight on every
           call (as it was), alone and as part of one --new-tokens sample() call; and on a
           bf16 copy of the model after one AdamW step at lr 1e-4, |sampled - scored|
           log-prob of each sampled token, now vs the delta merged into the bf16 weights
           (as it was), with the share of delta entries that merging loses.
  train    one step of train.py's default configuration (on CPU: one task, a group of 4
           rollouts), split into rollouts and update (once, no warm-up); --train-argv
           passes train.py flags, e.g. --train-argv="--group_size 8".
  rows     (only with --only rows) one Dr. GRPO update on teacher rollouts of tally (recurse.py's
           limits, sub-calls one after another; --rows-length characters, --rows-rollouts of them),
           training the rows of the root and child RLMs (--train_calls rlm) or of the root alone
           (root) vs every call (all): what recurse.py's CPU choice saves, with the tokens each trains on.
  dist     (only with --only dist) seconds per RL step of train.py run as `python train.py` (1
           process) vs `torchrun --nproc_per_node 2 train.py` (2 processes), same flags (--dist-argv),
           each rank half of the step's groups. On a 2-core CPU expect no speed-up: one process
           already uses both cores, two processes get one core each for the same work, and add
           an all-reduce and rank 0's logging.
"""

import argparse
import asyncio
import contextlib
import copy
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

# set before torch loads; OMP_WAIT_POLICY=ACTIVE in the environment overrides it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

import lora  # noqa: E402
from checks import InputError, at_least, int_list, refuse, writable  # noqa: E402
import tasks  # noqa: E402
from repl import REPL  # noqa: E402
from grpo import TRAIN_CALLS as TRAIN_KINDS  # noqa: E402
from rlm import RLM, Batcher  # noqa: E402

BENCHMARKS = ("fanout", "batcher", "memory", "repl", "tasks", "merge", "rows", "train", "dist")
OPTIONAL = ("dist", "rows")  # run only when asked for by --only
NEEDS_MODEL = {"fanout", "batcher", "memory", "merge", "rows", "train", "dist"}
VALID = dict(repeats="at least 1", fanout_k="comma-separated, each at least 1", new_tokens="at least 1",
             chunk_chars="at least 1", batch="at least 1", score_batch="at least 1", score_len="at least 1",
             context_chars="at least 1", task_chars="at least 2000", rows_length="at least 1200",
             rows_rollouts="at least 1")  # as parse_args checks them
DEFAULTS = dict(repeats=3, fanout_k="1,4,8,16", new_tokens=32, chunk_chars=400, batch=8, score_batch=8,
                score_len=2048, context_chars=50_000_000, task_chars=10_000_000, train_argv="", rows_length=3000,
                rows_rollouts=4,
                dist_argv="--steps 2 --warm_demos 0 --eval_n 0 --lengths 2000 --max_turns 1 --max_new_tokens 48 "
                          "--max_generated_tokens 256")
# On CPU, 8 x 2048 scored tokens would need ~29 GB with grad, and a full training step takes ~7 minutes.
CPU_SIZES = dict(score_batch=2, score_len=1024, train_argv="")
TINY = dict(repeats=1, fanout_k="1,4", new_tokens=8, chunk_chars=100, batch=4, score_batch=2, score_len=64,
            context_chars=1_000_000, task_chars=100_000,
            train_argv="--tasks_per_step 1 --group_size 2 --max_turns 1 --max_new_tokens 24 "
                       "--max_generated_tokens 96 --lengths 2000",
            dist_argv="--steps 2 --warm_demos 0 --eval_n 0 --lengths 2000 --max_turns 1 --max_new_tokens 24 "
                      "--max_generated_tokens 96")


# -----------------------------------------------------------------------------
# Timing and the table


def measure(sides, repeats, warmup=True):
    """{name: fn} -> {name: [seconds]}: a warm-up of each side, then rounds alternating between sides."""
    for fn in sides.values() if warmup else ():
        fn()
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def row(bench, what, measured, baseline, ratio, target=None, **details):
    """One line of the table. target: (">=" or "<=", threshold) on the ratio, or None."""
    met = None if target is None else (ratio >= target[1] if target[0] == ">=" else ratio <= target[1])
    return dict(bench=bench, what=what, measured=measured, baseline=baseline, ratio=ratio,
                target=None if target is None else f"{target[0]} {target[1]:g}", met=met, **details)


def format_table(rows):
    head = ("benchmark", "measured", "baseline", "ratio", "target", "result")
    lines = [(f"{r['bench']}: {r['what']}", r["measured"], r["baseline"], f"{r['ratio']:.3g}",
              r["target"] or "-", {True: "met", False: "MISSED", None: "-"}[r["met"]]) for r in rows]
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])


def device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def text(n_chars, seed=0):
    """Prose of exactly n_chars characters (a niah haystack, repeated past 1M characters)."""
    piece = tasks.make_task("niah", min(max(n_chars, 1000), 1_000_000), seed=seed).context
    return (piece * (n_chars // len(piece) + 1))[:n_chars]


# -----------------------------------------------------------------------------
# Policies that make both sides of a comparison do the same work


def without_end_of_turn(policy):
    """A view of the policy whose samples never stop early: each is exactly max_new_tokens long."""
    forced = copy.copy(policy)
    vocab = policy.model.get_base_model().get_output_embeddings().weight.shape[0]
    forced.eos_token_ids = [vocab]  # an id the model cannot draw
    return forced


class CannedRoot:
    """The policy, except that the root call's first reply is fixed code (no model call)
    and every sub-call samples exactly `sub_call_tokens` tokens."""

    def __init__(self, policy, code, sub_call_tokens):
        self.policy, self.forced, self.sub_call_tokens = policy, without_end_of_turn(policy), sub_call_tokens
        self.reply_ids = policy.encode(f"```repl\n{code}\n```") + policy.eos_token_ids[:1]
        self.root_prompts = set()  # the ids chat_ids gave for a root call (it has a system message)
        self.model_calls = 0  # sampling calls that reached the model

    def __getattr__(self, name):  # decode, followup_ids, eos_token_ids, ...: the real policy's
        return getattr(self.policy, name)

    def chat_ids(self, messages):
        ids = self.policy.chat_ids(messages)
        if messages[0]["role"] == "system":
            self.root_prompts.add(tuple(ids))
        return ids

    def sample(self, prompts, max_new_tokens=256, seeds=None, **settings):
        is_root = [tuple(p) in self.root_prompts for p in prompts]
        to_model = [p for p, root in zip(prompts, is_root) if not root]
        if seeds is not None:
            settings["seeds"] = [s for s, root in zip(seeds, is_root) if not root]
        drawn = iter(self.forced.sample(to_model, max_new_tokens=self.sub_call_tokens, **settings) if to_model else [])
        self.model_calls += bool(to_model)
        canned = lora.Sample(self.reply_ids, [0.0] * len(self.reply_ids), "stop")
        return [canned if root else next(drawn) for root in is_root]


# -----------------------------------------------------------------------------
# 1. Async fan-out vs sequential sub-calls


def fanout_code(k, batched):
    ask = ('llm_query_batched([f"Summarize: {c}" for c in chunks])' if batched
           else '[llm_query(f"Summarize: {c}") for c in chunks]')
    return (f"n = len(context) // {k}\nchunks = [context[i * n:(i + 1) * n] for i in range({k})]\n"
            f"summaries = {ask}\nFINAL(len(summaries))")


def fanout_rollout(policy, k, new_tokens, context, allow_async):
    canned = CannedRoot(policy, fanout_code(k, batched=allow_async), new_tokens)
    rlm = RLM(Batcher(canned), max_new_tokens=256, max_sub_calls=k, max_generated_tokens=256 * (k + 2),
              allow_async=allow_async, max_turns=1)
    rollout = asyncio.run(rlm.run("Summarize each chunk.", context))
    if rollout.answer != str(k):
        raise RuntimeError(f"the fan-out rollout did not finish its {k} sub-calls: {rollout.answer!r}")
    sub_calls = [c for c in rollout.calls if c.kind == "llm_query"]
    return dict(sub_calls=len(sub_calls), tokens=sum(sum(c.sampled_mask) for c in sub_calls),
                prompt_tokens=sum(c.prompt_lengths[0] for c in sub_calls), model_calls=canned.model_calls)


def bench_fanout(policy, ks, new_tokens, chunk_chars, repeats):
    rows, warm = [], False
    for k in ks:
        context = text(k * chunk_chars, seed=k)
        stats = {}
        sides = {side: lambda side=side: stats.__setitem__(side, fanout_rollout(
            policy, k, new_tokens, context, allow_async=side == "async")) for side in ("async", "sync")}
        times = measure(sides, repeats, warmup=not warm)
        warm = True
        a, s = statistics.median(times["async"]), statistics.median(times["sync"])
        prompt = stats["sync"]["prompt_tokens"] // k
        rows.append(row("fanout", f"K={k} sub-calls of {prompt}+{new_tokens} tokens", baseline=(
            f"one at a time {s:.2f} s: {stats['sync']['tokens']} tok, {stats['sync']['model_calls']} model calls"),
            measured=f"async {a:.2f} s: {stats['async']['tokens']} tok, {stats['async']['model_calls']} model calls",
            ratio=s / a, target=(">=", 4.0) if k == 8 else None, seconds=a, baseline_seconds=s,
            async_stats=stats["async"], sync_stats=stats["sync"], times=times))
    return rows


# -----------------------------------------------------------------------------
# 2. Batcher overhead vs one raw generate


def bench_batcher(policy, batch, new_tokens, chunk_chars, repeats):
    forced = without_end_of_turn(policy)
    chunks = [text(chunk_chars * (i + 1) // batch, seed=i) for i in range(batch)]
    prompts = [policy.chat_ids([{"role": "user", "content": f"Summarize: {c}"}]) for c in chunks]
    # lengths differ, so padding is part of the work
    counts = {}

    def via_batcher():
        async def requests():
            batcher = Batcher(forced)
            return await asyncio.gather(*[batcher.sample(p, new_tokens) for p in prompts])
        counts["batcher"] = sum(len(s.token_ids) for s in asyncio.run(requests()))

    T = max(len(p) for p in prompts)  # left padding, as policy.sample does
    input_ids_BT = torch.tensor([[policy.pad_token_id] * (T - len(p)) + p for p in prompts], device=policy.device)
    attention_mask_BT = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=policy.device)

    @torch.no_grad()
    def raw_generate():
        policy.model.eval()
        out = policy.model.generate(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                                    max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                    eos_token_id=forced.eos_token_ids, pad_token_id=policy.pad_token_id, use_cache=True)
        counts["raw"] = out[:, T:].numel()

    times = measure({"batcher": via_batcher, "raw": raw_generate}, repeats)
    b, r = statistics.median(times["batcher"]), statistics.median(times["raw"])
    tps_b, tps_r = counts["batcher"] / b, counts["raw"] / r
    return [row("batcher", f"{batch} concurrent requests, {new_tokens} tokens each", ratio=tps_b / tps_r,
                measured=f"Batcher {tps_b:.1f} tok/s ({counts['batcher']} tok)",
                baseline=f"model.generate {tps_r:.1f} tok/s ({counts['raw']} tok)", target=(">=", 0.9),
                tokens=counts["batcher"], baseline_tokens=counts["raw"], seconds=b, baseline_seconds=r, times=times)]


# -----------------------------------------------------------------------------
# 3. Scoring memory: Policy.logprobs vs full logits, each side in a fresh process


def plain_logprobs(policy, input_ids_BT, attention_mask_BT, loss_mask_BT, temperature=1.0):
    """The textbook way: logits at every position over the whole vocabulary, then log-softmax."""
    logits_BTV = policy.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).logits.float() / temperature
    logprobs_BT = logits_BTV[:, :-1].log_softmax(-1).gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logprobs_BT, (1, 0)) * loss_mask_BT


def memory_child(spec):
    """Runs in a fresh process: load, build the batch, reset the peak, score, report."""
    policy = lora.load_policy(spec["folder"])
    torch.manual_seed(0)
    vocab = policy.model.get_base_model().get_output_embeddings().weight.shape[0]
    input_ids_BT = torch.randint(vocab, (spec["batch"], spec["seq_len"]), device=policy.device)
    attention_mask_BT = torch.ones_like(input_ids_BT)
    loss_mask_BT = torch.ones_like(input_ids_BT)
    score = policy.logprobs if spec["side"] == "chunked" else lambda *a: plain_logprobs(policy, *a)
    with torch.set_grad_enabled(spec["grad"]):  # a small warm-up: code pages, thread pools, caches
        score(input_ids_BT[:1, :16], attention_mask_BT[:1, :16], loss_mask_BT[:1, :16])
    gc.collect()
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    elif not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("peak memory on CPU is read from Linux's /proc/self; on another system run the "
                           "memory benchmark on CUDA, or leave it out with --only")
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
        before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    with torch.set_grad_enabled(spec["grad"]):
        logprobs_BT = score(input_ids_BT, attention_mask_BT, loss_mask_BT)
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = _status_bytes("VmHWM") - before
    seconds = time.perf_counter() - t0
    torch.save(logprobs_BT.detach().cpu(), spec["result"])
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def _status_bytes(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


# glibc gives every allocation of 64 KiB or more its own mapping and unmaps it on free, so the
# RSS follows the live tensors instead of whatever the heap kept (which varies run to run by 2x).
CHILD_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def bench_memory(folder, batch, seq_len, grads=(True, False)):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for grad in grads:
            out = {}
            for side in ("chunked", "plain"):
                spec = dict(folder=folder, batch=batch, seq_len=seq_len, grad=grad, side=side,
                            result=os.path.join(tmp, f"{side}.pt"))
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)],
                                      capture_output=True, text=True, env=CHILD_ENV)
                if proc.returncode != 0:
                    raise RuntimeError(f"the memory measurement ({side}, grad={grad}) failed:\n{proc.stderr[-3000:]}")
                out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
                out[side]["logprobs_BT"] = torch.load(spec["result"])
            diff = (out["chunked"]["logprobs_BT"] - out["plain"]["logprobs_BT"]).abs().max().item()
            c, p = out["chunked"]["peak_bytes"], out["plain"]["peak_bytes"]
            rows.append(row("memory", f"scoring {batch}x{seq_len} tokens, {'with' if grad else 'no'} grad",
                            measured=f"Policy.logprobs {c / 2**20:,.0f} MB", ratio=c / p, target=("<=", 0.25),
                            baseline=f"full logits {p / 2**20:,.0f} MB (max diff {diff:.1e})",
                            peak_bytes=c, baseline_peak_bytes=p, max_abs_diff=diff, agree=diff <= 1e-4,
                            seconds=out["chunked"]["seconds"], baseline_seconds=out["plain"]["seconds"]))
    return rows


# -----------------------------------------------------------------------------
# 4. The REPL vs bare processes and pipes

ECHO = "import sys\nfor line in sys.stdin:\n    sys.stdout.write(line)\n    sys.stdout.flush()"
DRAIN = "import sys\nsys.stdout.write(str(len(sys.stdin.buffer.read().decode())))"


def bench_repl(context_chars, repeats):
    python = [sys.executable, "-I", "-S", "-c"]
    pipe = asyncio.subprocess.PIPE
    big = text(context_chars)

    async def repl_start(context):
        repl = REPL(context)
        await repl.start()
        await repl.close()

    async def bare_start():
        await (await asyncio.create_subprocess_exec(*python, "pass")).wait()

    async def pipe_load():
        proc = await asyncio.create_subprocess_exec(*python, DRAIN, stdin=pipe, stdout=pipe)
        n, _ = await proc.communicate(big.encode())
        assert int(n) == len(big)

    async def round_trips(n):
        samples = {"repl": [], "pipe": []}
        async with REPL("") as repl:
            echo = await asyncio.create_subprocess_exec(*python, ECHO, stdin=pipe, stdout=pipe)
            for _ in range(n + 1):  # the first of each is a warm-up
                t0 = time.perf_counter()
                await repl.execute("x = 1")
                t1 = time.perf_counter()
                echo.stdin.write(b"x = 1\n")
                await echo.stdin.drain()
                await echo.stdout.readline()
                samples["repl"].append(t1 - t0)
                samples["pipe"].append(time.perf_counter() - t1)
            echo.stdin.close()
            await echo.wait()
        return {k: v[1:] for k, v in samples.items()}

    starts = measure({"repl": lambda: asyncio.run(repl_start("")), "bare": lambda: asyncio.run(bare_start())},
                     max(repeats, 5))
    trips = asyncio.run(round_trips(20 * repeats))
    loads = measure({"repl": lambda: asyncio.run(repl_start(big)), "pipe": lambda: asyncio.run(pipe_load())}, repeats)
    rows = []
    for what, t, base, label in [("start", starts["repl"], starts["bare"], "python -I -S -c pass"),
                                 ("execute('x = 1') round trip", trips["repl"], trips["pipe"], "echo a line via a pipe"),
                                 (f"start with a {context_chars:,}-char context", loads["repl"], loads["pipe"],
                                  "pipe it to python")]:
        m, b = statistics.median(t), statistics.median(base)
        rows.append(row("repl", what, measured=f"{m * 1e3:.3g} ms", baseline=f"{label} {b * 1e3:.3g} ms",
                        ratio=m / b, seconds=m, baseline_seconds=b))
    return rows


# -----------------------------------------------------------------------------
# 5. Task generation vs joining random words


def bench_tasks(task_chars, repeats):
    words = "the quick brown fox jumps over a lazy dog near river bank at dawn".split()

    def random_words():
        rng = random.Random(0)
        return " ".join(rng.choices(words, k=task_chars // 4))[:task_chars]  # ~4 chars a word with its space

    makers = {f: lambda f=f: tasks.make_task(f, task_chars, seed=0) for f in tasks.FAMILIES}
    times = {k: statistics.median(v) for k, v in measure({"baseline": random_words, **makers}, repeats).items()}
    b = times["baseline"]
    return [row("tasks", f"make_task {f} {task_chars:,} chars", measured=f"{times[f]:.3f} s",
                baseline=f"random words {b:.3f} s", ratio=times[f] / b, seconds=times[f], baseline_seconds=b)
            for f in tasks.FAMILIES]


# -----------------------------------------------------------------------------
# 6. Merged LoRA weights for sampling: kept between updates vs merged on every call


@contextlib.contextmanager
def merged_every_call(policy):
    """The merge as it was: clone every wrapped weight, add its LoRA delta in place, in the
    weight's own dtype, and copy the clone back afterwards."""
    layers = [m for m in policy.model.modules() if isinstance(m, LoraLayer) and m.active_adapters]
    saved = []
    with torch.no_grad():
        try:
            for m in layers:
                weight = m.get_base_layer().weight
                saved.append(weight.detach().clone())
                weight.add_(sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A))
            with policy.model.disable_adapter():
                yield
        finally:
            for m, original in zip(layers, saved):
                m.get_base_layer().weight.copy_(original)


def merging_every_call(policy):
    """A view of the policy that samples on weights merged on every call, as it was."""
    old = copy.copy(policy)
    old.merged_weights = lambda: merged_every_call(old)
    return old


def lost_delta_fraction(policy):
    """The share of nonzero LoRA delta entries that adding into the base weights leaves unchanged."""
    lost = nonzero = 0
    with torch.no_grad():
        for m in policy.model.modules():
            if isinstance(m, LoraLayer) and m.active_adapters:
                weight = m.get_base_layer().weight
                delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
                moved = (weight + delta).to(weight.dtype) != weight
                lost += int(((delta != 0) & ~moved).sum())
                nonzero += int((delta != 0).sum())
    return lost / max(nonzero, 1)


def right_padded(prompts, completions, pad_id):
    """(input_ids_BT, attention_mask_BT, loss_mask_BT): prompt + completion per row, loss on the completion."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids_BT = torch.tensor([p + c + [pad_id] * (T - len(p) - len(c)) for p, c in zip(prompts, completions)])
    attention_mask_BT = torch.tensor([[1] * (len(p) + len(c)) + [0] * (T - len(p) - len(c))
                                      for p, c in zip(prompts, completions)])
    loss_mask_BT = torch.tensor([[0] * len(p) + [1] * len(c) + [0] * (T - len(p) - len(c))
                                 for p, c in zip(prompts, completions)])
    return input_ids_BT, attention_mask_BT, loss_mask_BT


def sampling_gaps(policy, prompts, new_tokens):
    """|sampled - scored| log-prob of every token of one seeded, fixed-length sample per prompt."""
    samples = without_end_of_turn(policy).sample(prompts, max_new_tokens=new_tokens, seeds=list(range(len(prompts))))
    with torch.no_grad():
        scored_BT = policy.logprobs(*right_padded(prompts, [s.token_ids for s in samples], policy.pad_token_id)).cpu()
    return torch.cat([torch.tensor(s.logprobs) - scored_BT[b, len(p):len(p) + len(s.token_ids)]
                      for b, (p, s) in enumerate(zip(prompts, samples))]).abs()


def bench_merge(policy, bf16_policy, new_tokens, repeats):
    """bf16_policy: a bf16 copy of the model with a fresh adapter; its adapter takes one AdamW step here."""
    def synced(fn):
        def run():
            fn()
            if policy.device.type == "cuda":
                torch.cuda.synchronize()
        return run

    def enter_and_leave(weights):
        with weights():
            pass

    # The old merge writes into the base weights and back, which a kept merge takes for a change of
    # them (it is one, for a moment), so the old side runs on its own copy of the model.
    old = merging_every_call(lora.Policy(copy.deepcopy(policy.model), policy.tokenizer))
    merge_times = measure({"kept": synced(lambda: enter_and_leave(policy.merged_weights)),
                           "every call": synced(lambda: enter_and_leave(old.merged_weights))}, max(repeats, 5))
    policy._merge_cache.clear()   # as after an optimizer step
    [remerge_s] = measure({"again": synced(lambda: enter_and_leave(policy.merged_weights))}, 1, warmup=False)["again"]
    prompt = policy.chat_ids([{"role": "user", "content": "Write a short poem about the sea."}])
    forced, forced_old = without_end_of_turn(policy), without_end_of_turn(old)
    call_times = measure({"now": lambda: forced.sample([prompt], max_new_tokens=new_tokens, seeds=[0]),
                          "before": lambda: forced_old.sample([prompt], max_new_tokens=new_tokens, seeds=[0])}, repeats)

    # One AdamW step on demonstrations: the delta is then small next to the base weights, as early in
    # training. Before it the adapter is zero and both ways sample the same: that gap is bf16 rounding alone.
    questions = ["What is 2+2?", "Name a large river.", "Count to five.", "Write a short poem about the sea.",
                 "What colour is the sky?", "Spell 'cat'.", "Say hello in French.", "What is the capital of Italy?"]
    answers = ["4", "The Nile.", "1, 2, 3, 4, 5.", "Waves roll in,\nsalt on the wind.", "Blue.", "C-A-T.",
               "Bonjour.", "Rome."]
    prompts = [bf16_policy.chat_ids([{"role": "user", "content": q}]) for q in questions]
    answers = [bf16_policy.encode(a) + bf16_policy.eos_token_ids[:1] for a in answers]
    gap_before = sampling_gaps(bf16_policy, prompts, new_tokens)
    batch = right_padded(prompts, answers, bf16_policy.pad_token_id)
    optimizer = torch.optim.AdamW(bf16_policy.trainable_parameters(), lr=1e-4, weight_decay=0.0)
    loss = -bf16_policy.logprobs(*batch).sum() / batch[2].sum()
    loss.backward()
    optimizer.step()
    lost = lost_delta_fraction(bf16_policy)
    gap_now = sampling_gaps(bf16_policy, prompts, new_tokens)
    gap_old = sampling_gaps(merging_every_call(bf16_policy), prompts, new_tokens)

    k, e = statistics.median(merge_times["kept"]), statistics.median(merge_times["every call"])
    n, b = statistics.median(call_times["now"]), statistics.median(call_times["before"])

    def summary(gap):
        return f"mean {gap.mean():.2g}, median {gap.median():.2g}, max {gap.max():.2g}"
    return [
        row("merge", "merging before a sample() call", measured=f"kept {k * 1e3:.3g} ms (after an update "
            f"{remerge_s * 1e3:.3g} ms)", baseline=f"merged every call {e * 1e3:.3g} ms", ratio=k / e,
            seconds=k, baseline_seconds=e, remerge_seconds=remerge_s, times=merge_times),
        row("merge", f"one sample() call, {len(prompt)}+{new_tokens} tokens", measured=f"{n:.2f} s",
            baseline=f"merged every call {b:.2f} s", ratio=n / b, seconds=n, baseline_seconds=b, times=call_times),
        row("merge", f"bf16 |sampled - scored| log-prob after one AdamW step, {len(gap_now)} tokens",
            measured=f"now {summary(gap_now)}", ratio=float(gap_now.mean() / gap_old.mean()),
            baseline=f"merged into bf16 weights {summary(gap_old)} ({lost:.1%} of delta entries lost); "
                     f"before the step {summary(gap_before)}",
            gap_mean=float(gap_now.mean()), baseline_gap_mean=float(gap_old.mean()),
            gap_median=float(gap_now.median()), baseline_gap_median=float(gap_old.median()),
            gap_mean_before_step=float(gap_before.mean()), gap_median_before_step=float(gap_before.median()),
            tokens=len(gap_now), baseline_tokens=len(gap_old), lost_delta_fraction=lost),
    ]


# -----------------------------------------------------------------------------
# 7. Which calls an update trains on


def bench_rows(policy, length, n_rollouts):
    """grpo_step on the same teacher rollouts, training every call's rows, or only some kinds."""
    import recurse
    from grpo import grpo_step
    from tasks import make_task, task_seed
    from teacher import demonstrate

    rollouts = [asyncio.run(demonstrate(policy, make_task("tally", length, task_seed("demo", "tally", length, i)),
                                        "sync", recurse.ROLLOUTS, i)).rollout for i in range(n_rollouts)]
    params = policy.trainable_parameters()
    saved = [p.detach().clone() for p in params]
    seconds, tokens = {}, {}
    for calls in ("all", "rlm", "root"):
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        t0 = time.perf_counter()
        stats = grpo_step(policy, optimizer, rollouts, [1.0] * n_rollouts, temperature=1.0,
                          max_generated_tokens=recurse.ROLLOUTS["max_generated_tokens"], micro_batch_tokens=4096,
                          train_calls=calls)
        seconds[calls], tokens[calls] = time.perf_counter() - t0, stats["train_tokens"]
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    rows_in = lambda c: sum(len(call.token_ids) for r in rollouts for call in r.calls if call.kind in TRAIN_KINDS[c])  # noqa: E731
    return [row("rows", f"update, train_calls={calls} ({n_rollouts} tally rollouts at {length:,} chars)",
                measured=f"{seconds[calls]:.1f} s", baseline=f"all calls {seconds['all']:.1f} s",
                ratio=seconds[calls] / seconds["all"], seconds=seconds[calls], sampled_tokens=tokens[calls],
                row_tokens=rows_in(calls))
            for calls in ("rlm", "root")]


# -----------------------------------------------------------------------------
# 8. One training step, rollouts vs update


def bench_train(policy, train_argv):
    """train.rl_step as train.py runs its first RL step, timed in its two parts."""
    import train

    cfg = train.parse_config(train_argv)
    params = policy.trainable_parameters()
    saved = [p.detach().clone() for p in params]  # the step changes the adapter; put it back afterwards
    torch.manual_seed(cfg["seed"] * 100_003)
    rlm = RLM(Batcher(policy, temperature=cfg["temperature"]), **train.rlm_settings(cfg))
    reward_config = train.reward_settings(cfg)
    optimizer = train.new_optimizer(policy, cfg, "rl")
    lengths = train.ints(cfg["lengths"])[:1]  # the curriculum's first stage
    metrics = train.rl_step(policy, optimizer, rlm, reward_config, cfg, 0, lengths, record=lambda *_: None)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    rollout_s, update_s = metrics["rollout_seconds"], metrics["update_seconds"]
    step_s = rollout_s + update_s
    n_rollouts = cfg["tasks_per_step"] * cfg["group_size"]
    generated = round(metrics["generated_tokens"] * n_rollouts)
    return [row("train", f"rollouts ({n_rollouts}, {generated} generated tokens)", measured=f"{rollout_s:.1f} s",
                baseline=f"whole step {step_s:.1f} s", ratio=rollout_s / step_s, seconds=rollout_s,
                generated_tokens=generated),
            row("train", f"update ({metrics['train_rows']} rows, {metrics['train_tokens']} trained tokens)",
                measured=f"{update_s:.1f} s", baseline=f"whole step {step_s:.1f} s", ratio=update_s / step_s,
                seconds=update_s, **{k: metrics[k] for k in ("train_rows", "train_tokens")})]


def bench_dist(model, train_argv, processes=2):
    """Median seconds per RL step (rank 0's rollouts + update, all-reduce and gathering included) of
    train.py at 1 process and under torchrun at `processes`, with the same flags."""
    import socket

    seconds, steps = {}, {}
    for n in (1, processes):
        with tempfile.TemporaryDirectory() as out:
            if n == 1:
                launcher = [sys.executable]
            else:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                            "--master_addr", "127.0.0.1", "--master_port", str(port)]
            command = launcher + [os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), *train_argv,
                                  "--out_dir", out] + (["--model", model] if model else [])
            done = subprocess.run(command, capture_output=True, text=True, cwd=out)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            rl = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            rl = [m for m in rl if m["phase"] == "rl"]
            seconds[n] = statistics.median(m["rollout_seconds"] + m["update_seconds"] for m in rl)
            steps[n] = len(rl)
        print(f"  {n} process(es): {seconds[n]:.1f} s per RL step", flush=True)
    return [row("dist", f"one RL step, {processes} processes (torchrun) vs 1, median of {steps[processes]} steps",
                measured=f"{seconds[processes]:.1f} s", baseline=f"1 process {seconds[1]:.1f} s",
                ratio=seconds[1] / seconds[processes], seconds=seconds[processes], baseline_seconds=seconds[1],
                argv=train_argv)]


# -----------------------------------------------------------------------------


def load(model, tiny, save_to=None, dtype=None):
    """The bench's policy: the tiny random model (as in tests/conftest.py) or a real one.
    save_to: also write the bare model there, for the memory benchmark's fresh processes."""
    device, dtype = lora.resolve_device_dtype(None, dtype)
    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
        from conftest import load_smollm_tokenizer, make_tiny_model
        tokenizer = load_smollm_tokenizer()
        hf_model = make_tiny_model(tokenizer)
    else:
        hf_model, tokenizer = lora.load_model(model, dtype)
    if save_to:
        hf_model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    return lora.Policy.from_model(hf_model, tokenizer, device=device, dtype=dtype)


def run(args):
    only = args.only.split(",") if args.only else [b for b in BENCHMARKS if b not in OPTIONAL]
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"bench.py: unknown benchmarks {sorted(unknown)}; choose from {','.join(BENCHMARKS)}")
    rows, policy = [], None
    with tempfile.TemporaryDirectory() as folder:
        if NEEDS_MODEL & set(only):  # repl and tasks run no model: loading one would only cost time
            t0 = time.perf_counter()
            save = "memory" in only or ("dist" in only and args.tiny)  # the memory and tiny dist runs load it from there
            policy = load(args.model, args.tiny, save_to=folder if save else None)
            print(f"loaded {'a tiny random model' if args.tiny else args.model or lora.DEFAULT_MODEL} in "
                  f"{time.perf_counter() - t0:.0f} s on {device_name(policy.device)}", flush=True)
        steps = {
            "fanout": lambda: bench_fanout(policy, [int(k) for k in args.fanout_k.split(",")], args.new_tokens,
                                           args.chunk_chars, args.repeats),
            "batcher": lambda: bench_batcher(policy, args.batch, args.new_tokens, args.chunk_chars, args.repeats),
            "memory": lambda: bench_memory(folder, args.score_batch, args.score_len),
            "repl": lambda: bench_repl(args.context_chars, args.repeats),
            "tasks": lambda: bench_tasks(args.task_chars, args.repeats),
            "merge": lambda: bench_merge(policy, load(args.model, args.tiny, dtype=torch.bfloat16), args.new_tokens,
                                         args.repeats),
            "rows": lambda: bench_rows(policy, args.rows_length, args.rows_rollouts),
            "train": lambda: bench_train(policy, args.train_argv.split()),
            "dist": lambda: bench_dist(folder if args.tiny else args.model, args.dist_argv.split()),
        }
        for name in BENCHMARKS:  # in this order: train changes the adapter (and puts it back) last
            if name in only:
                t0 = time.perf_counter()
                rows += steps[name]()
                print(f"{name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, policy.device if policy else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated, from {','.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and tiny sizes")
    parser.add_argument("--out", default="out/bench.json", help="where the JSON goes")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                            help=f"{VALID.get(name, 'train.py flags')}; default: {value!r}"
                                 + (f" ({CPU_SIZES[name]} on CPU)" if name in CPU_SIZES else ""))
    args = parser.parse_args(argv)
    sizes = dict(DEFAULTS, **(TINY if args.tiny else {} if torch.cuda.is_available() else CPU_SIZES))
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.memory_child:
        return args
    only = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(only) - set(BENCHMARKS))
    _, fanout_problem = int_list("--fanout-k", args.fanout_k, low=1)
    refuse("bench.py", [
        unknown and f"unknown benchmarks {unknown} in --only; choose from {','.join(BENCHMARKS)}",
        *(at_least(f"--{name.replace('_', '-')}", getattr(args, name), 1)
          for name in ("repeats", "new_tokens", "chunk_chars", "batch", "score_batch", "score_len", "context_chars")),
        at_least("--task-chars", args.task_chars, 2000), at_least("--rows-length", args.rows_length, 1200),
        at_least("--rows-rollouts", args.rows_rollouts, 1), fanout_problem])
    if "train" in only:  # train.py's own checks, now rather than after the model loads
        import config
        import train

        config.check_config(train.parse_config(args.train_argv.split()))
    try:
        writable(args.out, "--out")
    except InputError as e:
        sys.exit(f"bench.py: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    started = time.time()
    rows, device = run(args)
    print(f"\ndevice: {device_name(device)}\n")
    print(format_table(rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("memory_child",)}
    command = " ".join(["python bench.py"] + (sys.argv[1:] if argv is None else argv))
    report = dict(command=command, device=device_name(device),
                  started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                  seconds=time.time() - started, settings=settings, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    missed = [f"{r['bench']}: {r['what']}" for r in rows if r["met"] is False]
    print(f"\n{len(rows)} figures in {time.time() - started:.0f} s; JSON in {args.out}"
          + (f"; targets missed: {'; '.join(missed)}" if missed else ""))


if __name__ == "__main__":
    main()
