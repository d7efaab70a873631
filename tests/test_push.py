"""push.py: what one RL update does to the concurrent plan. Adam's first step of +-lr on every weight,
push_terms' first-order parts per rollout (checked against grpo_step's own SGD step), a run's step read
back and replayed, and plan_signal's split of a group's push into correctness and cost."""

import math

import pytest

import push
import recurse


def test_a_sign_step_moves_every_trainable_weight_by_lr_and_nothing_else():
    """float32 weights of size ~1e-2 plus 1e-3: the sum rounds by at most half an ulp of about
    1e-2 (~5e-10), so each move equals lr to well within 1e-7."""
    import torch

    from conftest import make_tiny_policy

    policy = make_tiny_policy(seed=1)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    push.perturb_by_sign(policy, 1e-3, seed=5)
    moves = {n: p.detach() - before[n] for n, p in policy.model.named_parameters()}
    assert trainable and all(torch.equal(moves[n], torch.zeros_like(moves[n])) for n in moves if n not in trainable)
    signs = torch.cat([moves[n].flatten() for n in trainable])
    assert torch.allclose(signs.abs(), torch.full_like(signs, 1e-3), rtol=0, atol=1e-7)
    assert 0.4 < (signs > 0).float().mean().item() < 0.6  # both directions, from the seed


def test_a_sign_step_along_the_gradient_moves_the_plan_log_odds_by_lr_times_its_l1_norm():
    """sign_step_reach's bound is reached, to first order, by the step that moves every weight with
    the sign of its own gradient. Each reply's log-prob is a float32 sum of ~200 terms near -4,800
    nats (the tiny random model), whose ulp is 4.9e-4: summed in another order it may differ by a
    few ulps, ~2e-3. At an lr where the step moves the log-odds by 0.1 nats that is ~2% of the move,
    and the second-order term, O(lr^2), is smaller still (it grows ~10x per 10x of the move, and at
    0.1 nats the change matched lr * norm to 0.1%); so the change lies within 20% of lr * norm."""
    import torch

    from conftest import make_tiny_policy

    policy = make_tiny_policy(seed=2)
    rows = recurse.plan_prompts(policy, 1, (1200,))
    [(level, length, odds, norm)] = push.sign_step_reach(policy, rows, 0.7)
    assert norm > 0
    lr = 0.1 / norm
    params = [p for p in policy.model.parameters() if p.requires_grad]
    _, _, prompt, sync, concurrent = rows[0]
    logp_sync, logp_async = recurse.reply_logprobs(policy, prompt, [sync, concurrent], 0.7)
    grads = torch.autograd.grad(logp_async - logp_sync, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p += lr * torch.sign(g)
    [(_, _, moved, _)] = push.sign_step_reach(policy, rows, 0.7)
    assert 0.8 * 0.1 < moved - odds < 1.2 * 0.1


# --- which rollouts push the concurrent plan (push_terms), and a run's step read back

def test_push_terms_direction_is_the_step_grpo_step_takes(smollm_tokenizer):
    """push_terms' g is what one SGD step of lr 1 through grpo_step moves the weights by (minus the
    Dr. GRPO loss's gradient, with its norm, over the same rows): its first-order figures are about the
    update train.py makes, not some other one. Only the calls train_calls names count."""
    import random as stdlib_random

    import torch

    from conftest import make_tiny_policy
    from grpo import grpo_step, token_budget_norm
    from trace import Call, Cost, Rollout

    policy = make_tiny_policy(seed=1, tokenizer=smollm_tokenizer)
    push.perturb_by_sign(policy, 0.02)  # LoRA's B starts at 0, which would leave A without a gradient
    rng = stdlib_random.Random(0)
    ids = lambda n: [rng.randrange(100, 5000) for _ in range(n)]

    def rollout(prompt, reply, child_reply):
        calls = [Call(0, None, "root", 0, "q", ids(prompt) + ids(reply), [0] * prompt + [1] * reply),
                 Call(1, 0, "llm_query", 1, "p", ids(6) + ids(child_reply), [0] * 6 + [1] * child_reply)]
        return Rollout("q", "1", calls, Cost(), 64)

    rollouts = [rollout(7, 5, 4), rollout(9, 3, 6), rollout(5, 8, 2), rollout(6, 4, 5)]
    choices = [("root", 1200, ids(8), ids(5), ids(6)), ("child", 3000, ids(7), ids(4), ids(4))]
    advantages = {"cost": [0.5, -0.5, 0.25, -0.25], "accuracy": [1.0, 0.0, -1.0, 0.0]}
    norm, kw = token_budget_norm(len(rollouts), 64), dict(temperature=0.7, train_calls="rlm", micro_batch_tokens=32)
    summary, directions = push.push_terms(policy, rollouts, advantages, choices, norm=norm, **kw)

    params = policy.trainable_parameters()
    before = torch.cat([p.detach().flatten().clone() for p in params])
    grpo_step(policy, torch.optim.SGD(params, lr=1.0), rollouts, advantages["cost"], max_generated_tokens=64,
              grad_clip=float("inf"), **kw)
    moved = torch.cat([p.detach().flatten() for p in params]) - before
    g = directions["cost"]
    # Both sides add the same per-row gradients in another order and round once more in before + g:
    # a few units of float32's eps at the size of the weights plus the largest gradient entry.
    tolerance = 64 * torch.finfo(torch.float32).eps * float(before.abs().max() + g.abs().max())
    assert float(g.abs().max()) > 1000 * tolerance  # the comparison below can tell a wrong g
    assert float((moved - g).abs().max()) <= tolerance
    assert float((moved - directions["accuracy"]).abs().max()) > 1000 * tolerance  # other advantages, other step
    parts, whole = summary["arms"]["cost"]["sgd_parts"], summary["arms"]["cost"]["sgd_push_per_lr"]
    assert abs(sum(parts) - whole) <= 1e-4 * sum(abs(p) for p in parts)  # the parts add up to the whole
    assert len(summary["log_odds"]) == len(choices) and 0 < summary["same_sign_share"] < 1


def test_push_and_replay_rebuild_the_step_a_run_took(tiny_model_dir, tmp_path):
    """push.py --run and --replay read an RL step back from a run (its config, tasks, rollouts and
    each arm's advantages) and replaying it with the run's own arm, optimizer and lr reproduces the
    step's update: the same rows and tokens, and the same gradient norm. Rewards are never right here
    (a random model), so the run trains on cost alone (--no-skip_unsolved) to have advantages at all."""
    import json
    import os

    import train

    common = ["--model", tiny_model_dir, "--families", "tally", "--warm_strategies", "habits", "--no-curriculum",
              "--eval_n", "0", "--lengths", "1200", "--temperature", "0.7", "--train_calls", "rlm",
              "--cost_weight", str(recurse.ARMS["cost"]["cost_weight"]),
              "--latency_weight", str(recurse.ARMS["cost"]["latency_weight"]),
              *[x for k, v in {**recurse.ROLLOUTS, **recurse.BUDGETS}.items() for x in (f"--{k}", str(v))]]
    common += [x for k in train.GPU_SIZED if f"--{k}" not in common for x in (f"--{k}", str(train.DEFAULTS[k]))]
    out = str(tmp_path)
    train.main(common + ["--steps", "0", "--warm_demos", "2", "--warm_lengths", "1200", "--warm_epochs", "1",
                         "--out_dir", os.path.join(out, "warm")])
    train.main(common + ["--init_adapter", os.path.join(out, "warm", "adapter"), "--warm_demos", "0", "--steps", "1",
                         "--tasks_per_step", "1", "--group_size", "3", "--all_samples", "--keep_adapters",
                         "--no-skip_unsolved", "--lr", "1e-3", "--out_dir", os.path.join(out, "cost-s0")])
    push.main(["--preset", "short", "--out_dir", out, "--run", "cost-s0", "--replay", "cost:adamw:1e-3"])

    record = json.load(open(os.path.join(out, "eval", "cost-s0-step-1-push.json")))
    assert len(record["rollouts"]) == 3 and len(record["h_dot_G"]) == 3
    costs = [r["cost"]["advantage"] for r in record["rollouts"]]
    assert abs(sum(costs)) < 1e-9 and any(costs)  # group-relative, and cost alone spreads them
    assert all(r["accuracy"]["advantage"] == 0 for r in record["rollouts"])  # no reward spread without cost
    step = [json.loads(line) for line in open(os.path.join(out, "cost-s0", "metrics.jsonl"))][-1]
    replayed = json.load(open(os.path.join(out, "eval", "cost-s0-step-1-replay-cost-adamw-0.001-plans.json")))
    assert (replayed["update"]["train_rows"], replayed["update"]["train_tokens"]) == (step["train_rows"],
                                                                                   step["train_tokens"])
    # the same rows scored by the same model; only the order of float sums may differ
    assert replayed["update"]["grad_norm"] == pytest.approx(step["grad_norm"], rel=1e-4)
    assert step["grad_norm"] > 0 and len(replayed["shares"]) == 4 * (1 + 2 + 2)  # a child choice past one level

    push.main(["--preset", "short", "--out_dir", out, "--signal", "cost-s0:1"])  # the step's one group, split
    [group] = json.load(open(os.path.join(out, "eval", "signal.json")))["groups"]
    parts = [r["cost"]["advantage"] * h for r, h in zip(record["rollouts"], record["h_dot_G"])]
    assert group["p_corr"] == 0 and group["p_cost"] == pytest.approx(sum(parts), abs=1e-9 * sum(map(abs, parts)))
    # rescored from the run's rollouts under the run's own budgets: the same split as from the push JSON
    own = recurse.BUDGETS["latency_budget"]
    push.main(["--preset", "short", "--out_dir", out, "--signal", "cost-s0:1", "--latency_budget", str(own)])
    [again] = json.load(open(os.path.join(out, "eval", f"signal-latency_budget-{own:g}.json")))["groups"]
    assert again["p_cost"] == pytest.approx(group["p_cost"], abs=1e-9 * sum(map(abs, parts)))


def _push_record(groups):
    """A push JSON as update_push writes it, from groups of (correct, cost penalty, <h, G>) per rollout,
    with each arm's advantages as step_advantages computes them (Dr. GRPO: reward - the group's mean;
    0 in a group with no right answer)."""
    def advantages(rewards, solved):
        return [r - sum(rewards) / len(rewards) if solved else 0.0 for r in rewards]

    rollouts, dots = [], []
    for task, rows in enumerate(groups):
        solved = any(c for c, _, _ in rows)
        acc = advantages([c for c, _, _ in rows], solved)
        cost = advantages([c - penalty for c, penalty, _ in rows], solved)
        for (c, _, h), a, b in zip(rows, acc, cost):
            rollouts.append({"task": task, "characters": 3000, "correct": c,
                             "accuracy": {"advantage": a}, "cost": {"advantage": b}})
            dots.append(h)
    return {"rollouts": rollouts, "h_dot_G": dots}


def test_plan_signal_splits_each_groups_push_into_correctness_and_cost_exactly():
    # group 1: all right, the concurrent rollout (h = +2) cheaper; group 2: one right answer, sequential (h = -1)
    g1 = [(1.0, 0.1, 2.0), (1.0, 0.3, -1.0), (1.0, 0.3, -1.0)]
    g2 = [(1.0, 0.3, -1.0), (0.0, 0.1, 2.0), (0.0, 0.3, -1.0)]
    g3 = [(0.0, 0.1, 2.0), (0.0, 0.3, -1.0), (0.0, 0.3, -1.0)]  # unsolved: trains nothing in either arm
    s = push.plan_signal([_push_record([g1, g2]), _push_record([g3])], z=2.0, n_boot=50)
    p = [(g["p_corr"], g["p_cost"]) for g in s["groups"]]
    # by hand: group 1's cost advantages +2/15, -1/15, -1/15 -> 4/15 + 1/15 + 1/15 = 0.4; no correctness spread
    # group 2: correctness advantages +2/3, -1/3, -1/3 -> -2/3 - 2/3 + 1/3 = -1; cost part -(pen - mean pen):
    #          -(0.3 - 7/30) = -1/15, +2/15, -1/15 -> 1/15 + 4/15 + 1/15 = 0.4
    expected = [(0.0, 0.4), (-1.0, 0.4), (0.0, 0.0)]
    for (corr, cost), (corr_x, cost_x) in zip(p, expected):  # sums of a few terms of size ~1: float64 rounding
        assert corr == pytest.approx(corr_x, abs=1e-12) and cost == pytest.approx(cost_x, abs=1e-12)
    # the two parts add up to the cost-aware arm's whole push, sum_i A_i <h_i, G>
    rec = _push_record([g1, g2, g3])
    whole = sum(r["cost"]["advantage"] * h for r, h in zip(rec["rollouts"], rec["h_dot_G"]))
    assert sum(a + b for a, b in p) == pytest.approx(whole, abs=1e-12)
    sd = math.sqrt(((0.4 + 0.2 / 3) ** 2 + (-0.6 + 0.2 / 3) ** 2 + (0 + 0.2 / 3) ** 2) / 2)  # of (0.4, -0.6, 0)
    assert s["sd_p_total"][0] == pytest.approx(sd, rel=1e-12)
    assert s["groups_needed"][0] == pytest.approx((2.0 * sd / (0.8 / 3)) ** 2, rel=1e-12)
    assert s["mean_p_corr"][0] == pytest.approx(-1 / 3, abs=1e-12)


def test_plan_signal_needs_infinitely_many_groups_when_cost_pushes_the_wrong_way():
    g = [(1.0, 0.3, 2.0), (1.0, 0.1, -1.0), (0.0, 0.1, -1.0)]  # the concurrent rollout is the dearer one
    s = push.plan_signal([_push_record([g])], n_boot=20)
    assert s["groups"][0]["p_cost"] < 0 and s["groups_needed"][0] == math.inf


def test_projection_pushes_the_target_at_its_lr_and_gains_spreads_with_more_groups():
    result = {"mean_p_cost": [15.0, 0, 0], "sd_p_total": [90.0, 0, 0], "groups": [{"size": 6}] * 4}
    train = dict(steps=8, tasks_per_step=3, group_size=6, families="tally", lr=1400)
    p = push.projection(result, train)
    # by hand: 8 steps x 3 groups x 15 / (18 rollouts x 4,096 tokens) per unit of lr
    assert p["mean"] == pytest.approx(1400 * 8 * 3 * 15 / (18 * 4096), rel=1e-12)
    assert push.projection(result, train, lr=p["lr_for_target"])["mean"] == pytest.approx(p["target"], rel=1e-12)
    longer = push.projection(result, {**train, "steps": 32})  # 4x the groups: twice the spreads
    assert longer["z"] == pytest.approx(2 * p["z"], rel=1e-12)
    # three families: a third of the groups are tally; groups of 8 carry 8/6 of a group of 6's push
    mixed = push.projection(result, {**train, "families": "tally,niah,multihop", "group_size": 8})
    assert mixed["tally_groups"] == pytest.approx(8) and mixed["mean"] == pytest.approx(
        1400 * 8 * 1 * 15 * (8 / 6) / (24 * 4096), rel=1e-12)
    assert push.projection({**result, "mean_p_cost": [-1.0, 0, 0]}, train)["lr_for_target"] == math.inf
