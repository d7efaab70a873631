"""train.py on a tiny model: LoRA-only updates that follow the advantage, exact resume, refusals."""

import asyncio
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import load_smollm_tokenizer, make_tiny_model, make_tiny_policy
from rlm import RLM, Batcher, Call, Cost, Rollout

TINY_RUN = ["--steps", "2", "--tasks_per_step", "1", "--group_size", "2", "--lengths", "2000",
            "--max_turns", "1", "--max_new_tokens", "16", "--max_generated_tokens", "64", "--eval_n", "0",
            "--checkpoint_every", "1", "--lr", "0.01"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model and the real tokenizer saved as an ordinary HF folder (--model PATH)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = load_smollm_tokenizer()
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def config(**overrides):
    cfg = train.parse_config(TINY_RUN)
    cfg.update(overrides)
    return cfg


def sampled_rollouts(policy, n=2):
    rlm = RLM(Batcher(policy), max_turns=0, max_new_tokens=12, max_generated_tokens=64)

    async def main():
        return await asyncio.gather(*[rlm.run("What is the key?", "the key is 7. " * 20) for _ in range(n)])

    return asyncio.run(main())


def fixed_rollouts(policy, replies):
    """Rollouts of one call each whose sampled tokens are exactly `replies` (not drawn from the model)."""
    prompt = policy.chat_ids([{"role": "user", "content": "What is the key?"}])
    rollouts = []
    for reply in replies:
        call = Call(id=0, parent=None, kind="root", depth=0, query="What is the key?")
        call.append(prompt, False)
        call.append(reply, True, [0.0] * len(reply))
        rollouts.append(Rollout("What is the key?", None, [call], Cost(), 64))
    return rollouts


def rollout_logprob(policy, rollout):
    root = rollout.calls[0]
    ids = torch.tensor([root.token_ids])
    with torch.no_grad():
        return float(policy.logprobs(ids, torch.ones_like(ids), torch.tensor([root.sampled_mask]).bool()).sum())


def test_update_changes_only_lora_and_raises_log_probs_of_positive_advantage():
    policy = make_tiny_policy(seed=3)
    # Two replies with no token in common (the second has no end-of-turn either): every
    # sampled token is pushed one way only, so the winner's log-prob must rise whatever
    # the machine. Shared tokens would be pushed both ways and make the claim a coin toss.
    winner = policy.encode("The key is 7.") + [policy.eos_token_ids[0]]
    loser = policy.encode(" banana purple window")
    assert not set(winner) & set(loser)
    rollouts = fixed_rollouts(policy, [winner, loser])
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    cfg = config()
    start = rollout_logprob(policy, rollouts[0])
    logprobs = []
    for _ in range(4):  # rollout 0 won its group (advantage +0.5), rollout 1 lost it
        stats = train.update(policy, optimizer, rollouts, [1.0, 0.0], cfg)
        logprobs.append(rollout_logprob(policy, rollouts[0]))
    assert stats["train_rows"] == 2 and stats["grad_norm"] > 0
    assert logprobs[-1] > start and logprobs == sorted(logprobs)
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_equal_rewards_leave_the_adapter_alone():
    policy = make_tiny_policy(seed=4)
    rollouts = sampled_rollouts(policy)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    stats = train.update(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2), rollouts, [0.5, 0.5],
                         config())
    assert stats["zero_spread"] == 1.0 and stats["train_rows"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))


def test_train_runs_end_to_end_and_resume_matches_an_unstopped_run(tiny_model_dir, tmp_path):
    # Sampling at temperature 1: seeded per rollout, so resuming replays the same draws.
    common = TINY_RUN + ["--model", tiny_model_dir, "--temperature", "1.0"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.main(common + ["--out_dir", whole, "--eval_n", "1"])
    train.main(common + ["--out_dir", parts, "--steps", "1"])
    train.main(common + ["--out_dir", parts, "--resume"])

    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl", "adapter/adapter_model.safetensors",
                 "checkpoint/state.pt"):
        assert os.path.exists(os.path.join(whole, name)), name
    metrics = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward", "correctness", "cost_penalty", "latency_penalty", "accuracy", "generated_tokens",
                "llm_query", "rlm_query", "depth", "critical_path", "rollout_seconds", "update_seconds",
                "grad_norm", "clip_fraction", "kl", "zero_spread", "lr"):
        assert key in metrics[0], key
    resumed = [json.loads(line) for line in open(os.path.join(parts, "metrics.jsonl"))]
    assert [m["step"] for m in resumed] == [1, 2]
    a = load_file(os.path.join(whole, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(parts, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("flags, message", [
    (["--group_size", "1"], "group_size must be at least 2"),
    (["--max_generated_tokens", "0"], "max_generated_tokens must be at least 1"),
    (["--families", "poetry"], "unknown task families"),
    (["--cost_weight", "0.6", "--latency_weight", "0.6"], "cost_weight"),
])
def test_a_config_that_cannot_work_is_refused_at_start(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.check_config(train.parse_config(flags))
    assert message in str(exit_info.value)


def test_a_missing_model_is_refused_with_a_message(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY_RUN + ["--model", str(tmp_path / "no-such-model"), "--out_dir", str(tmp_path / "o")])
    assert "could not load the model" in str(exit_info.value)


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY_RUN + ["--resume", "--out_dir", str(tmp_path)])
    assert "run without --resume" in str(exit_info.value)


def test_several_epochs_and_a_kl_term_are_measured():
    policy = make_tiny_policy(seed=6)
    # Fixed, disjoint replies: two sampled rollouts that happened to be equal would cancel out.
    rollouts = fixed_rollouts(policy, [policy.encode("The key is 7."), policy.encode(" banana purple window")])
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    first = train.update(policy, optimizer, rollouts, [1.0, 0.0], config(epochs=3, beta=0.1))
    assert first["kl"] is not None and first["kl"] > 0  # the adapter moved away from the base in epochs 2-3
    assert first["clip_fraction"] >= 0.0
    no_ref = train.update(policy, optimizer, rollouts, [1.0, 0.0], config())
    assert no_ref["kl"] is None  # beta = 0: no reference pass, so nothing is claimed
