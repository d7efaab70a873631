"""train.py on a tiny model: LoRA-only updates that follow the advantage, whole checkpoints, exact resume, refusals."""

import asyncio
import functools
import io
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import config as run_config
import grpo
import train
from conftest import make_tiny_policy
from rlm import RLM, Batcher
from trace import Call, Cost, Rollout

# Two warm-start steps (one demonstration of each of niah's 5 strategies, 3 to a step), then 2 RL steps.
TINY_RUN = ["--steps", "2", "--tasks_per_step", "1", "--group_size", "2", "--families", "niah", "--lengths", "2000",
            "--warm_demos", "1", "--warm_epochs", "1", "--warm_batch", "3", "--warm_lengths", "2000",
            "--max_turns", "1", "--max_new_tokens", "160", "--max_generated_tokens", "512", "--eval_n", "0",
            "--eval_every", "0", "--eval_lengths", "2000", "--checkpoint_every", "1", "--lr", "0.01",
            "--warm_strategies", "regex,look,window,split_async,split_sync"]
# With a GPU visible, parse_config starts from GPU_SIZED: the flags above pin the rest to the CPU
# defaults, so every machine runs the same configuration.
TINY_RUN += [x for k in train.GPU_SIZED if f"--{k}" not in TINY_RUN for x in (f"--{k}", str(train.DEFAULTS[k]))]


@pytest.fixture(scope="module", autouse=True)
def cpu_float32():
    """train.main loads its policy on the default device: with a GPU visible, CUDA in bf16, where
    neither the exact resume comparisons nor the sampled ids these tests rely on are the same
    computation. These tests mean the CPU float32 run, so train.py gets exactly that."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "load_policy", functools.partial(train.load_policy, device="cpu", dtype="float32"))
        yield


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
        stats = grpo.grpo_step(policy, optimizer, rollouts, [0.5, -0.5], **train.update_settings(cfg))
        logprobs.append(rollout_logprob(policy, rollouts[0]))
    assert stats["train_rows"] == 2 and stats["grad_norm"] > 0
    assert logprobs[-1] > start and logprobs == sorted(logprobs)
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_the_warm_start_clones_at_temperature_one_whatever_rl_samples_at():
    # Behaviour cloning is the plain NLL of the teacher's tokens: the warm step must not depend on
    # the RL temperature in the config, and its NLL is the one scored at temperature 1.
    adapters, nlls = [], []
    for rl_temperature in (0.4, 1.0):
        policy = make_tiny_policy(seed=8)
        demos = fixed_rollouts(policy, [policy.encode("The key is 7.") + [policy.eos_token_ids[0]],
                                        policy.encode(" banana purple window")])
        tokens = sum(sum(r.calls[0].sampled_mask) for r in demos)
        expected_nll = -sum(rollout_logprob(policy, r) for r in demos) / tokens   # at temperature 1
        stats = train.warm_step(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2), demos,
                                config(temperature=rl_temperature))
        # the NLL is computed in float32 over ~20 log-probs of size ~10: equal to a few float32 steps
        assert stats["nll"] == pytest.approx(expected_nll, rel=1e-5)
        adapters.append([p.detach().clone() for p in policy.trainable_parameters()])
        nlls.append(stats["nll"])
    assert nlls[0] == nlls[1]   # the same computation, bit for bit: the temperature played no part
    assert all(torch.equal(a, b) for a, b in zip(*adapters))


def test_equal_rewards_leave_the_adapter_alone():
    policy = make_tiny_policy(seed=4)
    rollouts = sampled_rollouts(policy)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    advantages = train.group_advantages([0.5, 0.5], 2)
    stats = grpo.grpo_step(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2), rollouts, advantages,
                           **train.update_settings(config()))
    assert advantages.tolist() == [0.0, 0.0] and stats["train_rows"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))


def test_the_update_checkpoints_activations_even_before_any_sampling():
    policy = make_tiny_policy(seed=7)
    policy.enable_gradient_checkpointing()
    policy.model.eval()  # as a model may come to its first update (HF skips checkpointing in eval mode)
    rollouts = fixed_rollouts(policy, [policy.encode("The key is 7."), policy.encode(" banana purple window")])
    mlp_calls = []
    policy.model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    grpo.grpo_step(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3), rollouts, [0.5, -0.5],
                   **train.update_settings(config()))
    assert len(mlp_calls) == 2  # two short rows, one micro-batch: its forward, and again in backward


def run_flags(model_dir, out_dir):
    """TINY_RUN on the tiny model, sampling at temperature 1 (seeded per rollout, so a resumed run
    replays the same draws), with an evaluation at the end."""
    return TINY_RUN + ["--model", model_dir, "--temperature", "1.0", "--eval_n", "1", "--out_dir", out_dir]


@pytest.fixture(scope="module")
def whole_run(tiny_model_dir, tmp_path_factory):
    """The out_dir of an unstopped run of run_flags: 2 steps, a checkpoint after each, an evaluation at the end."""
    out_dir = str(tmp_path_factory.mktemp("whole"))
    train.main(run_flags(tiny_model_dir, out_dir))
    return out_dir


def test_train_runs_end_to_end(whole_run):
    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl", "adapter/adapter_model.safetensors",
                 "checkpoint/state.pt", "checkpoint/adapter/adapter_model.safetensors"):
        assert os.path.exists(os.path.join(whole_run, name)), name
    metrics = [json.loads(line) for line in open(os.path.join(whole_run, "metrics.jsonl"))]
    assert [(m["step"], m["phase"]) for m in metrics] == [(1, "warm"), (2, "warm"), (3, "rl"), (4, "rl")]
    assert metrics[0]["train_rows"] >= 3 and metrics[0]["nll"] > 0  # three demonstrations, their sub-calls too
    for key in ("reward", "correctness", "cost_penalty", "latency_penalty", "accuracy", "generated_tokens",
                "llm_query", "rlm_query", "depth", "critical_path", "rollout_seconds", "update_seconds",
                "grad_norm", "clip_fraction", "kl", "zero_spread", "lr", "max_length"):
        assert key in metrics[2], key
    evals = [json.loads(line) for line in open(os.path.join(whole_run, "eval.jsonl"))]
    assert [(e["step"], e["label"]) for e in evals] == [(0, "before"), (4, "after")]
    adapter = load_file(os.path.join(whole_run, "adapter", "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained
    assert sorted(os.listdir(whole_run)) == ["adapter", "checkpoint", "curves.png", "eval.jsonl", "eval_after.html",
                                             "eval_before.html", "metrics.jsonl", "samples.jsonl"]
    samples = [json.loads(line) for line in open(os.path.join(whole_run, "samples.jsonl"))]
    assert len(samples) == 2  # one rollout per task per RL step: 1 task a step, 2 steps


def test_all_samples_keeps_every_rollout_of_a_step(tiny_model_dir, tmp_path):
    """--all_samples writes every rollout of a group (here 2), to see which plans a step reinforced."""
    train.main(TINY_RUN + ["--model", tiny_model_dir, "--out_dir", str(tmp_path), "--warm_demos", "0",
                           "--steps", "1", "--all_samples"])
    samples = [json.loads(line) for line in open(os.path.join(tmp_path, "samples.jsonl"))]
    assert len(samples) == 2 and samples[0]["query"] == samples[1]["query"]


class Killed(BaseException):
    """A crash: like a SIGKILL, nothing in train.py catches it."""


def fail_on_call(monkeypatch, target, name, error, n, counts=lambda *args: True, first=None):
    """The n-th call of target.name that `counts` raises `error`, after first(real, *args) if given."""
    real, calls = getattr(target, name), []

    def wrapper(*args, **kwargs):
        calls.append(counts(*args))
        if sum(calls) == n and calls[-1]:
            if first:
                first(real, *args)
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def write_half(torch_save, obj, path):
    buffer = io.BytesIO()
    torch_save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])


# Each stops the run somewhere in its 2 warm-start and 2 RL steps; what the stop leaves must resume to
# the unstopped run.
STOPS = {
    "ctrl-c in the warm start": dict(target=train, name="grpo_step", error=KeyboardInterrupt, n=2),
    "ctrl-c in the rollouts": dict(target=train, name="collect", error=KeyboardInterrupt, n=2),
    "crash saving the first RL step": dict(target=torch, name="save", error=Killed, n=3, first=write_half),
    "crash while writing state.pt": dict(target=torch, name="save", error=Killed, n=2, first=write_half),
    "crash between the checkpoint's renames": dict(target=os, name="rename", error=Killed, n=2,
                                                   counts=lambda src, dst: dst.endswith("checkpoint")),
    "ctrl-c in the final evaluation": dict(target=train, name="run_eval", error=KeyboardInterrupt, n=2),
}


def reproducible(x):
    """x without what no two runs share: timings, and the log-probs recorded while sampling, whose last
    bits depend on which rows thread timing put in one batch (the sampled ids do not)."""
    if isinstance(x, dict):
        return {k: reproducible(v) for k, v in x.items()
                if "seconds" not in k and k not in ("started", "ended", "sampling_logprobs")}
    return [reproducible(v) for v in x] if isinstance(x, list) else x


def read_lines(path):
    return [reproducible(json.loads(line)) for line in open(path)]


@pytest.mark.parametrize("stop", STOPS)
def test_resume_with_no_flags_continues_a_stopped_run_to_the_unstopped_result(stop, whole_run, tiny_model_dir,
                                                                              tmp_path, monkeypatch):
    parts = str(tmp_path / "parts")
    with monkeypatch.context() as patch:
        fail_on_call(patch, **STOPS[stop])
        with pytest.raises((SystemExit, Killed)):
            train.main(run_flags(tiny_model_dir, parts))
    train.main(["--resume", "--out_dir", parts])  # from a whole checkpoint, whatever the stop left
    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
        assert read_lines(os.path.join(parts, name)) == read_lines(os.path.join(whole_run, name)), name
    for name in ("adapter", "checkpoint/adapter"):
        a = load_file(os.path.join(whole_run, name, "adapter_model.safetensors"))
        b = load_file(os.path.join(parts, name, "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(os.listdir(parts)) == sorted(os.listdir(whole_run))  # no half-written folder left behind


@pytest.mark.parametrize("flags, message", [
    (["--group_size", "4"], "--group_size: saved 2, given 4"),
    (["--cost_weight", "0.2", "--lora_rank", "8"], "--cost_weight: saved 0.1, given 0.2\n  - --lora_rank: saved 16"),
    (["--model", "another-model"], "--model: saved"),
    (["--steps", "1"], "the checkpoint has done 2 steps"),
    (["--eval_every", "1"], "--eval_every: saved 0, given 1"),  # it drives the curriculum
])
def test_resume_refuses_flags_that_would_make_another_experiment(flags, message, whole_run):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out_dir", whole_run] + flags)
    assert message in str(exit_info.value)


def test_resume_accepts_more_steps_and_flags_that_repeat_the_saved_values(whole_run, tmp_path):
    out_dir = str(tmp_path / "longer")
    shutil.copytree(whole_run, out_dir)
    train.main(["--resume", "--out_dir", out_dir, "--steps", "3", "--eval_lengths", "3000", "--group_size", "2"])
    assert [m["step"] for m in read_lines(os.path.join(out_dir, "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    evals = read_lines(os.path.join(out_dir, "eval.jsonl"))
    assert [(e["step"], e["label"]) for e in evals] == [(0, "before"), (4, "after"), (5, "after")]
    assert {row["length"] for row in evals[-1]["summary"]} == {3000}
    state = torch.load(os.path.join(out_dir, "checkpoint", "state.pt"), weights_only=False)
    assert state["step"] == 5 and state["config"]["steps"] == 3 and state["config"]["max_new_tokens"] == 160


def test_mixed_warm_batches_hold_the_habit_mix_and_the_default_order_is_the_plain_shuffle():
    import random

    strategies = [("tally", "sync")] * 16 + [("tally", "async")] * 4
    order = train.warm_order(strategies, epochs=2, seed=7, mix_batches=True)
    for epoch in (order[:20], order[20:]):
        assert sorted(epoch) == list(range(20))  # each epoch shows every demonstration once
        for k in range(0, 20, 5):  # batches of 5: one of the 4 async demonstrations in each
            assert sum(strategies[i][1] == "async" for i in epoch[k:k + 5]) == 1
    assert order[:20] != order[20:]  # still shuffled, epoch by epoch
    plain = train.warm_order(strategies, epochs=2, seed=7)
    assert plain == [i for e in range(2) for i in random.Random(f"7-warm-{e}").sample(range(20), 20)]


def test_keep_adapters_keeps_each_checkpoints_adapter_beside_the_last(whole_run, tmp_path):
    out_dir = str(tmp_path / "kept")
    shutil.copytree(whole_run, out_dir)
    train.main(["--resume", "--out_dir", out_dir, "--steps", "3", "--keep_adapters"])
    assert os.listdir(os.path.join(out_dir, "steps")) == ["step-5"]  # from the resume on: step 4 was not kept
    kept = load_file(os.path.join(out_dir, "steps", "step-5", "adapter_model.safetensors"))
    final = load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)
    assert os.path.exists(os.path.join(out_dir, "steps", "step-5", "adapter_config.json"))  # loadable by PEFT


@pytest.mark.parametrize("flags, message", [
    (["--group_size", "1"], "group_size must be at least 2"),
    (["--max_generated_tokens", "0"], "max_generated_tokens must be at least 1"),
    (["--families", "poetry"], "unknown task families"),
    (["--cost_weight", "0.6", "--latency_weight", "0.6"], "cost_weight"),
    (["--warm_strategies", "look,chunks_async"], "['chunks_async'] not strategies of --families niah"),
    (["--eval_wordings", "seen,unseen"], "--eval_wordings must be seen, held_out or seen,held_out"),
    (["--warm_strategies", "habits", "--families", "niah,source"], "teacher.HABITS has no habits for source"),
    (["--train_calls", "children"], "--train_calls must be one of all, rlm, root"),
    (["--max_call_sub_calls", "-1"], "--max_call_sub_calls must be at least 0"),
    (["--optimizer", "adam"], "--optimizer must be adamw or sgd"),
])
def test_a_config_that_cannot_work_is_refused_at_start(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_config.check_config(train.parse_config(flags))
    assert message in str(exit_info.value)


def test_rl_steps_with_sgd_when_asked_and_the_warm_start_stays_adamw(tiny_policy):
    cfg = train.parse_config(["--optimizer", "sgd", "--lr", "50"])
    rl, warm = train.new_optimizer(tiny_policy, cfg, "rl"), train.new_optimizer(tiny_policy, cfg, "warm")
    assert type(rl) is torch.optim.SGD and rl.defaults["lr"] == 50
    assert type(warm) is torch.optim.AdamW and warm.defaults["lr"] == cfg["warm_lr"]
    assert type(train.new_optimizer(tiny_policy, train.parse_config([]), "rl")) is torch.optim.AdamW


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
    first = grpo.grpo_step(policy, optimizer, rollouts, [1.0, 0.0],
                           **train.update_settings(config(epochs=3, beta=0.1)))
    assert first["kl"] is not None and first["kl"] > 0  # the adapter moved away from the base in epochs 2-3
    # Epoch 1 has ratio 1 and clips nothing, so at most the later two thirds of the tokens seen clip
    # (test_later_epochs_clip_and_the_first_cannot shows it epoch by epoch)
    assert 0 < first["clip_fraction"] <= 2 / 3
    no_ref = grpo.grpo_step(policy, optimizer, rollouts, [1.0, 0.0], **train.update_settings(config()))
    assert no_ref["kl"] is None  # beta = 0: no reference pass, so nothing is claimed


def test_the_curriculum_decides_on_a_split_the_final_evaluation_never_uses(tmp_path, monkeypatch):
    asked, worded = {}, {}

    def suite(families, lengths, n, split="eval", start=0, wordings=("seen",)):
        from eval import held_out_suite
        tasks = held_out_suite(families, lengths, n, split=split, start=start, wordings=wordings)
        asked.setdefault(split, set()).update(t.seed for ts in tasks.values() for t in ts)
        worded.setdefault(split, set()).update(t.wording for ts in tasks.values() for t in ts)
        return {}   # nothing to roll out: only which tasks were asked for matters here

    async def no_rollouts(*args, **kwargs):
        return []
    monkeypatch.setattr(train, "held_out_suite", suite)
    monkeypatch.setattr(train, "evaluate", no_rollouts)
    monkeypatch.setattr(train, "write_html", lambda *a, **k: None)
    cfg = config(out_dir=str(tmp_path), eval_n=8, families="niah,multihop")
    for label in ("before", "curriculum", "after"):
        train.run_eval(None, None, cfg, 0, [8000], label)
    assert set(asked) == {"validation", "eval"}
    assert len(asked["validation"]) == len(asked["eval"]) == 16 and not asked["validation"] & asked["eval"]
    # The curriculum promotes on seen wordings; before and after report both (held-out ones too).
    assert worded == {"validation": {"seen"}, "eval": {"seen", "held_out"}}


def test_later_epochs_clip_and_the_first_cannot(monkeypatch):
    # Disjoint fixed replies (no sampling), one winner and one loser. The first epoch scores with the
    # weights the old log-probs came from: ratio 1 up to float noise, far inside [1 - 0.2, 1 + 0.28],
    # so nothing clips. Adam's first step moves every LoRA B entry by lr (its size does not depend on
    # the gradient's), and at lr 1e-2 the tiny model's log-probs of these tokens move by tens of nats
    # (ratios beyond 1e3 or below 1e-3, one CPU: every token clips), far past either clip edge on
    # any machine.
    per_call = []
    real = grpo.loss_stats
    monkeypatch.setattr(grpo, "loss_stats", lambda *a, **k: per_call.append(real(*a, **k)) or per_call[-1])
    policy = make_tiny_policy(seed=6)
    rollouts = fixed_rollouts(policy, [policy.encode("The key is 7."), policy.encode(" banana purple window")])
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    stats = grpo.grpo_step(policy, optimizer, rollouts, [1.0, -1.0], **train.update_settings(config(epochs=2)))
    assert len(per_call) == 2  # one micro-batch, two epochs
    first, second = per_call
    # (float noise moves a ratio by a few 1e-4 at most; clipping needs 0.2)
    assert first["clip_fraction"] == 0.0 and first["ratio"] == pytest.approx(1.0, abs=1e-2)
    assert second["clip_fraction"] > 0
    # what update reports is over both epochs, weighted by tokens (the same tokens each epoch)
    assert first["n_tokens"] == second["n_tokens"]
    assert stats["clip_fraction"] == pytest.approx((first["clip_fraction"] + second["clip_fraction"]) / 2)


def test_the_warm_start_clones_only_the_strategies_asked_for(tiny_model_dir):
    policy = train.load_policy(tiny_model_dir, device="cpu", dtype="float32")
    cfg = config(warm_demos=2, warm_epochs=1, warm_batch=1, warm_strategies="look", warm_lengths="2000")
    batches = train.warm_start_batches(policy, cfg)
    assert len(batches) == 2
    for (rollout,) in batches:   # look: print the key's lines, then answer in a second turn
        assert "# plan:" in rollout.calls[0].turns[0]["reply"] and len(rollout.calls[0].turns) == 2
        assert "print(" in rollout.calls[0].turns[0]["reply"] and len(rollout.calls) == 1
