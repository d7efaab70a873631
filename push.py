"""
What one RL update does to the concurrent plan, measured exactly on the rollouts a run sampled.

recurse.py measures where tally's code chooses between sub-calls one after another and all at once
(plan_preference: the log-odds of the teacher's two replies at held-out prompts). This file asks why
an RL step moved those odds the way it did, and how many rollouts the reward needs to move them on
purpose. To first order an update d moves the log-odds by <d, G>, G their gradient; the Dr. GRPO
update is a sum over rollouts, so the move is a sum of one part per rollout (push_terms).

    python push.py --preset short --out_dir out/recurse-short --run cost-s0 --step 1
        # which rollouts of cost-s0's first RL step push the plan up or down, and how far one update
        # from them moves it, per arm, with SGD and with Adam's first step -> eval/cost-s0-step-1-push.json
    python push.py --preset short --run cost-s0 --replay cost:sgd:1400 accuracy:adamw:3e-5
        # ... and that step again, for real, with each arm, optimizer and lr -> eval/*-replay-*-plans.json
    python push.py --preset short --signal cost-s0:1 cost-s0:2 [--latency_budget 1200]
        # the cost terms' push against the noise of which plan the right answers used, per group of
        # rollouts (plan_signal; the rollouts rescored under other reward budgets if given), how many
        # groups the cost terms need to stand out, and what that predicts for each preset's run and lr
        # (projection) -> eval/signal[-latency_budget-1200].json

The runs must keep every rollout (train.py --all_samples, which recurse.py's RL runs set) and start
from out_dir/warm/adapter; a step after the first needs the adapter the step before kept
(--keep_adapters). sign_noise_mass and sign_step_reach measure what Adam's first step, which moves every
weight by about lr, can do to the plan (README, third and fourth runs).
"""

import argparse
import inspect
import math
import os

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random

from recurse import (ARMS, PRESETS, ROLLOUTS, load_json, mean, plan_preference, plan_prompts, plans_of, reply_logprobs,
                     write_json)
from tasks import score


def perturb_by_sign(policy, lr, seed=0):
    """Move every trainable weight of policy by +lr or -lr, the sign drawn from seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(lr * (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype))


def sign_noise_mass(adapter, preset, lrs, n, temperature, path, seed=0):
    """What one update that is pure noise costs the cloned programs: every trainable weight moved by
    lr in a random direction (+lr or -lr), as a fresh Adam's first step moves nearly every weight by
    about lr whatever its gradient; then plan_preference's mass on n held-out tally tasks per length.
    lr 0 is the adapter itself. -> {lr: mean mass}, written to path (JSON)."""
    from lora import load_policy

    masses = {}
    for lr in lrs:
        policy = load_policy(None, adapter=adapter)
        perturb_by_sign(policy, lr, seed)
        rows = plan_prompts(policy, n, preset["eval_lengths"]["tally"])
        masses[str(lr)] = mean([mass for *_, mass in plan_preference(policy, rows, temperature)])
    write_json(path, {"temperature": temperature, "n": n, "seed": seed, "mass": masses})
    return masses


def sign_step_reach(policy, rows, temperature):
    """How far one update of Adam's first kind (every trainable weight moved by lr, the sign of its
    gradient) can move the policy's log-odds of the concurrent plan at each choice of plan_prompts:
    lr * ||d log-odds / d weights||_1, reached when every weight moves with its own sign. The log-odds
    is log P_T(async reply) - log P_T(sync reply). -> [(level, length, log-odds, L1 norm of its gradient)];
    multiply the norm by an lr. With 4.9M LoRA weights the norm is in the tens of thousands, so a
    step that any consistent signal lines up moves a plan by many nats (README, fourth run)."""
    import torch

    params = [p for p in policy.model.parameters() if p.requires_grad]
    out = []
    for level, length, prompt, sync, concurrent in rows:
        logp_sync, logp_async = reply_logprobs(policy, prompt, [sync, concurrent], temperature)
        log_odds = logp_async - logp_sync
        grads = torch.autograd.grad(log_odds, params, allow_unused=True)
        out.append((level, length, log_odds.item(), sum(g.abs().sum().item() for g in grads if g is not None)))
    return out


def push_terms(policy, rollouts, advantages_by_arm, choices, *, temperature, norm, train_calls="all",
               micro_batch_tokens=4096):
    """Which rollouts push the concurrent plan up or down, and how far one update from them moves it,
    to first order, for each set of advantages (one per arm), with plain SGD and with Adam's first step.

    An update d moves the plan's log-odds (log P_T(async reply) - log P_T(sync reply), averaged over
    choices: plan_prompts rows) by about <d, G>, G its gradient. At ratio 1 (one epoch) the Dr. GRPO
    loss's gradient is -g, g = sum_i A_i h_i / norm, h_i the gradient of rollout i's log-probs summed
    over its trained rows (grpo_step's rows and norm). So one update at lr moves the log-odds by
      SGD:                lr <g, G>, of which rollout i's part is lr A_i <h_i, G> / norm;
      Adam's first step:  lr <g / (|g| + eps), G>, about lr <sign(g), G>: the same for any two sets of
                          advantages that give each weight's gradient the same sign.
    -> (summary dict, {arm: g}). advantages_by_arm: {arm: [A_i]}."""
    import torch

    from dist import flat_grads
    from grpo import build_rows, micro_batches

    params = policy.trainable_parameters()
    eps = inspect.signature(torch.optim.AdamW).parameters["eps"].default
    for p in params:
        p.grad = None
    log_odds = []
    for _, _, prompt, sync, concurrent in choices:  # G, accumulated in .grad one choice at a time
        logp_sync, logp_async = reply_logprobs(policy, prompt, [sync, concurrent], temperature)
        ((logp_async - logp_sync) / len(choices)).backward()
        log_odds.append((logp_async - logp_sync).item())
    G = flat_grads(params)
    rows = build_rows(rollouts, [1.0] * len(rollouts), calls=train_calls)
    H = []
    for i in range(len(rollouts)):
        for p in params:
            p.grad = None
        for b in micro_batches([r for r in rows if r.rollout_index == i], micro_batch_tokens,
                               pad_id=policy.pad_token_id):
            logp_BT = policy.logprobs(b.input_ids_BT, b.attention_mask_BT, b.loss_mask_BT, temperature=temperature)
            (logp_BT * b.loss_mask_BT).sum().backward()
        H.append(flat_grads(params))
    for p in params:
        p.grad = None
    dots = [float(h @ G) for h in H]
    arms, directions = {}, {}
    for arm, advantages in advantages_by_arm.items():
        g = directions[arm] = sum(a * h for a, h in zip(advantages, H)) / norm
        without = [g - a * h / norm for a, h in zip(advantages, H)]
        arms[arm] = {"sgd_push_per_lr": float(g @ G), "adam_push_per_lr": float((g / (g.abs() + eps)) @ G),
                     "adam_reach_per_lr": float(G.abs().sum()), "grad_norm": float(g.norm()),
                     "sgd_parts": [a * d / norm for a, d in zip(advantages, dots)],
                     # Adam's first step without each rollout in turn: which ones set its direction
                     "adam_push_without": [float((w / (w.abs() + eps)) @ G) for w in without]}
    signs = [torch.sign(g) for g in directions.values()]
    same = float((signs[0] == signs[-1]).float().mean())  # share of weights the first two arms move alike
    return {"log_odds": log_odds, "h_dot_G": dots, "arms": arms, "same_sign_share": same, "weights": G.numel()}, directions


def step_rollouts(run_dir, step):
    """An RL step of a train.py run, as it was: (config, tasks, rollouts), the rollouts from
    samples.jsonl (which must keep them all: --all_samples)."""
    from checkpoint import load_checkpoint
    from config import ints
    from trace import read_jsonl
    from train import step_tasks

    _, state = load_checkpoint(run_dir)
    if state is None:
        raise SystemExit(f"push.py: {run_dir} has no checkpoint to read the run's settings from")
    cfg = state["config"]
    if any(cfg.get(k) for k in ("warm_demos", "warm_drills", "warm_root_drills")):
        # its warm-start steps would shift the RL steps' numbers (and so their tasks) in train.py
        raise SystemExit(f"push.py: {run_dir} began with a warm start of its own; this reads RL runs that "
                         "start from --init_adapter with --warm_demos 0 --warm_drills 0, as the experiment's do")
    if not cfg["all_samples"]:
        raise SystemExit(f"push.py: {run_dir} kept one rollout per task; this needs train.py --all_samples")
    per_step = cfg["tasks_per_step"] * cfg["group_size"]
    rollouts = read_jsonl(os.path.join(run_dir, "samples.jsonl"))[(step - 1) * per_step:step * per_step]
    if len(rollouts) != per_step:
        raise SystemExit(f"push.py: {run_dir}/samples.jsonl holds {len(rollouts)} rollouts of step {step}, "
                         f"not {per_step}")
    return cfg, step_tasks(cfg, step - 1, ints(cfg["lengths"])), rollouts  # step k drew step_tasks(cfg, k - 1)


def step_advantages(cfg, tasks, rollouts):
    """Each arm's rewards and advantages for the same rollouts of a step, as train.py computes them.
    -> ({arm: [reward dicts]}, {arm: [A_i]})"""
    from config import reward_settings
    from grpo import group_advantages
    from reward import reward_for

    rewards, advantages = {}, {}
    for arm, weights in ARMS.items():
        reward_config = reward_settings({**cfg, **weights})
        rewards[arm] = [reward_for(t, r, reward_config) for t, r in zip(tasks, rollouts)]
        correct = [w["correctness"] for w in rewards[arm]] if cfg["skip_unsolved"] else None
        advantages[arm] = [float(a) for a in group_advantages([w["reward"] for w in rewards[arm]],
                                                              cfg["group_size"], correctness_N=correct)]
    return rewards, advantages


def update_push(policy, cfg, tasks, rollouts, lengths, n):
    """push_terms for the rollouts of one RL step (step_rollouts), on n held-out tasks of each length,
    with the advantages each arm's reward gives them. policy: the adapter that sampled them."""
    from eval import strategy_profile
    from grpo import token_budget_norm

    rewards, advantages = step_advantages(cfg, tasks, rollouts)
    summary, _ = push_terms(policy, rollouts, advantages, plan_prompts(policy, n, lengths),
                            temperature=cfg["temperature"], train_calls=cfg["train_calls"],
                            norm=token_budget_norm(len(rollouts), cfg["max_generated_tokens"]),
                            micro_batch_tokens=cfg["micro_batch_tokens"])
    summary["rollouts"] = [{"task": k // cfg["group_size"], "characters": len(t.context), "correct": score(t, r.answer),
                            **{key: strategy_profile(r)[key] for key in ("sub_calls", "concurrent")},
                            "depth": r.cost.depth, "critical_path": r.cost.critical_path_tokens,
                            **{arm: {"reward": rewards[arm][k]["reward"], "advantage": advantages[arm][k]}
                               for arm in ARMS}}
                           for k, (t, r) in enumerate(zip(tasks, rollouts))]
    return {"temperature": cfg["temperature"], "n": n, **summary}


def replay(out_dir, run, step, preset, arm, optimizer, lr):
    """RL step `step` of run again, from the adapter that sampled it and on the rollouts it sampled,
    with arm's advantages, optimizer ("adamw" or "sgd") and lr; then measure_plans on the result:
    what one real update of each kind does to the concurrent plan, exactly, without sampling again."""
    from grpo import grpo_step
    from lora import load_policy
    from train import new_optimizer, update_settings

    path = os.path.join(out_dir, "eval", f"{run}-step-{step}-replay-{arm}-{optimizer}-{lr:g}-plans.json")
    if os.path.exists(path):
        return
    run_dir = os.path.join(out_dir, run)
    cfg, tasks, rollouts = step_rollouts(run_dir, step)
    _, advantages = step_advantages(cfg, tasks, rollouts)
    policy = load_policy(cfg["model"], adapter=start_adapter(out_dir, run, step))
    stats = grpo_step(policy, new_optimizer(policy, {**cfg, "optimizer": optimizer, "lr": lr}, "rl"), rollouts,
                      advantages[arm], **update_settings({**cfg, "epochs": 1}), train_calls=cfg["train_calls"])
    record = plans_of(policy, preset, preset["n_plans_steps"], cfg["temperature"])
    write_json(path, {**record, "update": stats})
    shares = record["shares"]
    print(f"{path}: concurrent plan {mean([x[2] for x in shares]):.4f}, mass {mean([x[3] for x in shares]):.3f}")


def start_adapter(out_dir, run, step):
    """The adapter that sampled RL step `step` of run: the warm start's, or the one the step before kept."""
    if step == 1:
        return os.path.join(out_dir, "warm", "adapter")
    return os.path.join(out_dir, run, "steps", f"step-{step - 1}")


def push(out_dir, run, step, preset):
    """update_push for one step of one run of the experiment, from the adapter that sampled it, on the
    held-out choices that measure_plans and replay use."""
    from lora import load_policy

    run_dir, path = os.path.join(out_dir, run), os.path.join(out_dir, "eval", f"{run}-step-{step}-push.json")
    if os.path.exists(path):
        return
    cfg, tasks, rollouts = step_rollouts(run_dir, step)
    policy = load_policy(cfg["model"], adapter=start_adapter(out_dir, run, step))
    result = {"run": run_dir, "step": step, **update_push(policy, cfg, tasks, rollouts, preset["eval_lengths"]["tally"],
                                                          preset["n_plans_steps"])}
    write_json(path, result, indent=1)
    for arm, a in result["arms"].items():
        print(f"{arm}: one update moves the concurrent plan's log-odds by {a['sgd_push_per_lr']:+.4g} x lr (SGD), "
              f"{a['adam_push_per_lr']:+.4g} x lr (Adam's first step; reach {a['adam_reach_per_lr']:.4g} x lr)")
    print(f"the two arms' first Adam steps move {result['same_sign_share']:.3f} of the weights the same way; {path}")


def plan_signal(records, z=2.0, n_boot=2000, seed=0):
    """How much of RL's push on the concurrent plan comes from the reward's cost terms, and how much is the
    noise of which plan the right answers happened to use; and so how many groups of rollouts RL needs
    before the first stands out of the second. records: update_push results (push JSONs).

    The cost-aware arm's advantage splits exactly: A_i = A_i^acc + (A_i - A_i^acc), A_i^acc the
    accuracy-only arm's advantage on the same rollout (its reward is the correctness; both arms zero a
    group with no right answer). So a group's first-order push on the plan, sum_i A_i <h_i, G>, is
      P_corr = sum_i A_i^acc <h_i, G>           (the whole push of the accuracy-only arm), plus
      P_cost = sum_i (A_i - A_i^acc) <h_i, G>   (what cost and latency add).
    Both programs are equally right, so P_corr has mean 0 over groups and only P_cost adds up: after k
    groups the cost-aware arm's push has mean k mean(P_cost) and spread sqrt(k) sd(P_corr + P_cost) (the
    correctness noise, and the cost terms' own), and its mean exceeds z spreads from
    k = (z sd(P_corr + P_cost) / mean(P_cost))^2 groups on.
    -> {"groups": [{"characters", "right", "p_corr", "p_cost"}], statistics with 95% bootstrap intervals
    over groups, "groups_needed": [estimate, low, high] (inf where the cost part's mean may be <= 0)}"""
    groups = []
    for rec in records:
        by_task = {}
        for r, h in zip(rec["rollouts"], rec["h_dot_G"]):
            by_task.setdefault(r["task"], []).append((r, h))
        for rows in by_task.values():
            acc = [r["accuracy"]["advantage"] for r, _ in rows]
            cost = [r["cost"]["advantage"] - a for (r, _), a in zip(rows, acc)]
            groups.append({"characters": rows[0][0]["characters"], "right": sum(r["correct"] for r, _ in rows),
                           "size": len(rows), "p_corr": sum(a * h for a, (_, h) in zip(acc, rows)),
                           "p_cost": sum(c * h for c, (_, h) in zip(cost, rows))})

    def sd(xs):
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))

    def needed(gs):
        m = mean([g["p_cost"] for g in gs])
        return (z * sd([g["p_corr"] + g["p_cost"] for g in gs]) / m) ** 2 if m > 0 else math.inf

    stats = {"mean_p_cost": lambda gs: mean([g["p_cost"] for g in gs]),
             "mean_p_corr": lambda gs: mean([g["p_corr"] for g in gs]),
             "sd_p_corr": lambda gs: sd([g["p_corr"] for g in gs]),
             "sd_p_total": lambda gs: sd([g["p_corr"] + g["p_cost"] for g in gs]), "groups_needed": needed}
    rng = random.Random(seed)
    draws = [[groups[rng.randrange(len(groups))] for _ in groups] for _ in range(n_boot)]
    out = {"groups": groups, "z": z}
    for name, stat in stats.items():
        values = sorted(stat(d) for d in draws)
        out[name] = [stat(groups), values[int(0.025 * n_boot)], values[int(0.975 * n_boot) - 1]]
    return out


def projection(result, train, lr=None, target=4.0):
    """What plan_signal's per-group figures predict, to first order, for a whole RL run of one training seed
    with train.py settings `train` (a preset's "train"): the cost terms' expected push on the plan's log-odds
    over the run, its spread, and the lr at which the expected push is `target` nats (4: from the warm
    start's 0.15 of the odds to about 0.9). A step's SGD move is lr * sum over its groups / (N * T), N its
    rollouts and T max_generated_tokens (the Dr. GRPO norm); tally is 1/len(families) of the groups; a
    group's push is a sum over its rollouts, so its mean and variance scale with the group size.
    Assumes the policy stays near the one measured (first order): a guide to sizing, not a forecast."""
    steps, size = train["steps"], train["group_size"]
    groups = train["tasks_per_step"] / len(train["families"].split(","))  # tally groups a step
    measured = mean([g["size"] for g in result["groups"]])  # the group size the figures were measured at
    scale, norm = size / measured, train["tasks_per_step"] * size * ROLLOUTS["max_generated_tokens"]
    mean_per_lr = steps * groups * result["mean_p_cost"][0] * scale / norm
    sd_per_lr = math.sqrt(steps * groups * scale) * result["sd_p_total"][0] / norm
    lr = train["lr"] if lr is None else lr
    return {"tally_groups": steps * groups, "lr": lr, "mean": lr * mean_per_lr, "sd": lr * sd_per_lr,
            "z": mean_per_lr / sd_per_lr if sd_per_lr else math.inf, "target": target,
            "lr_for_target": target / mean_per_lr if mean_per_lr > 0 else math.inf}  # no lr, if cost pushes down


def signal(out_dir, run_steps, **budgets):
    """plan_signal over the push JSONs of these (run, step) pairs -> out_dir/eval/signal[-budgets].json, and
    a table. budgets (cost_budget, latency_budget): score the same rollouts under other reward budgets, as
    if the runs had used them (the advantages change, each rollout's <h, G> does not)."""
    records = [load_json(os.path.join(out_dir, "eval", f"{run}-step-{step}-push.json")) for run, step in run_steps]
    if any(r is None for r in records):
        missing = [f"{run}:{step}" for (run, step), r in zip(run_steps, records) if r is None]
        raise SystemExit(f"push.py: no push JSON for {', '.join(missing)}; run push.py --run RUN --step K first")
    budgets = {k: v for k, v in budgets.items() if v is not None}
    if budgets:  # the same rollouts, each arm's advantages again under the other budgets
        for (run, step), record in zip(run_steps, records):
            cfg, tasks, rollouts = step_rollouts(os.path.join(out_dir, run), int(step))
            _, advantages = step_advantages({**cfg, **budgets}, tasks, rollouts)
            for i, r in enumerate(record["rollouts"]):
                for arm in ARMS:
                    r[arm]["advantage"] = advantages[arm][i]
    result = plan_signal(records)
    projections = {preset_name: projection(result, preset["train"]) for preset_name, preset in PRESETS.items()}
    name = "signal" + "".join(f"-{k}-{v:g}" for k, v in sorted(budgets.items())) + ".json"
    write_json(os.path.join(out_dir, "eval", name), {"steps": run_steps, "budgets": budgets, **result,
                                                     "projections": projections}, indent=1)
    print("characters  right  correctness push  cost push   (per group, in <h, G> units)")
    for g in result["groups"]:
        print(f"{g['characters']:>10}  {g['right']:.0f}/{g['size']}  {g['p_corr']:>16.1f}  {g['p_cost']:>9.1f}")
    for stat in ("mean_p_cost", "mean_p_corr", "sd_p_corr", "sd_p_total", "groups_needed"):
        value, low, high = result[stat]
        print(f"{stat}: {value:.4g} (95% {low:.4g} to {high:.4g}) over {len(result['groups'])} groups")
    for preset_name, p in projections.items():
        print(f"preset {preset_name}: {p['tally_groups']:.0f} tally groups a training seed; at lr {p['lr']:g} the cost "
              f"terms push the plan {p['mean']:+.2f} +- {p['sd']:.2f} nats over the run (first order; {p['z']:.2f} "
              f"spreads, whatever the lr); {p['target']:g} nats at lr {p['lr_for_target']:.0f}")
    print(f"-> {os.path.join(out_dir, 'eval', name)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=list(PRESETS), help="the experiment's preset (recurse.py)")
    parser.add_argument("--out_dir", default=None, help="the experiment's folder; default: out/recurse-<preset>")
    parser.add_argument("--run", help="which rollouts of RUN's RL step --step push the concurrent plan up or down "
                        "(update_push), written to out_dir/eval/RUN-step-K-push.json")
    parser.add_argument("--step", type=int, default=1, help="with --run: the RL step (1 = the first)")
    parser.add_argument("--replay", nargs="*", metavar="ARM:OPTIMIZER:LR", help="with --run: that step again "
                        "with each arm's advantages, optimizer (adamw or sgd) and lr, and the plans it leaves (replay)")
    parser.add_argument("--signal", nargs="+", metavar="RUN:STEP", help="the cost terms' push on the plan against "
                        "the correctness noise's, per group, over these steps' push JSONs (plan_signal)")
    parser.add_argument("--latency_budget", type=float, help="with --signal: rescore the rollouts with this budget")
    parser.add_argument("--cost_budget", type=float, help="with --signal: rescore the rollouts with this budget")
    args = parser.parse_args(argv)
    if not (args.run or args.signal):
        parser.error("say what to measure: --run RUN [--step K] [--replay ...], or --signal RUN:STEP ...")
    preset = PRESETS[args.preset]
    out_dir = args.out_dir or f"out/recurse-{args.preset}"
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    if args.run:
        push(out_dir, args.run, args.step, preset)
        for arm, optimizer, lr in (x.split(":") for x in args.replay or []):
            replay(out_dir, args.run, args.step, preset, arm, optimizer, float(lr))
    if args.signal:
        signal(out_dir, [x.split(":") for x in args.signal], latency_budget=args.latency_budget,
               cost_budget=args.cost_budget)


if __name__ == "__main__":
    main()
