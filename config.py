"""
A training run's settings and its folder, settled before any model loads: the flags over
train.py's defaults (and its GPU-sized values on CUDA), or the saved run's config on --resume;
every value checked, with a sentence that says what to do; an --out_dir that a new run never
mixes its logs into, and that --overwrite empties first.

    cfg, state = start_or_resume(sys.argv[1:], train.DEFAULTS, train.GPU_SIZED)   # what train.py does
    cfg = parse_config(["--steps", "3"], train.DEFAULTS, train.GPU_SIZED)         # a config, unchecked
    check_config(cfg)                                                             # exits with the problems

The defaults themselves stay in train.py, as plain values at the top, where a reader looks.
"""

import argparse
import dataclasses
import os
import shutil
import sys

import torch

import dist
from checkpoint import LOGS, load_checkpoint
from checks import WRITE_PROBE, InputError, adapter_folder, at_least, between, positive, writable_folder
from reward import RewardConfig
from tasks import FAMILIES, make_task
from grpo import TRAIN_CALLS
from teacher import HABITS, STRATEGIES

# What a run writes in out_dir, all of which --overwrite deletes first (each also as .tmp and .old).
RUN_OUTPUTS = LOGS + ("eval_before.html", "eval_after.html", "curves.png", "adapter", "checkpoint", "steps")
# What --resume lets a flag change: how long the run goes on, what it logs and where, and how the same
# update is computed. micro_batch_tokens only regroups the rows, the same sum in exact arithmetic (the
# loss's norm is a constant) but added up in another order, so the last bits of the weights may differ.
CHANGEABLE_ON_RESUME = {"resume", "overwrite", "out_dir", "steps", "checkpoint_every", "keep_adapters", "all_samples",
                        "eval_n", "eval_lengths", "eval_wordings", "micro_batch_tokens", "gradient_checkpointing"}



# The valid range of each number, as --help states it and check_config enforces it.
VALID = dict(
    warm_demos="at least 0", warm_drills="at least 0", warm_root_drills="at least 0", warm_epochs="at least 1",
    warm_batch="at least 1",
    warm_lr="greater than 0", cost_budget="at least 0 (0: follows the rollouts)",
    latency_budget="at least 0 (0: follows the rollouts)",
    steps="at least 0", tasks_per_step="at least 1", group_size="at least 2", promote_at="between 0 and 1",
    max_depth="at least 0", max_turns="at least 1", max_new_tokens="at least 1", max_sub_calls="at least 0",
    max_generated_tokens="at least 1", temperature="greater than 0", cost_weight="at least 0",
    latency_weight="at least 0", lr="greater than 0", weight_decay="at least 0", epochs="at least 1",
    micro_batch_tokens="at least 1", grad_clip="greater than 0", eps_low="at least 0 and below 1",
    eps_high="at least 0", beta="at least 0", lora_rank="at least 1", lora_alpha="greater than 0",
    checkpoint_every="at least 0", eval_every="at least 0", eval_n="at least 0",
    max_call_sub_calls="at least 0 (0: no limit)", max_prompt_chars="at least 0 (0: no limit)",
    train_calls="all, rlm or root", optimizer="adamw or sgd", lengths="at least 1000 each", warm_lengths="at least 1000 each",
    eval_lengths="at least 1000 each")


def parse_flags(argv, defaults, doc=None):
    """Only the flags given on the command line, as {name: value}: one flag per default."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in defaults.items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = str if value is None else type(value)
            parser.add_argument(f"--{name}", type=kind, default=None,
                                help=f"{VALID[name]}; default: {value}" if name in VALID else f"default: {value}")
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def parse_config(argv, defaults, gpu_sized, doc=None):
    """A new run's config: the defaults, the GPU-sized values on CUDA, then the flags given."""
    cfg = dict(defaults)
    if torch.cuda.is_available():
        cfg.update(gpu_sized)
    cfg.update(parse_flags(argv, defaults, doc))
    return cfg


def resumed_config(state, given, defaults):
    """The saved run's config, whatever machine it resumes on, with the flags given again on top;
    refuses those that would make the continued run a different experiment."""
    saved = {**defaults, **state["config"]}
    problems = [f"--{k}: saved {saved.get(k)!r}, given {v!r}" for k, v in given.items()
                if k not in CHANGEABLE_ON_RESUME and saved.get(k) != v]
    rl_done = state["step"] - state.get("warm_steps", 0)
    if given.get("steps", saved["steps"]) < rl_done:
        problems.append(f"--steps {given['steps']}: the checkpoint has done {rl_done} steps already")
    if problems:
        sys.exit(f"train.py: --resume continues the run in {given['out_dir']} as it was started, but:\n  - "
                 + "\n  - ".join(problems) + "\nLeave those flags out, or start a new run in another --out_dir.")
    return {**saved, **given}


def ints(text):
    return [int(x) for x in str(text).split(",")]


def check_config(cfg):
    """Refuse, before loading anything, a configuration that cannot work."""
    problems = []
    if cfg["group_size"] < 2:
        problems.append("--group_size must be at least 2: advantages compare rollouts of the same task")
    for name in ("tasks_per_step", "max_turns", "max_new_tokens", "max_generated_tokens",
                 "micro_batch_tokens", "epochs", "warm_epochs", "warm_batch", "lora_rank"):
        problems.append(at_least(f"--{name}", cfg[name], 1))
    for name in ("steps", "warm_demos", "warm_drills", "warm_root_drills", "cost_budget", "latency_budget", "max_depth",
                 "max_sub_calls", "max_call_sub_calls", "max_prompt_chars", "weight_decay", "beta", "eps_high",
                 "checkpoint_every", "eval_every", "eval_n"):
        problems.append(at_least(f"--{name}", cfg[name], 0))
    if cfg["lr"] <= 0 or cfg["warm_lr"] <= 0:
        problems.append("--lr and --warm_lr must be positive")
    for name in ("temperature", "grad_clip", "lora_alpha"):  # temperature divides the logits when scoring
        problems.append(positive(f"--{name}", cfg[name]))
    if not 0 <= cfg["eps_low"] < 1:  # the ratio's lower clip, 1 - eps_low, must stay above 0
        problems.append(f"--eps_low must be at least 0 and below 1 (got {cfg['eps_low']})")
    problems.append(between("--promote_at", cfg["promote_at"], 0, 1))
    unknown = [f for f in cfg["families"].split(",") if f not in FAMILIES]
    if unknown:
        problems.append(f"unknown task families {unknown}; choose from {','.join(FAMILIES)}")
    if cfg.get("optimizer", "adamw") not in ("adamw", "sgd"):
        problems.append(f"--optimizer must be adamw or sgd (got {cfg['optimizer']!r})")
    if cfg.get("train_calls", "all") not in TRAIN_CALLS:
        problems.append(f"--train_calls must be one of {', '.join(TRAIN_CALLS)} (got {cfg['train_calls']!r})")
    if cfg.get("warm_strategies") == "habits":
        others = [f for f in cfg["families"].split(",") if f not in HABITS]
        if others:
            problems.append(f"--warm_strategies habits: teacher.HABITS has no habits for {','.join(others)} "
                            f"(it has {','.join(HABITS)}); drop them from --families or clone other strategies")
    elif cfg.get("warm_strategies", "all") != "all":
        known = {s for f in cfg["families"].split(",") for s in STRATEGIES.get(f, ())}
        unknown = sorted(set(cfg["warm_strategies"].split(",")) - known)
        if unknown or not known & set(cfg["warm_strategies"].split(",")):
            problems.append(f"--warm_strategies {cfg['warm_strategies']!r}: {unknown or 'none'} not strategies of "
                            f"--families {cfg['families']} (theirs: {','.join(sorted(known))}, or all)")
    bad = [w for w in str(cfg.get("eval_wordings", "seen")).split(",") if w not in ("seen", "held_out")]
    if bad:
        problems.append(f"--eval_wordings must be seen, held_out or seen,held_out (got {cfg['eval_wordings']!r})")
    shortest = []
    for name in ("lengths", "warm_lengths", "eval_lengths"):
        try:
            shortest.append(min(ints(cfg[name])))
            if shortest[-1] < 1000:
                problems.append(f"--{name} must be at least 1000 characters each")
        except ValueError:
            problems.append(f"--{name} must be comma-separated integers (got {cfg[name]!r})")
    for family in [f for f in cfg["families"].split(",") if f in FAMILIES] if shortest else []:
        try:  # each family has its own shortest context (aggregate's records take room): tasks.py knows it
            make_task(family, max(1000, min(shortest)), seed=0)
        except ValueError as e:
            problems.append(f"--lengths, --warm_lengths, --eval_lengths: {e}")
    try:
        reward_settings(cfg)
    except ValueError as e:
        problems.append(str(e))
    problems = [p for p in problems if p]
    if problems:
        sys.exit("train.py: this configuration cannot work:\n  - " + "\n  - ".join(problems))


def reward_settings(cfg):
    """The reward's budgets follow the rollouts' (reward.RewardConfig.for_rollouts), unless the run
    sets them (--cost_budget, --latency_budget), e.g. to the scale of rollouts far below their cap."""
    config = RewardConfig.for_rollouts(cfg["max_generated_tokens"], cost_weight=cfg["cost_weight"],
                                       latency_weight=cfg["latency_weight"])
    budgets = {k: cfg[k] for k in ("cost_budget", "latency_budget") if cfg.get(k)}
    return dataclasses.replace(config, **budgets) if budgets else config


def prepare_out_dir(cfg, resuming):
    """Refuse an out_dir that cannot be written, or that holds something a new run would mix its logs
    with or replace; with --overwrite, delete what an earlier run wrote there instead."""
    out_dir = cfg["out_dir"]
    try:
        writable_folder(out_dir, "--out_dir")
    except InputError as e:
        sys.exit(f"train.py: {e}")
    # Another rank's writable_folder probe (under torchrun every rank checks at once) is not a run's output.
    present = sorted(n for n in os.listdir(out_dir) if not n.startswith(WRITE_PROBE))
    if resuming or not present:
        return
    if not cfg["overwrite"]:
        sys.exit(f"train.py: --out_dir {out_dir} is not empty ({', '.join(present[:4])}"
                 f"{', ...' if len(present) > 4 else ''}); continue that run with --resume, choose another "
                 "--out_dir, or give --overwrite to delete the run there")
    for name in RUN_OUTPUTS:
        for path in (os.path.join(out_dir, name + suffix) for suffix in ("", ".tmp", ".old")):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def start_or_resume(argv, defaults, gpu_sized, doc=None):
    """-> (config, checkpoint state or None): a new run's config, or the saved run's; everything
    checked (flags, the checkpoint, --init_adapter, --out_dir) before a model loads."""
    given = parse_flags(argv, defaults, doc)
    given.setdefault("out_dir", defaults["out_dir"])  # the run is where it is now, not where it was saved
    if given.get("resume") and given.get("overwrite"):
        sys.exit("train.py: --resume continues the run in --out_dir and --overwrite deletes it; give one of them")
    try:
        folder, state = load_checkpoint(given["out_dir"]) if given.get("resume") else (None, None)
        if state:
            try:
                adapter_folder(os.path.join(folder, "adapter"), "the checkpoint's adapter")
            except InputError:
                raise ValueError(f"its adapter, {os.path.join(folder, 'adapter')}, is missing or damaged") from None
    except ValueError as e:
        sys.exit(f"train.py: --resume cannot continue the run in {given['out_dir']}: {e}; "
                 "start a new run in another --out_dir, or in this one with --overwrite")
    if given.get("resume") and state is None:
        sys.exit(f"train.py: --resume found no checkpoint in {given['out_dir']}; run without --resume first")
    if state and (problem := dist.check_world(state.get("world_size", 1))):
        sys.exit(problem)
    cfg = resumed_config(state, given, defaults) if state else parse_config(argv, defaults, gpu_sized, doc)
    check_config(cfg)
    if cfg["init_adapter"] and not state:
        try:
            adapter_folder(cfg["init_adapter"], "--init_adapter")
        except InputError as e:
            sys.exit(f"train.py: {e}")
    prepare_out_dir(cfg, resuming=bool(state))
    if state:
        state["adapter"] = os.path.join(folder, "adapter")
    return cfg, state
