"""
Evaluate a policy on long-context tasks: accuracy, reward, tokens, sub-calls, depth,
critical path and wall-clock, per method and context length.

    python eval.py                                        # defaults: minutes on CPU
    python eval.py --adapter out/train/adapter            # a trained LoRA adapter
    python eval.py --tasks niah,multihop --lengths 8000,64000 --n 8 --methods rlm,direct
    python eval.py --jsonl my_benchmark.jsonl --methods rlm,direct

Methods:
    rlm         the full RLM: recursion (rlm_query) and async, batched sub-calls
    rlm-sync    sub-calls served one at a time, as in the original RLM
    rlm-depth1  rlm_query disabled, only plain llm_query sub-calls (the original depth)
    direct      the model reads the context in its prompt, cut to its context window

Every method of one evaluation shares one batcher, so all of them run concurrently.
A score is only ever what the model produced: no fallback fills in an answer.
"""

import argparse
import asyncio
import json
import os

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time
from dataclasses import dataclass

from reward import RewardConfig, compute_reward
from rlm import RLM, Batcher, Cost, strip_eos
from tasks import FAMILIES, load_jsonl, make_suite, score

METHODS = {
    "rlm": dict(allow_async=True, allow_rlm_query=True),
    "rlm-sync": dict(allow_async=False, allow_rlm_query=True),
    "rlm-depth1": dict(allow_async=True, allow_rlm_query=False),
    "direct": None,
}

# RLM settings for evaluation; train.py passes its own
# CPU-sized, so that `python eval.py` takes minutes; raise them on a GPU.
DEFAULT_RLM = dict(max_depth=2, max_turns=2, max_new_tokens=128, max_sub_calls=8, max_generated_tokens=768)


@dataclass
class DirectResult:
    answer: str
    cost: Cost
    cut: bool  # the context did not fit and was cut


async def direct_answer(batcher, query, context, max_new_tokens=128, context_window=8192):
    """The baseline: put the context in the prompt, cut to the window, and answer in one reply."""
    policy = batcher.policy
    text = context if isinstance(context, str) else json.dumps(context)
    question = f"\n\nQuestion: {query}\nAnswer with the answer only."
    budget = context_window - max_new_tokens - 64  # room for the template and the question
    # Cut by characters first (about 3 per token is generous) so we never tokenize megabytes.
    cut = len(text) > budget * 4
    text = text[: budget * 4]
    while True:
        ids = policy.chat_ids([{"role": "user", "content": text + question}])
        if len(ids) <= context_window - max_new_tokens or not text:
            break
        cut = True
        text = text[: int(len(text) * (context_window - max_new_tokens) / len(ids) * 0.95)]
    start = time.time()
    sample = await batcher.sample(ids, max_new_tokens)
    cost = Cost(prompt_tokens=len(ids), generated_tokens=len(sample.token_ids),
                critical_path_tokens=len(sample.token_ids), wall_seconds=time.time() - start)
    return DirectResult(policy.decode(strip_eos(sample.token_ids, policy.eos_token_ids)).strip(), cost, cut)


async def evaluate_one(batcher, task, method, length, rlm_settings, reward_config):
    if METHODS[method] is None:
        result = await direct_answer(batcher, task.query, task.context,
                                     context_window=rlm_settings.get("max_call_tokens", 8192))
        answer, cost, extra = result.answer, result.cost, {"context_cut": result.cut}
    else:
        rollout = await RLM(batcher, **{**rlm_settings, **METHODS[method]}).run(task.query, task.context)
        answer, cost, extra = rollout.answer, rollout.cost, {}
    correctness = score(task, answer)
    reward = compute_reward(correctness, cost, reward_config)
    return {"method": method, "family": task.family, "length": length, "seed": task.seed,
            "answer": answer, "truth": task.answer, **reward,
            "prompt_tokens": cost.prompt_tokens, "generated_tokens": cost.generated_tokens,
            "llm_query": cost.sub_calls["llm_query"], "rlm_query": cost.sub_calls["rlm_query"],
            "depth": cost.depth, "critical_path": cost.critical_path_tokens,
            "wall_seconds": cost.wall_seconds, **extra}


async def evaluate(batcher, tasks_by_length, methods, rlm_settings=None, reward_config=None,
                   max_concurrent=32, progress=True):
    """Run every (task, method) concurrently through one batcher -> list of per-run records."""
    from tqdm import tqdm

    rlm_settings = {**DEFAULT_RLM, **(rlm_settings or {})}
    reward_config = reward_config or RewardConfig()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    jobs = [(task, method, length) for length, tasks in tasks_by_length.items()
            for task in tasks for method in methods]
    limit = asyncio.Semaphore(max_concurrent)  # each RLM holds a REPL process while it runs
    bar = tqdm(total=len(jobs), desc="eval", disable=not progress)

    async def job(task, method, length):
        async with limit:
            record = await evaluate_one(batcher, task, method, length, rlm_settings, reward_config)
        bar.update(1)
        return record

    records = await asyncio.gather(*[job(*j) for j in jobs])
    bar.close()
    return list(records)


def summarize(records):
    """Mean of each figure per (method, length), in a stable order."""
    keys = ["correctness", "reward", "prompt_tokens", "generated_tokens", "llm_query", "rlm_query",
            "depth", "critical_path", "wall_seconds"]
    groups = {}
    for r in records:
        groups.setdefault((r["method"], r["length"]), []).append(r)
    rows = []
    for (method, length), rs in sorted(groups.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        row = {"method": method, "length": length, "n": len(rs)}
        row.update({k: sum(r[k] for r in rs) / len(rs) for k in keys})
        row["answered"] = sum(r["answer"] is not None for r in rs) / len(rs)
        if method == "direct":
            row["context_cut"] = sum(r["context_cut"] for r in rs) / len(rs)
        rows.append(row)
    return rows


def format_table(rows):
    header = (f"{'method':<11} {'length':>9} {'n':>3} {'acc':>5} {'reward':>7} {'answered':>8} {'prompt':>8} "
              f"{'gen':>6} {'llm_q':>5} {'rlm_q':>5} {'depth':>5} {'crit':>6} {'wall_s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        note = f"  (context cut in {r['context_cut']:.0%})" if r.get("context_cut") else ""
        lines.append(f"{r['method']:<11} {r['length']:>9,} {r['n']:>3} {r['correctness']:>5.2f} {r['reward']:>7.3f} "
                     f"{r['answered']:>8.0%} {r['prompt_tokens']:>8.0f} {r['generated_tokens']:>6.0f} "
                     f"{r['llm_query']:>5.1f} {r['rlm_query']:>5.1f} {r['depth']:>5.1f} {r['critical_path']:>6.0f} "
                     f"{r['wall_seconds']:>7.1f}{note}")
    return "\n".join(lines)


def held_out_suite(families, lengths, n, seed):
    """Tasks by length. Training draws seeds from 0 upward; evaluation seeds start at 10**6."""
    return {length: make_suite(families, [length], n, seed) for length in lengths}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="a saved LoRA adapter folder")
    parser.add_argument("--tasks", default="niah,multihop", help=f"comma-separated, from {','.join(FAMILIES)}")
    parser.add_argument("--lengths", default="4000,16000", help="context lengths in characters, comma-separated")
    parser.add_argument("--n", type=int, default=1, help="tasks per family and length")
    parser.add_argument("--seed", type=int, default=10**6, help="first task seed (held out from training)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--jsonl", default=None, help="evaluate records from this JSONL file instead")
    parser.add_argument("--max-turns", type=int, default=DEFAULT_RLM["max_turns"])
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_RLM["max_new_tokens"])
    parser.add_argument("--max-generated-tokens", type=int, default=DEFAULT_RLM["max_generated_tokens"])
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--out", default="out/eval.json")
    args = parser.parse_args()

    from lora import load_policy

    methods = args.methods.split(",")
    if args.jsonl:
        tasks_by_length = {}
        for task in load_jsonl(args.jsonl):
            tasks_by_length.setdefault(len(str(task.context)), []).append(task)
    else:
        tasks_by_length = held_out_suite(args.tasks.split(","), [int(x) for x in args.lengths.split(",")],
                                         args.n, args.seed)
    print(f"loading the policy ({args.model or 'SmolLM2-135M-Instruct'})...", flush=True)
    policy = load_policy(args.model, adapter=args.adapter)
    settings = dict(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                    max_generated_tokens=args.max_generated_tokens)
    records = asyncio.run(evaluate(Batcher(policy, temperature=args.temperature), tasks_by_length, methods, settings))
    rows = summarize(records)
    print(format_table(rows))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "summary": rows, "records": records}, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
