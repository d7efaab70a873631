"""
The reward: correctness, minus what the answer cost in compute and in latency.

    reward = correctness
             - cost_weight    * min(1, weighted_tokens / cost_budget)
             - latency_weight * min(1, critical_path_tokens / latency_budget)
    weighted_tokens = prompt_token_weight * prompt_tokens + generated_token_weight * generated_tokens

The trade-off the weights express:
  - Correctness comes first. Each penalty is clipped at its budget and the two weights sum
    to less than 1, so a correct answer (1) always outscores a wrong one (0) however much
    either spent; among answers of equal correctness, the cheaper and faster one wins.
  - Compute is charged because an RLM can always buy a little accuracy by reading
    everything, sub-calling on every line, or looping until the turn limit. The charge
    is on every token of the whole call tree, sub-calls included, so spawning children
    is not free.
  - Prompt (prefill) tokens cost less than generated tokens: prefill runs in parallel
    over the sequence and is compute-bound, decoding runs one token at a time and is
    memory-bound, so a generated token costs several times a prompt token in practice
    (API prices are 3-5x apart too). The default 0.25 keeps long prompts visible without
    letting them dominate, since every turn re-reads its conversation.
  - Latency is charged along the critical path of the call tree (trace.Cost's
    critical_path_tokens): sequential calls add up, concurrent calls count only their
    longest. Two rollouts with the same total tokens differ in latency when one ran its
    sub-calls with asyncio.gather and the other one after another, so this term is what
    teaches the policy to parallelise. It counts generated tokens, not seconds, so the
    reward does not depend on the machine or its load.
  - The budgets follow the rollout budget they score (RewardConfig.for_rollouts, which
    train.py, eval.py and bench.py use): latency_budget is the rollout's max_generated_tokens,
    so a fully sequential rollout that spends its whole generation budget pays the whole
    latency penalty; cost_budget is COST_BUDGET_PER_TOKEN (8) times it, which a rollout that
    spends its whole budget reaches when it prefills 28 prompt tokens per generated token
    (weighted 0.25: 7 units, plus the generated one). At its maximum each penalty is worth its
    weight: 0.1 of a reward of 1 with the defaults, on every preset (rlm.BUDGETS). Sized for
    a fixed 4,096 generated tokens, as they were before, a CPU rollout (1,024) could lose at
    most 0.025 to latency. The plain RewardConfig() keeps budgets for RLM's own default of
    4,096 generated tokens.

Usage:
  from reward import RewardConfig, compute_reward, reward_for
  terms = compute_reward(1.0, rollout.cost)          # {"reward", "correctness", "cost_penalty", "latency_penalty"}
  terms = reward_for(task, rollout, RewardConfig(cost_weight=0.2, latency_weight=0.0))
  config = RewardConfig.for_rollouts(1024, cost_weight=0.1, latency_weight=0.1)   # a CPU rollout's budgets
  summarize_rollouts(rollouts, rewards)              # a step's means: each term, accuracy, tokens, sub-calls
"""

import math
from dataclasses import dataclass

import tasks

COST_BUDGET_PER_TOKEN = 8  # cost_budget / the rollout's max_generated_tokens (see the docstring)


@dataclass(frozen=True)
class RewardConfig:
    cost_weight: float = 0.1              # largest reward lost to compute (at or beyond cost_budget)
    latency_weight: float = 0.1           # largest reward lost to latency (at or beyond latency_budget)
    prompt_token_weight: float = 0.25     # a prefilled token, in generated-token units
    generated_token_weight: float = 1.0   # a sampled token
    cost_budget: float = 32_000           # weighted tokens of the whole tree at which the cost penalty is full
    latency_budget: float = 4_096         # critical-path generated tokens at which the latency penalty is full

    @classmethod
    def for_rollouts(cls, max_generated_tokens, **weights):
        """The budgets of rollouts that may generate max_generated_tokens over their whole tree."""
        if not max_generated_tokens >= 1:
            raise ValueError(f"max_generated_tokens must be at least 1, got {max_generated_tokens!r}")
        return cls(cost_budget=COST_BUDGET_PER_TOKEN * max_generated_tokens,
                   latency_budget=max_generated_tokens, **weights)

    def __post_init__(self):
        for name in ("cost_weight", "latency_weight", "prompt_token_weight", "generated_token_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RewardConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("cost_budget", "latency_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"RewardConfig.{name} must be a finite number > 0, got {value!r}")
        if self.cost_weight + self.latency_weight >= 1:
            raise ValueError(
                f"cost_weight + latency_weight = {self.cost_weight + self.latency_weight} must be < 1, "
                "otherwise a correct but expensive answer could score below a wrong, cheap one; "
                "lower the weights (or raise the budgets to make the penalties gentler)")


def weighted_tokens(cost, config=RewardConfig()):
    """Prompt and generated tokens of the whole tree, in generated-token units."""
    return (config.prompt_token_weight * cost.prompt_tokens
            + config.generated_token_weight * cost.generated_tokens)


def compute_reward(correctness, cost, config=RewardConfig()):
    """Every term of the reward. cost: anything with .prompt_tokens, .generated_tokens and
    .critical_path_tokens (trace.Cost). correctness: tasks.score(...), in [0, 1]."""
    correctness = float(correctness)
    if not 0.0 <= correctness <= 1.0:
        raise ValueError(f"correctness must be in [0, 1] (a tasks.score value), got {correctness}")
    for name in ("prompt_tokens", "generated_tokens", "critical_path_tokens"):
        if getattr(cost, name) < 0:
            raise ValueError(f"cost.{name} must be >= 0, got {getattr(cost, name)}")
    cost_fraction = min(1.0, weighted_tokens(cost, config) / config.cost_budget)
    latency_fraction = min(1.0, cost.critical_path_tokens / config.latency_budget)
    cost_penalty = config.cost_weight * cost_fraction
    latency_penalty = config.latency_weight * latency_fraction
    return {"reward": correctness - cost_penalty - latency_penalty,
            "correctness": correctness,
            "cost_penalty": cost_penalty,
            "latency_penalty": latency_penalty}


def reward_for(task, rollout, config=RewardConfig()):
    """compute_reward for a trace.Rollout on a tasks.Task (no answer scores 0)."""
    return compute_reward(tasks.score(task, rollout.answer), rollout.cost, config)


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
