"""
Does RL learn to recurse? The whole experiment in one command: a warm start that clones the
original RLM's habits, then cost-aware RL and accuracy-only RL from it (the same tasks and
steps, several training seeds each), all evaluated on held-out tasks.

    python recurse.py --preset short      # tally, one training seed per arm, small n: run this one first
    python recurse.py                     # the full experiment: tally, niah, multihop, two seeds per arm
    python recurse.py --preset gpu        # the GPU-sized version (not run yet)
    python recurse.py --report            # the tables and the figure again, from what --out_dir holds
    python push.py --preset short --run cost-s0        # what one RL update of a run did to the plan (push.py)

The steps, each skipped when its output is already there (so a stopped run goes on where it was):
  1. warm start   train.py --steps 0 --warm_strategies habits: teacher.HABITS, 80% of the
                  demonstrations the original RLM's habits (sub-calls one after another, child RLMs
                  on halves of a niah context, an llm_query per multihop hop), 20% the efficient
                  strategy (asyncio.gather, one regex)                 -> out_dir/warm-demos
                  then, from that adapter, one more epoch of the same demonstrations mixed with
                  --warm_drills: one-call demonstrations of the tally sub-model's job (label the
                  notes of a prompt), cheap rows. Drills alone made the root forget its code.
                                                                     -> out_dir/warm-drills
                  then the habit demonstrations alone again, every batch holding the habit mix
                  (MIX, --warm_mix_batches)                             -> out_dir/warm-mix
                  then the same demonstrations with many more label drills (LABELS): the sub-model
                  labelled about 0.7 of held-out notes in place               -> out_dir/warm-labels
                  then root drills, the root's reply alone at sizes on both sides of one level's
                  reach, with label drills (ROOTS, --warm_root_drills): the roots wrote the
                  one-level program at 3,000 and 6,000 characters most of the time  -> out_dir/warm
  2. RL arms      train.py --init_adapter out_dir/warm/adapter for each arm and training seed:
                  "cost" (the reward's cost and latency weights, ARMS) and "accuracy" (both 0)
                                                                            -> out_dir/<arm>-s<seed>
  3. evaluation   every adapter on held-out tasks (the eval split, never trained on): sampled at
                  the RL temperature (seeded per task) and greedy; and `direct` (the base model with
                  the context in its prompt) on tally                      -> out_dir/eval/*.jsonl
                  and each adapter's odds of the concurrent plan where tally's code chooses it
                  (plan_preference: exact, where sampled rollouts give a few dozen draws), the
                  chance it writes either program at all (the mass), and the sub-model's own
                  accuracy on held-out pieces of notes (label_skill)  -> out_dir/eval/*-plans.json
  4. report       out_dir/results.md: per family and length, accuracy, sub-calls per rollout, the
                  share of sub-calls run concurrently, the share of rollouts that used a second
                  level, the critical path and weighted tokens, each with a 95% interval (Wilson for
                  rates, a bootstrap over rollouts for means and pooled shares; the arms pool their
                  training seeds); the plan preference; the sub-model's accuracy at labelling
                  notes; the cheap answers' floor. out_dir/steps.png: the same quantities over RL
                  steps, one line per run, and the plan preference of each step's adapter.

Every rollout runs under per-call limits (rlm.RLM's max_call_sub_calls=4, max_prompt_chars=800),
stated in the system prompt: one level of calls covers about 24 notes of tally, so its longer
inputs need a child RLM per part. RL trains the rows of the RLM calls, root and children
(--train_calls rlm), whose code chooses how to call: the plain completions' prompts are most of a
step's tokens, and the sub-model's skill (labelling notes) comes from the warm start's drills. Each
preset's lr is sized from the measured push of the cost terms on the plan (push.py, projection).
"""

import argparse
import asyncio
import dataclasses
import inspect
import json
import math
import os

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random
import subprocess
import sys
import time

from eval import best_constant, evaluate, wilson
from reward import RewardConfig
from tasks import TOPIC_OF, cheap_answers, make_task, score, task_seed
from teacher import (TALLY_ASK, TALLY_LIMITS, TALLY_NOTES, TALLY_PIECES, TALLY_QUERY,
                     TALLY_STRATEGIES, first_group, tally_turn)

FAMILIES = ("tally", "niah", "multihop")  # the experiment's families, in the report's order
LIMITS = TALLY_LIMITS  # why tally needs depth (see the docstring)
ROLLOUTS = dict(max_depth=2, max_turns=2, max_new_tokens=256, max_sub_calls=24, max_generated_tokens=4096, **LIMITS)
ARMS = {"cost": dict(cost_weight=0.2, latency_weight=0.5),   # cost-aware: pays for answers, charges for both
        "accuracy": dict(cost_weight=0.0, latency_weight=0.0)}  # the same RL, correctness only
# The reward's budgets at the scale of these rollouts (a tally rollout's critical path is 210-1,180 tokens,
# far below the 4,096 it may generate). The latency budget is the habit's critical path at the longest
# length, so that no rollout the habit writes reaches the clip, where the penalty stops growing. The
# teacher's one program (about 225 tokens a call) takes 668 and 1,147 tokens one call after another at
# 3,000 and 6,000 characters, 416 and 417 at once (10 held-out tasks a length; README): under this budget
# concurrency is worth 0.105 and 0.30 of a reward of 1 there. The budget of 512 that runs one to five used
# was sized on an older program's paths; every sequential two-level rollout clipped it, and
# concurrency was worth about 0.09 at both lengths.
BUDGETS = dict(cost_budget=4096, latency_budget=1200)
COMMON = dict(warm_strategies="habits", curriculum=False, eval_n=0, checkpoint_every=1, lengths="1200,3000,6000",
              temperature=0.7, **ROLLOUTS, **BUDGETS)
# RL samples at 0.7 so that the warm start's minority strategies come up in a group, and steps with plain
# SGD (train.py --optimizer sgd). A fresh Adam's first update moves every weight by about lr in the sign
# of its gradient: the two arms take the same step wherever their gradients share signs (the fourth run
# in the README: both arms' concurrent plan 0.07 -> 0.001, alike to three decimals), and the step is
# spread over all 4.9M LoRA weights. SGD's step is the gradient, in proportion to the advantages (the
# fifth run; push.py). Each preset's lr is the one at which, to first order, the cost terms push the
# concurrent plan's log-odds 4 nats over the run (from the warm start's 0.15 of the odds to about 0.9):
# push.projection of the per-group pushes measured on 21 groups of the short preset's warm start
# (README, "Sixth look"; `python push.py --signal ... --latency_budget 1200`). The lr sets how far the
# plan moves, not how clearly: the correctness noise moves with it, and only more groups beat it.
# RL trains the root's and the child RLMs' rows (train_calls rlm), on GPU too, where the lr was measured:
# they write the code that chooses between sequential and concurrent sub-calls, while the plain
# completions' rows (most of a step's tokens) teach labelling, which the warm start's drills teach
# for less (see the README's "Does RL learn to recurse?").
# The warm start's last stage: the habit demonstrations again, every batch holding the habit mix
# (train.py --warm_mix_batches). Shuffled batches left the concurrent plan at about 1% of the
# policy's choices (0.3% at the RL temperature; README), far below the 20% it was shown, because
# runs of majority-only batches pushed it down; RL cannot reinforce what it never samples.
MIX = dict(warm_drills=0, warm_epochs=2, warm_batch=5, warm_lr=5e-4, warm_mix_batches=True)
# Then the sub-model and the root's depth, each the cheap way (short rows, mixed batches): the habit
# demonstrations once more among 400 label drills, then 80 root drills among 80 label drills.
# After MIX, held-out pieces of 6 notes had their label count right 0.77 of the time at the RL
# temperature (an exact tally needs every piece right), and the roots at 3,000 and 6,000 characters
# wrote the teacher's two-level program with a chance of 0.11-0.16, the one-level one (refused past
# 4 sub-calls) most of the rest (recurse.label_skill and plan_preference's mass; README).
# Since then the teacher writes one program at every size (its code reads len(notes) and chooses the
# depth); the last stage shows it in 10 whole habit demonstrations (children included) beside the
# root and label drills. From the third run's label stage, which had learnt the two programs of
# before, this stage alone put a mass of 0.87-0.90 on the one program at every length and level.
LABELS = dict(warm_drills=400, warm_epochs=1, warm_batch=21, warm_lr=5e-4, warm_mix_batches=True)
ROOTS = dict(warm_demos=10, warm_drills=80, warm_root_drills=80, warm_epochs=1, warm_batch=10, warm_lr=5e-4,
             warm_mix_batches=True)
PRESETS = {
    # tally alone: its lengths are 1, 2 and 3 parts of 24 notes (one level, then a second one).
    "short": dict(train=dict(families="tally", warm_demos=20, warm_lengths="1200,3000", warm_epochs=3, steps=8,
                             tasks_per_step=3, group_size=6, optimizer="sgd", lr=1000,
                             train_calls="rlm"),
                  drills=dict(warm_drills=120, warm_epochs=1, warm_batch=8, warm_lr=5e-4),
                  seeds=(0,), n_sampled=8, n_greedy=3, n_direct=5, n_plans=10, n_plans_steps=4,
                  eval_lengths={"tally": (1200, 3000, 6000)}),
    "full": dict(train=dict(families="tally,niah,multihop", warm_demos=20, warm_lengths="1200,3000", warm_epochs=3,
                            steps=8, tasks_per_step=3, group_size=6, optimizer="sgd", lr=2900,
                            train_calls="rlm"),
                 drills=dict(warm_drills=120, warm_epochs=1, warm_batch=8, warm_lr=5e-4),
                 seeds=(0, 1), n_sampled=15, n_greedy=8, n_direct=10, n_plans=30, n_plans_steps=10,
                 eval_lengths={"tally": (1200, 3000, 6000), "niah": (3000,), "multihop": (3000,)}),
    "gpu": dict(train=dict(families="tally,niah,multihop", warm_demos=40, warm_lengths="1200,3000,6000",
                           warm_epochs=3, steps=60, tasks_per_step=16, group_size=8, optimizer="sgd", lr=400,
                           train_calls="rlm",
                           micro_batch_tokens=32768, warm_batch=8, checkpoint_every=10),
                drills=dict(warm_drills=1000, warm_epochs=1, warm_batch=32, warm_lr=5e-4),
                seeds=(0, 1, 2), n_sampled=32, n_greedy=16, n_direct=30, n_plans=50, n_plans_steps=20,
                eval_lengths={"tally": (1200, 3000, 6000), "niah": (3000, 6000), "multihop": (3000, 6000)}),
}


def as_flags(values):
    """{name: value} -> train.py's command line (a bool is --name or --no-name)."""
    return [f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k}={v}" for k, v in values.items()]


def run_flags(preset):
    """The train.py flags of each run of the experiment: {run name: flags}, in the order they run."""
    flags = {**COMMON, **preset["train"]}
    runs = {"warm-demos": {**flags, "steps": 0},
            "warm-drills": {**flags, **preset["drills"], "steps": 0, "init_adapter": "{out_dir}/warm-demos/adapter"},
            "warm-mix": {**flags, **MIX, "steps": 0, "init_adapter": "{out_dir}/warm-drills/adapter"},
            "warm-labels": {**flags, **LABELS, "steps": 0, "init_adapter": "{out_dir}/warm-mix/adapter"},
            "warm": {**flags, **ROOTS, "steps": 0, "init_adapter": "{out_dir}/warm-labels/adapter"}}
    rl = {**flags, "warm_demos": 0, "warm_drills": 0, "init_adapter": "{out_dir}/warm/adapter", "keep_adapters": True,
          "all_samples": True}
    for arm, weights in ARMS.items():
        for seed in preset["seeds"]:
            runs[f"{arm}-s{seed}"] = {**rl, **weights, "seed": seed}
    return runs


def train(out_dir, flags):
    """One train.py run into out_dir, skipped when its adapter is there, resumed when it has a checkpoint."""
    if os.path.exists(os.path.join(out_dir, "adapter", "adapter_config.json")):
        print(f"  {out_dir}: done already", flush=True)
        return
    if os.path.exists(os.path.join(out_dir, "checkpoint")):
        argv = ["--resume", "--out_dir", out_dir]
    else:
        argv = ["--overwrite", "--out_dir", out_dir] + as_flags(flags)
    t0 = time.time()
    subprocess.run([sys.executable, "train.py", *argv], check=True)
    print(f"  {out_dir}: {(time.time() - t0) / 60:.1f} minutes", flush=True)


def suite(preset, n, start=0):
    """{length: [tasks]} of the held-out split, seen wording; the same call gives the same tasks."""
    by_length = {}
    for family, lengths in preset["eval_lengths"].items():
        for length in lengths:
            by_length.setdefault(length, []).extend(
                make_task(family, length, task_seed("eval", family, length, start + i)) for i in range(n))
    return by_length


def evaluate_adapter(adapter, preset, temperature, n, path, methods=("rlm",)):
    """Held-out rollouts of one adapter (None: the base model), written to path as JSONL records."""
    if os.path.exists(path):
        return
    from lora import load_policy
    from rlm import Batcher

    policy = load_policy(None, adapter=adapter)
    records = asyncio.run(evaluate(Batcher(policy, temperature=temperature), suite(preset, n), list(methods),
                                   ROLLOUTS, RewardConfig(**ARMS["cost"], **BUDGETS),
                                   keep_traces=True))
    with open(path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps({**r, "trace": r["trace"] and dataclasses.asdict(r["trace"])}, default=str) + "\n")
    os.replace(path + ".tmp", path)


def plan_prompts(policy, n, lengths):
    """Where tally's code chooses between sub-calls one after another and all at once: the held-out
    root prompts, and at lengths that need a second level the first child's prompt (the first part of
    notes, as the teacher hands it down). -> [(level, length, prompt ids, sync reply ids, async reply ids)],
    the replies the teacher's two strategies write there (teacher.tally_turn)."""
    from rlm import RLM, system_prompt, user_prompt

    preview = inspect.signature(RLM).parameters["preview_chars"].default  # what train.py's rollouts show
    rows = []
    for length in lengths:
        for i in range(n):
            task = make_task("tally", length, task_seed("eval", "tally", length, i))
            label = first_group(TALLY_QUERY.search(task.query))
            notes = task.context.splitlines()[1:]
            calls = [("root", 0, task.context)]
            if len(notes) > TALLY_NOTES * TALLY_PIECES:  # the teacher's code hands parts to children
                calls.append(("child", 1, notes[:TALLY_NOTES * TALLY_PIECES]))
            for level, depth, context in calls:
                user = user_prompt(task.query, context, preview)
                prompt = policy.chat_ids([{"role": "system", "content": system_prompt(
                                              depth < ROLLOUTS["max_depth"], True, **LIMITS)},
                                          {"role": "user", "content": user}])
                replies = [policy.encode(tally_turn(label, [], s, random.Random(0))) for s in TALLY_STRATEGIES]
                rows.append((level, length, prompt, *replies))
    return rows


def reply_logprobs(policy, prompt, replies, temperature):
    """log P_T(reply | prompt) of each reply, scored token by token as it would be sampled at
    temperature T (top_p 1), in one padded batch: a tensor [len(replies)], differentiable unless
    called under torch.no_grad()."""
    import torch

    ids = [prompt + reply for reply in replies]
    width = max(map(len, ids))
    ids_BT = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    attention_BT = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    loss_BT = torch.tensor([[0] * len(prompt) + [1] * (len(x) - len(prompt)) + [0] * (width - len(x)) for x in ids])
    return policy.logprobs(ids_BT, attention_BT, loss_BT, temperature).sum(-1)


def plan_preference(policy, rows, temperature):
    """The policy's share of the concurrent plan at each choice of plan_prompts:
    P_T(async reply) / (P_T(sync reply) + P_T(async reply)), each reply scored token by token as it
    would be sampled at temperature T (top_p 1). The two replies differ only in the lines that ask, so
    this is the policy's odds at that choice, exactly, where sampling whole rollouts measures it with
    the noise of a few dozen draws. The odds say nothing of whether the policy writes either program:
    the mass, P_T(sync reply) + P_T(async reply), does (1: it writes one of the two, token for token;
    near 0: it writes something else, whose plan the odds do not see). -> [(level, length, share, mass)]"""
    import torch

    out = []
    for level, length, prompt, sync, concurrent in rows:
        with torch.no_grad():
            logp_sync, logp_async = reply_logprobs(policy, prompt, [sync, concurrent], temperature).tolist()
        out.append((level, length, 1 / (1 + math.exp(logp_sync - logp_async)),
                    math.exp(logp_sync) + math.exp(logp_async)))
    return out


def label_pieces(n):
    """n held-out pieces of the tally sub-model's job, as the teacher's code asks for them: (the
    llm_query prompt: TALLY_ASK and TALLY_NOTES notes, the task's label, the notes' true topics).
    Eval-split tasks of 3,000 characters, one piece each, from a different place in each."""
    pieces = []
    for i in range(n):
        task = make_task("tally", 3000, task_seed("eval", "tally", 3000, i))
        notes = task.context.splitlines()[1:]
        start = TALLY_NOTES * (i % (len(notes) // TALLY_NOTES))
        piece = notes[start:start + TALLY_NOTES]
        pieces.append((TALLY_ASK + "\n".join(piece), first_group(TALLY_QUERY.search(task.query)),
                       [TOPIC_OF[note] for note in piece]))
    return pieces


def label_skill(policy, pieces, temperature, seed=0):
    """The sub-model's own accuracy on label_pieces, sampled at temperature (each piece with its own
    seed, so the figure does not depend on batching): notes labelled right in place, and pieces whose
    count of the task's label is right, which is what the root's code adds up (an exact tally needs
    every piece right). -> {notes, notes_right, pieces, pieces_right}"""
    prompts = [policy.chat_ids([{"role": "user", "content": prompt}]) for prompt, _, _ in pieces]
    samples = policy.sample(prompts, max_new_tokens=8 * TALLY_NOTES, temperature=temperature,
                            seeds=[seed + i for i in range(len(pieces))])
    notes = notes_right = pieces_right = 0
    for sample, (_, label, topics) in zip(samples, pieces):
        labels = policy.decode(sample.token_ids).split()
        notes += len(topics)
        notes_right += sum(i < len(labels) and labels[i] == t for i, t in enumerate(topics))
        pieces_right += labels.count(label) == topics.count(label)
    return {"notes": notes, "notes_right": notes_right, "pieces": len(pieces), "pieces_right": pieces_right}


def measure_plans(adapter, preset, n, temperature, path):
    """plan_preference of one adapter on n held-out tally tasks per length, and its label_skill on
    3 n held-out pieces, written to path (JSON)."""
    if os.path.exists(path):
        return
    from lora import load_policy

    write_json(path, plans_of(load_policy(None, adapter=adapter), preset, n, temperature))


def plans_of(policy, preset, n, temperature):
    """measure_plans' record for a policy in memory: {temperature, shares, labels}."""
    shares = plan_preference(policy, plan_prompts(policy, n, preset["eval_lengths"]["tally"]), temperature)
    return {"temperature": temperature, "shares": shares, "labels": label_skill(policy, label_pieces(3 * n), temperature)}


def write_json(path, record, **kw):
    """record to path as JSON, whole or not at all (a stopped run leaves no half file to skip later)."""
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, **kw)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# The report: every figure with a 95% interval


def bootstrap(values_by_rollout, stat, n=2000, seed=0):
    """95% percentile interval of stat(list of per-rollout values) over resampled rollouts."""
    rng, k = random.Random(seed), len(values_by_rollout)
    if k == 0:
        return (float("nan"), float("nan"))
    draws = sorted(stat([values_by_rollout[rng.randrange(k)] for _ in range(k)]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def share_interval(pairs):
    """95% interval of a pooled share: a bootstrap over rollouts (their sub-calls are not independent),
    or, when every resample gives the same share (none or all concurrent), Wilson over the sub-calls."""
    low, high = bootstrap(pairs, share)
    if low == high:
        return wilson(sum(p for p, _ in pairs), sum(w for _, w in pairs))
    return low, high


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def share(pairs):  # pooled share from (part, whole) per rollout
    return sum(p for p, _ in pairs) / max(1, sum(w for _, w in pairs))


def cell(records):
    """The figures of one (policy, family, length) cell."""
    n, cfg = len(records), RewardConfig()  # the reward's token weights: a prompt token counts 0.25
    solved = sum(r["correctness"] >= 1.0 for r in records)
    subs = [r["sub_calls"] for r in records]
    conc = [(r["concurrent"], r["sub_calls"]) for r in records]
    crit = [r["critical_path"] for r in records]
    weighted = [cfg.prompt_token_weight * r["prompt_tokens"] + cfg.generated_token_weight * r["generated_tokens"]
                for r in records]
    deep = sum(r["depth"] >= 2 for r in records)
    return {"n": n, "accuracy": solved / n, "accuracy_ci": wilson(solved, n),
            "sub_calls": mean(subs), "sub_calls_ci": bootstrap(subs, mean),
            "concurrent": share(conc), "concurrent_ci": share_interval(conc),
            "second_level": deep / n, "second_level_ci": wilson(deep, n),
            "critical_path": mean(crit), "critical_path_ci": bootstrap(crit, mean),
            "weighted_tokens": mean(weighted), "weighted_tokens_ci": bootstrap(weighted, mean)}


def sub_model_accuracy(records):
    """The plain completions that labelled tally notes: (notes labelled right, notes) over every trace."""
    right = total = 0
    for r in records:
        for call in (r.get("trace") or {}).get("calls", []):
            if call["kind"] != "llm_query" or not call["query"].startswith(TALLY_ASK):
                continue
            notes = [n for n in call["query"][len(TALLY_ASK):].splitlines() if n.strip()]
            labels = (call.get("answer") or "").split()
            total += len(notes)
            right += sum(i < len(labels) and labels[i] == TOPIC_OF.get(note) for i, note in enumerate(notes))
    return right, total


def load(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def load_json(path):
    return json.load(open(path)) if os.path.exists(path) else None


def fmt(x, ci, pct=False):
    if x != x:  # nan: nothing to show
        return "-"
    f = (lambda v: f"{v:.2f}") if pct else (lambda v: f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}")
    return f"{f(x)} ({f(ci[0])}-{f(ci[1])})"


def report(out_dir, preset):
    groups = {"warm": ["warm"], **{arm: [f"{arm}-s{s}" for s in preset["seeds"]] for arm in ARMS}}
    lines = ["| decoding | policy | family | length | n | accuracy | sub-calls | concurrent share | "
             "second level | critical path | weighted tokens |", "|" + " --- |" * 11]
    results = {}
    for decoding in ("sampled", "greedy"):
        for label, runs in groups.items():
            records = [r for run in runs for r in load(os.path.join(out_dir, "eval", f"{run}-{decoding}.jsonl"))]
            for key in sorted({(r["family"], r["length"]) for r in records}, key=lambda k: (FAMILIES.index(k[0]), k[1])):
                c = cell([r for r in records if (r["family"], r["length"]) == key])
                results[f"{decoding}/{label}/{key[0]}/{key[1]}"] = c
                lines.append(f"| {decoding} | {label} | {key[0]} | {key[1]:,} | {c['n']} | "
                             f"{fmt(c['accuracy'], c['accuracy_ci'], True)} | {fmt(c['sub_calls'], c['sub_calls_ci'])} | "
                             f"{fmt(c['concurrent'], c['concurrent_ci'], True)} | "
                             f"{fmt(c['second_level'], c['second_level_ci'], True)} | "
                             f"{fmt(c['critical_path'], c['critical_path_ci'])} | "
                             f"{fmt(c['weighted_tokens'], c['weighted_tokens_ci'])} |")
            right, total = sub_model_accuracy(records)
            if total:
                results[f"{decoding}/{label}/sub_model"] = {"right": right, "notes": total,
                                                            "ci": wilson(right, total)}
    plan_lines, label_lines = [], []
    for label, runs in groups.items():
        plans = [load_json(os.path.join(out_dir, "eval", f"{run}-plans.json")) or {} for run in runs]
        shares = [x for p in plans for x in p.get("shares", [])]  # (level, length, share[, mass])
        for level, length in sorted({(x[0], x[1]) for x in shares}, key=lambda k: (k[0] != "root", k[1])):
            cells = [x[2:] for x in shares if (x[0], x[1]) == (level, length)]
            xs, masses = [c[0] for c in cells], [c[1] for c in cells if len(c) > 1]
            ci = bootstrap(xs, mean)
            results[f"plans/{label}/{level}/{length}"] = {"n": len(xs), "share": mean(xs), "ci": ci}
            mass = "-"
            if masses:  # measured since the mass was added
                results[f"plans/{label}/{level}/{length}"].update(mass=mean(masses), mass_ci=bootstrap(masses, mean))
                mass = fmt(mean(masses), bootstrap(masses, mean), True)
            plan_lines.append(f"| {label} | {level} | {length:,} | {len(xs)} | {fmt(mean(xs), ci, True)} | {mass} |")
        skills = [p["labels"] for p in plans if "labels" in p]
        if skills:
            k = {key: sum(s[key] for s in skills) for key in skills[0]}
            results[f"labels/{label}"] = {**k, "notes_ci": wilson(k["notes_right"], k["notes"]),
                                          "pieces_ci": wilson(k["pieces_right"], k["pieces"])}
            label_lines.append(f"- {label}: {k['notes_right']}/{k['notes']} notes labelled right "
                               f"({fmt(k['notes_right'] / k['notes'], wilson(k['notes_right'], k['notes']), True)}); "
                               f"{k['pieces_right']}/{k['pieces']} pieces with the label's count right "
                               f"({fmt(k['pieces_right'] / k['pieces'], wilson(k['pieces_right'], k['pieces']), True)})")
    sub = [f"- {k}: {v['right']}/{v['notes']} notes labelled right ({v['right'] / v['notes']:.3f}, "
           f"{v['ci'][0]:.3f}-{v['ci'][1]:.3f})" for k, v in results.items() if k.endswith("sub_model")]
    direct = load(os.path.join(out_dir, "eval", "direct.jsonl"))
    floor = []
    for length in preset["eval_lengths"]["tally"]:
        # 100 held-out tasks a length: the floor is cheap to measure, and an oracle constant over a few is inflated
        tasks = [make_task("tally", length, task_seed("eval", "tally", length, i)) for i in range(100)]
        cheap = {name: mean([score(t, cheap_answers(t)[name]) for t in tasks]) for name in cheap_answers(tasks[0])}
        rs = [r for r in direct if r["length"] == length]
        solved = sum(r["correctness"] >= 1.0 for r in rs)
        floor.append(f"| {length:,} | {len(tasks)} | {best_constant(tasks)[1]:.2f} | "
                     + " | ".join(f"{v:.2f}" for v in cheap.values())
                     + f" | {solved}/{len(rs)} ({fmt(solved / max(1, len(rs)), wilson(solved, len(rs)), True)}) |")
    names = list(cheap_answers(make_task("tally", 1200, 0)))
    text = "\n".join(["# Does RL learn to recurse? (recurse.py)", "",
                      "Held-out tasks; sampled at the RL temperature, and greedy; the arms pool their training seeds "
                      f"({', '.join(map(str, preset['seeds']))}). 95% intervals in brackets.", "", *lines, "",
                      "The policy's share of the concurrent plan where tally's code chooses (plan_preference: "
                      "the teacher's two replies scored at the RL temperature, held-out prompts; a bootstrap over "
                      "prompts), and the mass, the chance that the policy writes one of the two programs token "
                      "for token:", "", "| policy | call | length | n | concurrent plan | mass on the two |",
                      "|" + " --- |" * 6, *plan_lines, "",
                      "Sub-model accuracy (plain completions labelling tally notes) in the held-out rollouts:", *sub,
                      "", "and on held-out pieces of 6 notes alone (label_skill, at the RL temperature):",
                      *label_lines, "",
                      "tally floor: the best constant (oracle), the cheap answers, and `direct` (base model, "
                      "context in the prompt, greedy):", "",
                      "| length | n | best constant | " + " | ".join(names) + " | direct |",
                      "|" + " --- |" * (4 + len(names)), *floor, ""])
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_steps(out_dir, [run for arm in ARMS for run in groups[arm]])
    print(text)


def kept_steps(run_dir):
    """The RL steps whose adapters train.py kept (--keep_adapters), in order."""
    folder = os.path.join(run_dir, "steps")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("step-") and n.split("-")[1].isdigit())


def plot_steps(out_dir, runs):
    """The training rollouts' figures over RL steps, one line per run (train.py's metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "accuracy"), ("sub-calls per rollout", "sub_calls"),
              ("share of sub-calls concurrent", "concurrent_share"), ("share with a second level", "second_level"),
              ("critical path (tokens)", "critical_path"), ("generated tokens", "generated_tokens")]
    fig, axes = plt.subplots(2, 4, figsize=(17, 6.5))
    for ax, (title, key) in zip(axes.flat, panels):
        for run in runs:
            ms = [m for m in load(os.path.join(out_dir, run, "metrics.jsonl")) if m.get("phase") == "rl" and key in m]
            if not ms:  # a run not made (yet)
                continue
            ax.plot([m["step"] - ms[0]["step"] + 1 for m in ms], [m[key] for m in ms], marker=".",
                    linestyle="-" if run.startswith("cost") else "--", label=run)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    ax = axes.flat[len(panels)]  # held-out, not the training rollouts: the odds of the concurrent plan
    warm = (load_json(os.path.join(out_dir, "eval", "warm-step-0-plans.json")) or {}).get("shares", [])
    for run in runs:
        points = [(0, mean([x[2] for x in warm]))] if warm else []
        for step in kept_steps(os.path.join(out_dir, run)):
            shares = (load_json(os.path.join(out_dir, "eval", f"{run}-step-{step}-plans.json")) or {}).get("shares")
            if shares:
                points.append((step, mean([x[2] for x in shares])))
        if points:
            ax.plot(*zip(*points), marker=".", linestyle="-" if run.startswith("cost") else "--", label=run)
    ax.set_title("concurrent plan's odds, held-out prompts", fontsize=10)
    ax.set_xlabel("RL step (0: the warm start)")
    ax.grid(alpha=0.3)
    ax = axes.flat[-1]  # held-out too: the sub-model's skill, which RL on the RLM rows may wear away
    paths = {run: [(0, "warm-step-0")] + [(s, f"{run}-step-{s}") for s in kept_steps(os.path.join(out_dir, run))]
             for run in runs}
    for run, steps in paths.items():
        points = [(step, p["labels"]["pieces_right"] / p["labels"]["pieces"]) for step, name in steps
                  if "labels" in (p := load_json(os.path.join(out_dir, "eval", f"{name}-plans.json")) or {})]
        if points:
            ax.plot(*zip(*points), marker=".", linestyle="-" if run.startswith("cost") else "--", label=run)
    ax.set_title("pieces labelled right (label count), held-out", fontsize=10)
    ax.set_xlabel("RL step (0: the warm start)")
    ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "steps.png"), dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=list(PRESETS))
    parser.add_argument("--out_dir", default=None, help="default: out/recurse-<preset>")
    parser.add_argument("--report", action="store_true", help="only write the report from what --out_dir holds")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out_dir = args.out_dir or f"out/recurse-{args.preset}"
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    if not args.report:
        flags, t0 = {**COMMON, **preset["train"]}, time.time()
        for name, run in run_flags(preset).items():
            print(f"{'1. warm start' if name.startswith('warm') else '2. RL'}: {name}", flush=True)
            train(os.path.join(out_dir, name), {k: v.replace("{out_dir}", out_dir) if isinstance(v, str) else v
                                                for k, v in run.items()})
        print("3. evaluation on held-out tasks", flush=True)
        runs = ["warm"] + [f"{arm}-s{s}" for arm in ARMS for s in preset["seeds"]]
        measure_plans(os.path.join(out_dir, "warm", "adapter"), preset, preset["n_plans_steps"], flags["temperature"],
                      os.path.join(out_dir, "eval", "warm-step-0-plans.json"))  # the figure's step 0, same prompts
        for run in runs:  # first what is cheap and exact: each adapter's odds of the concurrent plan
            measure_plans(os.path.join(out_dir, run, "adapter"), preset, preset["n_plans"], flags["temperature"],
                          os.path.join(out_dir, "eval", f"{run}-plans.json"))
            for step in kept_steps(os.path.join(out_dir, run)):  # the figure's plan preference over RL steps
                measure_plans(os.path.join(out_dir, run, "steps", f"step-{step}"), preset, preset["n_plans_steps"],
                              flags["temperature"], os.path.join(out_dir, "eval", f"{run}-step-{step}-plans.json"))
        for run in runs:
            for decoding, temperature, n in (("sampled", flags["temperature"], preset["n_sampled"]),
                                             ("greedy", 0.0, preset["n_greedy"])):
                print(f"  {run} {decoding}", flush=True)
                evaluate_adapter(os.path.join(out_dir, run, "adapter"), preset, temperature, n,
                                 os.path.join(out_dir, "eval", f"{run}-{decoding}.jsonl"))
        direct_preset = {**preset, "eval_lengths": {"tally": preset["eval_lengths"]["tally"]}}
        evaluate_adapter(None, direct_preset, 0.0, preset["n_direct"], os.path.join(out_dir, "eval", "direct.jsonl"),
                         methods=("direct",))
        print(f"experiment: {(time.time() - t0) / 60:.1f} minutes", flush=True)
    report(out_dir, preset)


if __name__ == "__main__":
    main()
