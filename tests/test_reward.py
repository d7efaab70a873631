"""The reward orders rollouts as its docstring promises, and reports every term."""

from types import SimpleNamespace

import pytest

from reward import RewardConfig, compute_reward, reward_for, weighted_tokens
from tasks import make_task


def cost(prompt=0, generated=0, critical=None):
    return SimpleNamespace(prompt_tokens=prompt, generated_tokens=generated,
                           critical_path_tokens=generated if critical is None else critical)


def r(correctness, c, config=RewardConfig()):
    return compute_reward(correctness, c, config)["reward"]


def test_every_term_is_reported_and_adds_up():
    terms = compute_reward(0.75, cost(8_000, 2_000, 1_024))
    assert set(terms) == {"reward", "correctness", "cost_penalty", "latency_penalty"}
    assert terms["correctness"] == 0.75
    assert terms["cost_penalty"] == pytest.approx(0.1 * (0.25 * 8_000 + 2_000) / 32_000)
    assert terms["latency_penalty"] == pytest.approx(0.1 * 1_024 / 4_096)
    assert terms["reward"] == pytest.approx(0.75 - terms["cost_penalty"] - terms["latency_penalty"])


@pytest.mark.parametrize("config", [RewardConfig(), RewardConfig(cost_weight=0.6, latency_weight=0.39),
                                    RewardConfig(cost_budget=100, latency_budget=10)])
def test_correct_beats_wrong_at_any_cost(config):
    free = cost(0, 0, 0)
    within = cost(60_000, 10_000, 3_000)
    at_budget = cost(4 * config.cost_budget, 0, config.latency_budget)
    far_beyond = cost(10**9, 10**8, 10**8)
    for dear in (within, at_budget, far_beyond):
        assert r(1.0, dear, config) > r(0.0, free, config)
    # Clipping: beyond the budget costs no more than at the budget.
    assert r(1.0, far_beyond, config) == pytest.approx(r(1.0, at_budget, config))
    assert r(1.0, far_beyond, config) == pytest.approx(1 - config.cost_weight - config.latency_weight)


def test_cheaper_beats_dearer_when_equally_correct():
    assert r(1.0, cost(4_000, 500)) > r(1.0, cost(8_000, 500))
    assert r(1.0, cost(4_000, 500)) > r(1.0, cost(4_000, 900, 500))
    assert r(0.0, cost(4_000, 500)) > r(0.0, cost(40_000, 3_000))


def test_shorter_critical_path_beats_longer_at_equal_tokens():
    # Same tree tokens; sub-calls run concurrently (critical path 800) or one after another (3200).
    parallel, sequential = cost(20_000, 3_200, 800), cost(20_000, 3_200, 3_200)
    assert compute_reward(1.0, parallel)["cost_penalty"] == compute_reward(1.0, sequential)["cost_penalty"]
    assert r(1.0, parallel) > r(1.0, sequential)


def test_prompt_tokens_cost_less_than_generated():
    config = RewardConfig()
    assert weighted_tokens(cost(1_000, 0), config) < weighted_tokens(cost(0, 1_000), config)
    # Latency equal so that only the cost term differs.
    assert r(1.0, cost(1_000, 0, 100)) > r(1.0, cost(0, 1_000, 100))


def test_no_answer_scores_zero_correctness():
    task = make_task("multihop", 3_000, 0)
    c = cost(1_000, 200)
    none = reward_for(task, SimpleNamespace(answer=None, cost=c))
    right = reward_for(task, SimpleNamespace(answer=task.answer, cost=c))
    assert none["correctness"] == 0.0 and right["correctness"] == 1.0
    assert right["reward"] - none["reward"] == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs,message", [
    ({"cost_weight": 0.5, "latency_weight": 0.5}, "must be < 1"),
    ({"cost_weight": 0.9, "latency_weight": 0.2}, "must be < 1"),
    ({"cost_weight": -0.1}, "cost_weight must be"),
    ({"prompt_token_weight": float("nan")}, "prompt_token_weight must be"),
    ({"cost_budget": 0}, "cost_budget must be"),
    ({"latency_budget": -5}, "latency_budget must be"),
])
def test_invalid_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="correctness"):
        compute_reward(1.5, cost())
    with pytest.raises(ValueError, match="generated_tokens"):
        compute_reward(1.0, cost(0, -1, 0))


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_each_penalty_reaches_its_weight_on_every_rollout_preset(preset):
    from rlm import BUDGETS
    budget = BUDGETS[preset]["max_generated_tokens"]
    config = RewardConfig.for_rollouts(budget, cost_weight=0.1, latency_weight=0.1)
    # the whole generation budget on the critical path, with 28 prompt tokens per generated token
    whole = SimpleNamespace(prompt_tokens=28 * budget, generated_tokens=budget, critical_path_tokens=budget)
    terms = compute_reward(1.0, whole, config)
    assert terms["latency_penalty"] == pytest.approx(0.1) and terms["cost_penalty"] == pytest.approx(0.1)
    half = SimpleNamespace(prompt_tokens=14 * budget, generated_tokens=budget // 2, critical_path_tokens=budget // 2)
    terms = compute_reward(1.0, half, config)
    assert terms["latency_penalty"] == pytest.approx(0.05) and terms["cost_penalty"] == pytest.approx(0.05)
