"""
Evaluate a policy on long-context tasks: accuracy, reward, tokens, sub-calls, depth,
critical path and wall-clock, per method and context length.

    python eval.py                                        # defaults: minutes on CPU
    python eval.py --adapter out/train/adapter            # a trained LoRA adapter
    python eval.py --tasks niah,multihop --lengths 8000,64000 --n 8 --methods rlm,direct
    python eval.py --jsonl my_benchmark.jsonl --methods rlm,direct
    python eval.py --adapter out/train/adapter --wording seen,held_out    # questions worded as training never saw
    python eval.py --adapters "warm start=out/warm/adapter,RL=out/rl/adapter" --baselines 10   # one table
    python eval.py --traces out/eval_traces.jsonl && python view.py out/eval_traces.jsonl   # a page of the runs

Methods:
    rlm         the full RLM: recursion (rlm_query) and async, batched sub-calls
    rlm-sync    sub-calls served one at a time, as in the original RLM
    rlm-depth1  rlm_query disabled, only plain llm_query sub-calls (the original depth)
    direct      the model reads the context in its prompt, cut to its context window
    teacher     the scripted teacher of the warm start, its strategies in equal shares

Every method of one evaluation shares one batcher, so all of them run concurrently.
A score is only ever what the model produced: no fallback fills in an answer.
A second table says how the runs met their mistakes: failed cells per run, how often the code
after a traceback changed, how often a run with one still ended right, and how many replies
fell into repeating themselves.
"""

import argparse
import asyncio
import dataclasses
import inspect
import json
import math
import os
import re
import sys

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time
from dataclasses import dataclass

from checks import InputError, adapter_folder, at_least, int_list, read_text, refuse, writable
from reward import RewardConfig, compute_reward
from rlm import BUDGETS, RLM, Batcher, default_budgets, strip_eos
import tasks as tasks_module
from tasks import FAMILIES, cheap_answers, load_jsonl, make_suite, score
from trace import Cost, dependencies

METHODS = {
    "rlm": dict(allow_async=True, allow_rlm_query=True),
    "rlm-sync": dict(allow_async=False, allow_rlm_query=True),
    "rlm-depth1": dict(allow_async=True, allow_rlm_query=False),
    "direct": None,
}
TEACHER = "teacher"  # one more method: the scripted teacher of teacher.py, one strategy per task, uniform

# Question wordings: "seen" are the templates training draws from, "held_out" ones it never sees (for the
# families whose generator takes a `wording`; see worded).
WORDINGS = ("seen", "held_out")

# RLM settings for evaluation: the CPU preset, as train.py's (which passes its own); `python eval.py`
# takes the preset of its machine (rlm.default_budgets).
DEFAULT_RLM = BUDGETS["cpu"]


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


async def evaluate_one(batcher, task, method, length, rlm_settings, reward_config, keep_trace=False):
    rollout = None  # the direct baseline has no call tree
    if method == TEACHER:
        from teacher import STRATEGIES, TeacherPolicy

        strategies = STRATEGIES.get(task.family, ("regex",))
        strategy = strategies[task.seed % len(strategies)]
        teacher = Batcher(TeacherPolicy(batcher.policy, strategy), gather_window=0.0)
        rollout = await RLM(teacher, **rlm_settings).run(task.query, task.context, seed=task.seed)
        answer, cost, extra = rollout.answer, rollout.cost, {"strategy": strategy}
    elif METHODS[method] is None:
        result = await direct_answer(batcher, task.query, task.context,
                                     context_window=rlm_settings.get("max_call_tokens", 8192))
        answer, cost, extra = result.answer, result.cost, {"context_cut": result.cut}
    else:
        rollout = await RLM(batcher, **{**rlm_settings, **METHODS[method]}).run(task.query, task.context,
                                                                                seed=task.seed)
        answer, cost, extra = rollout.answer, rollout.cost, {}
    extra.update(strategy_profile(rollout))
    if rollout is None:  # the direct baseline's one reply is its answer, and can repeat itself too
        extra.update(replies=1, degenerate_replies=int(is_degenerate(answer)))
    return run_record(task, method, length, answer, cost, extra, reward_config,
                      **({"trace": rollout} if keep_trace else {}))


def run_record(task, method, length, answer, cost, extra, reward_config, **more):
    """One run's line of the results: what it answered, its score and reward, what it cost."""
    reward = compute_reward(score(task, answer), cost, reward_config)
    return {"method": method, "family": task.family, "wording": getattr(task, "wording", "seen"),
            "length": length, "seed": task.seed,
            "answer": answer, "truth": task.answer, **reward,
            "prompt_tokens": cost.prompt_tokens, "generated_tokens": cost.generated_tokens,
            "llm_query": cost.sub_calls["llm_query"], "rlm_query": cost.sub_calls["rlm_query"],
            "depth": cost.depth, "critical_path": cost.critical_path_tokens,
            "wall_seconds": cost.wall_seconds, **extra, **more}


def failed_record(task, method, length, error, reward_config, keep_trace=False):
    """The record of a run that raised: no answer, score 0, and the error, so that one bad task
    costs its own row and nothing else (and cancelling its neighbours cannot hang the batch)."""
    extra = {**strategy_profile(None), "turns": 0, "context_cut": False}
    return run_record(task, method, length, None, Cost(), extra, reward_config,
                      error=f"{type(error).__name__}: {error}", **({"trace": None} if keep_trace else {}))


async def evaluate(batcher, tasks_by_length, methods, rlm_settings=None, reward_config=None,
                   max_concurrent=32, progress=True, keep_traces=False):
    """Run every (task, method) concurrently through one batcher -> list of per-run records.

    keep_traces: each record also holds its Rollout as "trace" (None for direct), for view.py."""
    from tqdm import tqdm

    rlm_settings = {**DEFAULT_RLM, **(rlm_settings or {})}
    reward_config = reward_config or RewardConfig.for_rollouts(rlm_settings["max_generated_tokens"])
    unknown = [m for m in methods if m not in METHODS and m != TEACHER]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS) + [TEACHER]}")
    jobs = [(task, method, length) for length, tasks in tasks_by_length.items()
            for task in tasks for method in methods]
    limit = asyncio.Semaphore(max_concurrent)  # each RLM holds a REPL process while it runs
    bar = tqdm(total=len(jobs), desc="eval", disable=not progress)

    async def job(task, method, length):
        async with limit:
            try:
                record = await evaluate_one(batcher, task, method, length, rlm_settings, reward_config, keep_traces)
            except Exception as e:  # fails this run alone; main() reports it
                record = failed_record(task, method, length, e, reward_config, keep_traces)
        bar.update(1)
        return record

    records = await asyncio.gather(*[job(*j) for j in jobs])
    bar.close()
    return list(records)


def wilson(successes, n, z=1.96):
    """95% Wilson score interval (lo, hi) of a rate, from successes out of n.

    Also used for mean credit in [0, 1] (a count's partial credit, F1), with successes = the sum
    of credits: a variable in [0, 1] with mean p has variance at most p(1 - p), the Bernoulli
    variance the interval is built on, so there it is conservative."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def fisher_exact(k1, n1, k2, n2):
    """Two-sided p-value of Fisher's exact test that k1/n1 and k2/n2 share one rate: the chance,
    with the margins fixed, of a table no likelier than the one observed."""
    total, k = n1 + n2, k1 + k2
    prob = lambda a: math.comb(n1, a) * math.comb(n2, k - a) / math.comb(total, k)  # noqa: E731
    observed = prob(k1)
    return min(1.0, sum(p for a in range(max(0, k - n2), min(k, n1) + 1)
                        if (p := prob(a)) <= observed * (1 + 1e-9)))


def summarize(records):
    """Mean of each figure per (policy, method, family, wording, length); policies in the order first
    seen. Error and repetition figures are pooled over the group's runs, each rate with its n."""
    keys = ["correctness", "reward", "prompt_tokens", "generated_tokens", "llm_query", "rlm_query",
            "depth", "critical_path", "wall_seconds", "turns", "sub_calls"]
    groups, policies, methods = {}, {}, list(METHODS) + [TEACHER]
    for r in records:
        policies.setdefault(r.get("policy", ""), len(policies))
        key = (r.get("policy", ""), r["method"], r["family"], r.get("wording", "seen"), r["length"])
        groups.setdefault(key, []).append(r)
    rows = []
    # str(family): a JSONL file may name families with numbers and words, which do not sort together
    order = lambda kv: (policies[kv[0][0]], methods.index(kv[0][1]), str(kv[0][2]),  # noqa: E731
                        _wording_order(kv[0][3]), kv[0][4])
    for (label, method, family, wording, length), rs in sorted(groups.items(), key=order):
        row = {"policy": label, "method": method, "family": family, "wording": wording, "length": length,
               "n": len(rs)}
        row.update({k: sum(r[k] for r in rs) / len(rs) for k in keys})
        row["answered"] = sum(r["answer"] is not None for r in rs) / len(rs)
        row["accuracy_ci"] = wilson(sum(r["correctness"] for r in rs), len(rs))
        row["solved"] = sum(r["correctness"] >= 1.0 for r in rs)   # full credit, for exact tests between rows
        concurrent, sub_calls = sum(r["concurrent"] for r in rs), sum(r["sub_calls"] for r in rs)
        row["concurrent_share"] = concurrent / max(1, sub_calls)
        row["concurrent_ci"] = wilson(concurrent, sub_calls)
        deep = sum(r["depth"] >= 2 for r in rs)  # rollouts whose tree reached a second level of sub-calls
        row["second_level"], row["second_level_ci"] = deep / len(rs), wilson(deep, len(rs))
        row.update(error_rates(rs))
        if method == "direct":
            row["context_cut"] = sum(r["context_cut"] for r in rs) / len(rs)
        if any("error" in r for r in rs):
            row["failed"] = sum("error" in r for r in rs)  # runs that raised, scored 0
        rows.append(row)
    return rows


def _wording_order(wording):
    return (WORDINGS.index(wording), "") if wording in WORDINGS else (len(WORDINGS), str(wording))


def error_rates(records):
    """How a group of runs met its own mistakes, pooled over the runs (records from before these
    counts existed count as none):
    errors               mean failed cells per run (see cell_errors)
    changed_after_error  share of failed turns followed by code whose next code differs: the same
                         cell again after a traceback cannot fix it; n = errors_followed
    recovered            share of runs with a failed cell whose answer was fully correct; n = with_errors
    degenerate           share of replies that repeat themselves (is_degenerate); n = replies
    A rate with n = 0 is None, as is its interval: nothing was measured."""
    count = lambda key: sum(r.get(key, 0) for r in records)  # noqa: E731
    with_errors = [r for r in records if r.get("errors", 0) > 0]
    rates = {"errors": count("errors") / max(1, len(records))}
    for name, hits, n, n_name in (
            ("changed_after_error", count("errors_changed"), count("errors_followed"), "errors_followed"),
            ("recovered", sum(r["correctness"] >= 1.0 for r in with_errors), len(with_errors), "with_errors"),
            ("degenerate", count("degenerate_replies"), count("replies"), "replies")):
        rates.update({name: hits / n if n else None, f"{name}_ci": wilson(hits, n) if n else None, n_name: n})
    return rates


def strategy_profile(rollout):
    """How a rollout went about it: root turns, sub-calls, and how many of them ran concurrently
    with another sub-call of the same turn (neither waited for the other, by trace.dependencies);
    and how it met its mistakes (error_profile). None (the direct baseline): one turn, nothing else."""
    if rollout is None:
        return {"turns": 1, "sub_calls": 0, "concurrent": 0, **error_profile(None)}
    sub_calls = concurrent = 0
    for call in rollout.calls:
        for turn in call.turns:
            records, after = dependencies(turn["sub_calls"])
            waited = [set(a) for a in after]
            sub_calls += len(records)
            concurrent += sum(any(j != i and j not in waited[i] and i not in waited[j] for j in range(len(records)))
                              for i in range(len(records)))
    return {"turns": sum(t["reply"] is not None for t in rollout.calls[0].turns), "sub_calls": sub_calls,
            "concurrent": concurrent, **error_profile(rollout)}


def recursion_profile(rollouts):
    """How a batch of rollouts recursed, pooled: sub-calls per rollout, the share of sub-calls run
    concurrently (strategy_profile), and the share of rollouts that reached a second level."""
    profiles = [strategy_profile(r) for r in rollouts]
    sub_calls = sum(p["sub_calls"] for p in profiles)
    return {"sub_calls": sub_calls / max(1, len(rollouts)),
            "concurrent_share": sum(p["concurrent"] for p in profiles) / max(1, sub_calls),
            "second_level": sum(r.cost.depth >= 2 for r in rollouts) / max(1, len(rollouts))}


# How repl.py shows a failed cell: a traceback (chained exceptions print one per link, joined by one
# of the CHAINED sentences); a syntax error, which has no frames, as its bare 'File "<repl>", line N'
# location; and a cell that ignored the interrupt at its time limit, in one sentence.
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("The above exception was the direct cause of the following exception:",
           "During handling of the above exception, another exception occurred:")
SYNTAX_ERROR = re.compile(r'^\s*File "<repl>", line \d+$', re.MULTILINE)
HARD_TIMEOUT = "and did not stop when interrupted"


def cell_errors(observation, cells):
    """How many of a turn's cells failed with a Python error (or ran past their time limit), from
    the turn's observation, which joins the outputs of its cells: at most one per cell."""
    if not observation:
        return 0
    found = (observation.count(TRACEBACK) - sum(observation.count(c) for c in CHAINED)
             + len(SYNTAX_ERROR.findall(observation)) + observation.count(HARD_TIMEOUT))
    return max(0, min(cells, found))


def _same_code(a, b):
    return " ".join(" ".join(a["code"]).split()) == " ".join(" ".join(b["code"]).split())


def error_profile(rollout):
    """Counts over every call and turn of a rollout, for error_rates to pool: failed cells, failed
    turns followed by a turn of the same call with code, how many of those changed the code, and
    replies, how many of them degenerate. None: all zero."""
    counts = {"errors": 0, "errors_followed": 0, "errors_changed": 0, "replies": 0, "degenerate_replies": 0}
    for call in rollout.calls if rollout is not None else []:
        for turn, after in zip(call.turns, call.turns[1:] + [None]):
            failed = cell_errors(turn["observation"], len(turn["code"]))
            counts["errors"] += failed
            if failed and after is not None and after["code"]:
                counts["errors_followed"] += 1
                counts["errors_changed"] += not _same_code(turn, after)
            if turn["reply"] is not None:
                counts["replies"] += 1
                counts["degenerate_replies"] += is_degenerate(turn["reply"])
    return counts


REPEATED_RUN = re.compile(r"(.{20,}?)\1{2,}", re.DOTALL)


def is_degenerate(text):
    """Whether a reply has fallen into repetition, the loop a small model falls into when it has
    lost the thread: one line of at least 8 non-blank characters 3 or more times, or one run of
    at least 20 characters 3 or more times back to back ("print(x)print(x)print(x)", longer).
    Short lines (a fence, "else:") may repeat in a sound reply, and so may a line or two."""
    lines = ["".join(line.split()) for line in str(text or "").splitlines()]
    seen = {}
    for line in lines:
        if len(line) >= 8:
            seen[line] = seen.get(line, 0) + 1
            if seen[line] >= 3:
                return True
    text = str(text or "")
    # A run repeated 3 times holds one 20-character window 3 times; most replies have none, and
    # the regex (quadratic in the length: about 0.1 s on 2,000 characters) runs only when one does.
    windows = {}
    for i in range(len(text) - 19):
        window = text[i:i + 20]
        windows[window] = windows.get(window, 0) + 1
        if windows[window] >= 3:
            return REPEATED_RUN.search(text) is not None
    return False


def format_table(rows):
    """One line per row: accuracy with its 95% interval, reward, cost and the strategy profile
    (conc = share of sub-calls run concurrently; wording: the question templates, seen in training
    or held out)."""
    header = (f"{'policy':<18} {'method':<10} {'family':<9} {'wording':<7} {'length':>8} {'n':>3} {'acc':>5} "
              f"{'95% CI':>11} {'reward':>7} {'prompt':>7} {'gen':>5} {'crit':>5} {'turns':>5} {'subs':>5} "
              f"{'conc':>5} {'depth':>5} {'wall_s':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        note = f"  (context cut in {r['context_cut']:.0%})" if r.get("context_cut") else ""
        note += f"  ({r['failed']} failed, scored 0: see \"error\" in the records)" if r.get("failed") else ""
        lines.append(f"{r['policy'][:18]:<18} {r['method']:<10} {r['family']:<9} {_wording(r):<7} {r['length']:>8,} "
                     f"{r['n']:>3} {r['correctness']:>5.2f} {_interval(r.get('accuracy_ci')):>11} {r['reward']:>7.4f} "
                     f"{r['prompt_tokens']:>7.0f} {r['generated_tokens']:>5.0f} {r['critical_path']:>5.0f} "
                     f"{r['turns']:>5.1f} {r['sub_calls']:>5.1f} {r['concurrent_share']:>5.0%} {r['depth']:>5.1f} "
                     f"{r['wall_seconds']:>6.1f}{note}")
    return "\n".join(lines)


def format_errors(rows):
    """A second table, of how each row met its mistakes (error_rates): err/run = failed cells per
    run; changed = share of failed turns whose next code differs; recov = share of runs with a
    failed cell that ended correct; degen = share of replies that repeat themselves. Each rate
    with its 95% interval and its n ("of"); "-" where n is 0."""
    header = (f"{'policy':<18} {'method':<10} {'family':<9} {'wording':<7} {'length':>8} {'n':>3} {'err/run':>7} "
              + " ".join(f"{name:>7} {'95% CI':>11} {'of':>5}" for name in ("changed", "recov", "degen")))
    lines = [header, "-" * len(header)]
    for r in rows:
        rates = " ".join(f"{_rate(r.get(name)):>7} {_interval(r.get(name + '_ci')):>11} {r.get(n, 0):>5}"
                         for name, n in (("changed_after_error", "errors_followed"), ("recovered", "with_errors"),
                                         ("degenerate", "replies")))
        lines.append(f"{r['policy'][:18]:<18} {r['method']:<10} {r['family']:<9} {_wording(r):<7} {r['length']:>8,} "
                     f"{r['n']:>3} {r.get('errors', 0):>7.2f} {rates}")
    return "\n".join(lines)


def _wording(row):
    """Rows from before wordings existed were all in the seen wording."""
    return {"held_out": "held"}.get(row.get("wording", "seen"), str(row.get("wording", "seen")))[:7]


def _rate(rate):
    return "-" if rate is None else f"{rate:.0%}"


def _interval(ci):
    return "-" if ci is None else f"{ci[0]:.2f}-{ci[1]:.2f}"


def best_constant(tasks):
    """(answer, mean credit) of the one answer that earns most when given to every task of a
    cell: an oracle constant, chosen knowing the cell's answers, so an upper bound on what any
    constant earns there. Candidates are the cell's own answers and, for counts, every whole
    number up to the largest."""
    candidates = {json.dumps(t.answer) if isinstance(t.answer, list) else str(t.answer) for t in tasks}
    if tasks and all(t.scoring == "number" for t in tasks):
        candidates |= {str(i) for i in range(int(max(float(t.answer) for t in tasks)) + 1)}
    credit = {c: sum(score(t, c) for t in tasks) / len(tasks) for c in sorted(candidates)}
    return max(credit.items(), key=lambda kv: (kv[1], kv[0]), default=(None, 0.0))


def floor_rows(tasks_by_length):
    """What answers that never do the task earn, per family, wording and length: each cheap answer
    of tasks.cheap_answers (the whole context, a key-blind first match, every candidate at once)
    and the best constant. A policy's accuracy means something only well above these."""
    rows = []
    for length, tasks in tasks_by_length.items():
        groups = {}
        for t in tasks:
            groups.setdefault((str(t.family), getattr(t, "wording", "seen")), []).append(t)
        for (family, wording), ts in sorted(groups.items(), key=lambda kv: (kv[0][0], _wording_order(kv[0][1]))):
            credit = {}
            for t in ts:
                scored = {}   # pairs' first match is its every candidate: a list of every pair, scored once
                for name, answer in cheap_answers(t).items():
                    if answer not in scored:
                        scored[answer] = score(t, answer)
                    credit.setdefault(name, []).append(scored[answer])
            row = {"family": family, "wording": wording, "length": length, "n": len(ts),
                   **{name: sum(v) / len(v) for name, v in credit.items()}}
            row["best constant"] = best_constant(ts)[1]
            rows.append(row)
    return rows


def format_floor(rows):
    """The floor as a table: mean credit of each cheap answer per family, wording and length."""
    names = ["whole context", "first match", "every candidate", "best constant"]
    header = f"{'floor: family':<15} {'wording':<7} {'length':>8} {'n':>3} " + " ".join(f"{n:>15}" for n in names)
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['family'][:15]:<15} {_wording(r):<7} {r['length']:>8,} {r['n']:>3} "
                     + " ".join(f"{r[n]:>15.3f}" if n in r else f"{'-':>15}" for n in names))
    return "\n".join(lines)


def worded(family):
    """Whether tasks.py can ask this family's questions in other wordings (its generator takes a
    `wording` variant); the others have one wording, the one training sees."""
    generator = tasks_module._GENERATORS.get(family)
    return generator is not None and "wording" in inspect.signature(generator).parameters


def held_out_suite(families, lengths, n, split="eval", start=0, wordings=("seen",)):
    """Tasks by length, from a split that training never draws from (tasks.task_seed gives each
    split its own seeds): "eval" for reported figures, "validation" for the curriculum's choices.

    wordings: "seen" (the templates training draws from) and/or "held_out" (ones it never sees: does
    the policy answer the question, or match a string?). Each wording gets the same n tasks per family
    and length; "held_out" only for the families that have it (worded), so none is counted twice."""
    suite = {length: [] for length in lengths}
    for wording in wordings:
        chosen = [f for f in families if wording == "seen" or worded(f)]
        if not chosen:
            continue
        variants = {f: {"wording": wording} for f in chosen if worded(f)}
        for length in lengths:
            tasks = make_suite(chosen, [length], n, split=split, start=start, variants=variants)
            for task in tasks:  # said here too, in case tasks.py does not record it on the task
                if getattr(task, "wording", "seen") != wording:
                    task.wording = wording
            suite[length] += tasks
    return suite


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="a saved LoRA adapter folder")
    parser.add_argument("--adapters", default=None,
                        help="several, as NAME=FOLDER,NAME=FOLDER (names distinct): one row each, evaluated "
                             "with --methods; not with --adapter")
    parser.add_argument("--baselines", type=int, default=0,
                        help="at least 0: also evaluate the untrained model (base RLM, direct) and the teacher on the "
                             "first N tasks; needs --adapter or --adapters (0: none)")
    parser.add_argument("--tasks", default="niah,multihop", help=f"comma-separated, from {','.join(FAMILIES)}")
    parser.add_argument("--lengths", default="4000,16000",
                        help="context lengths in characters, comma-separated (each family has a minimum, "
                             "about 500 to 1,400)")
    parser.add_argument("--n", type=int, default=1, help="tasks per family and length, at least 1")
    parser.add_argument("--split", default="eval", choices=["eval", "validation"],
                        help="which held-out seed space the tasks come from (training never draws from either)")
    parser.add_argument("--start", type=int, default=0, help="index of the first task in the split, at least 0")
    parser.add_argument("--wording", default="seen",
                        help="question wordings, comma-separated, from seen (training's templates) and held_out "
                             "(templates training never sees; only families that have them, tasks.py)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {','.join(list(METHODS) + [TEACHER])}")
    parser.add_argument("--jsonl", default=None, help="evaluate records from this JSONL file instead "
                        '(one {"context", "question", "answer"} object a line, UTF-8)')
    for name, what in (("max_turns", "turns before the last one, at least 0"),
                       ("max_new_tokens", "tokens a reply, at least 1"),
                       ("max_generated_tokens", "tokens a rollout, at least 1")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"{what}; default: {BUDGETS['cpu'][name]} on CPU, {BUDGETS['gpu'][name]} on GPU "
                                 "(rlm.BUDGETS)")
    parser.add_argument("--temperature", type=float, default=0.0, help="at least 0; 0 is greedy")
    parser.add_argument("--out", default="out/eval.json", help="the results, as JSON (not an input file)")
    parser.add_argument("--traces", default=None,
                        help="also write each record with its rollout here, as JSONL; `python view.py` makes a page of it")
    return parser.parse_args(argv)


def plan(args):
    """Everything checked before a model loads -> (tasks by length, runs: [(name, adapter, methods, tasks)]).
    Raises InputError on the first problem with the files; exits on bad numbers."""
    methods = list(dict.fromkeys(args.methods.split(",")))
    unknown = [m for m in methods if m not in METHODS and m != TEACHER]
    families = args.tasks.split(",")
    wordings = list(dict.fromkeys(args.wording.split(",")))
    lengths, lengths_problem = int_list("--lengths", args.lengths, low=1)
    refuse("eval.py", [
        at_least("--n", args.n, 1), at_least("--baselines", args.baselines, 0),
        at_least("--temperature", args.temperature, 0),
        args.max_turns is not None and at_least("--max-turns", args.max_turns, 0),
        args.max_new_tokens is not None and at_least("--max-new-tokens", args.max_new_tokens, 1),
        args.max_generated_tokens is not None and at_least("--max-generated-tokens", args.max_generated_tokens, 1),
        unknown and f"unknown --methods {','.join(unknown)}; choose from {','.join(list(METHODS) + [TEACHER])}",
        not args.jsonl and any(f not in FAMILIES for f in families)
        and f"unknown --tasks {args.tasks!r}; choose from {','.join(FAMILIES)}",
        not args.jsonl and lengths_problem,
        any(w not in WORDINGS for w in wordings)
        and f"unknown --wording {args.wording!r}; choose from {','.join(WORDINGS)}, comma-separated",
        "held_out" in wordings and args.jsonl and "--wording held_out rewords generated tasks; a --jsonl file "
        "has its own wording: leave --wording out",
        "held_out" in wordings and not args.jsonl and all(f in FAMILIES for f in families)
        and not any(worded(f) for f in families)
        and f"--wording held_out: none of --tasks {args.tasks} has held-out wordings in tasks.py yet "
            f"(families that do: {','.join(f for f in FAMILIES if worded(f)) or 'none'})",
        args.adapter and args.adapters and "give --adapter or --adapters, not both",
        args.baselines and not (args.adapter or args.adapters)
        and "--baselines compares adapters with the untrained model, which this run evaluates already; "
            "give --adapter or --adapters, or leave --baselines out"])
    if args.adapters:
        runs = []
        for item in args.adapters.split(","):
            name, eq, folder = (part.strip() for part in item.partition("="))
            if not eq or not name:  # (NAME= with no folder is the untrained model, by that name)
                raise InputError(f"--adapters entry {item!r} is not NAME=FOLDER; write e.g. "
                                 '--adapters "warm=out/warm/adapter,rl=out/rl/adapter"')
            if name in [r[0] for r in runs] or args.baselines and name == "base":
                raise InputError(f"--adapters names {name!r} twice (\"base\" is the baselines' row); "
                                 "give each adapter its own name")
            runs.append((name, folder or None))
    else:
        runs = [("base" if args.adapter is None else args.adapter, args.adapter)]
    for _, folder in runs:  # all of them now: a bad second one must not cost the first one's evaluation
        if folder:
            adapter_folder(folder, "--adapters" if args.adapters else "--adapter")
    if args.jsonl:
        read_text(args.jsonl, "--jsonl", strict=True)  # a missing, binary or non-UTF-8 file, said plainly
        try:
            loaded = load_jsonl(args.jsonl)
        except ValueError as e:
            raise InputError(str(e)) from None
        if not loaded:
            raise InputError(f"--jsonl {args.jsonl} holds no records; write one "
                             '{"context": ..., "question": ..., "answer": ...} object a line')
        tasks_by_length = {}
        for task in loaded:
            tasks_by_length.setdefault(len(str(task.context)), []).append(task)
    writable(args.out, "--out", inputs=[args.jsonl])
    if args.traces:
        if os.path.abspath(args.traces) == os.path.abspath(args.out):
            raise InputError("--traces and --out are the same file; give them different paths")
        writable(args.traces, "--traces", inputs=[args.jsonl])
    if not args.jsonl:
        try:
            tasks_by_length = held_out_suite(families, lengths, args.n, split=args.split, start=args.start,
                                            wordings=wordings)
        except ValueError as e:  # e.g. a length too small for a family: tasks.py says which and how small
            raise InputError(f"--lengths: {e}") from None
    runs = [(name, folder, methods, tasks_by_length) for name, folder in runs]
    if args.baselines:
        first = {length: tasks[:args.baselines] for length, tasks in tasks_by_length.items()}
        runs.insert(0, ("base", None, ["rlm", "direct", TEACHER], first))
    return tasks_by_length, runs


def save(args, records, floor):
    """Write the results so far (called after each policy, so a later failure keeps them)."""
    if args.traces:
        with open(args.traces, "w") as f:
            for r in records:
                f.write(json.dumps({**r, "trace": r["trace"] and dataclasses.asdict(r["trace"])}) + "\n")
    records = [{k: v for k, v in r.items() if k != "trace"} for r in records]
    rows = summarize(records)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "summary": rows, "floor": floor, "records": records}, f, indent=1, default=str)
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        _, runs = plan(args)
    except InputError as e:
        sys.exit(f"eval.py: {e}")

    from lora import load_policy

    settings = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in default_budgets().items()}
    floor = floor_rows(runs[-1][3]) if runs else []   # every run's tasks are the main suite or its first ones
    records = []
    for name, folder, run_methods, suite in runs:
        print(f"loading {args.model or 'SmolLM2-135M-Instruct'}" + (f" with adapter {folder}" if folder else ""),
              flush=True)
        policy = load_policy(args.model, adapter=folder)
        batcher = Batcher(policy, temperature=args.temperature)
        run = asyncio.run(evaluate(batcher, suite, run_methods, settings, keep_traces=bool(args.traces)))
        # rows are named by the policy: "base", "direct", "teacher", or the adapter's name
        records += [{**r, "policy": name if r["method"] == "rlm" else r["method"] if name == "base"
                     else f"{name} ({r['method']})"} for r in run]
        rows = save(args, records, floor)
    print(format_table(rows))
    print("\nhow the runs met their mistakes (failed cells, the next code, recovery, replies that repeat themselves):")
    print(format_errors(rows))
    print("\nwhat answers that never do the task earn (mean credit; best constant chosen knowing the answers):")
    print(format_floor(floor))
    if args.traces:
        print(f"wrote {args.traces}; see it with: python view.py {args.traces}")
    print(f"wrote {args.out}")
    failed = [r for r in records if "error" in r]
    if failed:
        sys.exit(f"eval.py: {len(failed)} of {len(records)} runs raised and were scored 0, the first with "
                 f"{failed[0]['error']!r}; see \"error\" in the records of {args.out}")


if __name__ == "__main__":
    main()
