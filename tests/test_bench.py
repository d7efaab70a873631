"""bench.py in tiny configurations: each comparison does the same work on both sides (not its speed)."""

import json
import statistics

import pytest
import torch

import bench
import lora
from conftest import load_smollm_tokenizer, make_tiny_model, make_tiny_policy, summation_tolerance


def logits_tolerance(policy, input_ids_BT):
    """summation_tolerance at the size of the logits of these ids: two scorings of the same log-probs
    (logit - logsumexp, both of that size) that sum in another order differ by float32 steps there."""
    with torch.no_grad():
        logits = policy.model(input_ids=input_ids_BT, attention_mask=torch.ones_like(input_ids_BT)).logits
    return summation_tolerance(logits.float().abs().max())


def test_forced_length_samples_and_canned_root(tiny_policy):
    prompt = tiny_policy.chat_ids([{"role": "user", "content": "hello"}])
    forced = bench.without_end_of_turn(tiny_policy)
    assert all(len(s.token_ids) == 7 for s in forced.sample([prompt, prompt[3:]], max_new_tokens=7))
    canned = bench.CannedRoot(tiny_policy, "FINAL(1)", sub_call_tokens=5)
    root = canned.chat_ids([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    first, second = canned.sample([root, prompt], max_new_tokens=100)
    assert "```repl\nFINAL(1)\n```" in tiny_policy.decode(first.token_ids)
    assert len(second.token_ids) == 5 and canned.model_calls == 1


def test_fanout_both_sides_make_the_same_sub_calls_and_tokens(tiny_policy):
    k, n = 4, 6
    context = bench.text(k * 100)
    fast = bench.fanout_rollout(tiny_policy, k, n, context, allow_async=True)
    slow = bench.fanout_rollout(tiny_policy, k, n, context, allow_async=False)
    assert fast["sub_calls"] == slow["sub_calls"] == k
    assert fast["tokens"] == slow["tokens"] == k * n
    assert fast["prompt_tokens"] == slow["prompt_tokens"]  # the same prompts
    assert slow["model_calls"] == k and fast["model_calls"] < k  # one at a time vs batched
    [r] = bench.bench_fanout(tiny_policy, [2], 4, 100, repeats=1)
    assert r["async_stats"]["tokens"] == r["sync_stats"]["tokens"] == 8
    # the figures are what they say: medians of the recorded times, and one at a time / async
    assert r["seconds"] == statistics.median(r["times"]["async"]) and len(r["times"]["async"]) == 1
    assert r["baseline_seconds"] == statistics.median(r["times"]["sync"]) and len(r["times"]["sync"]) == 1
    assert r["ratio"] == pytest.approx(r["baseline_seconds"] / r["seconds"]) and r["met"] is None  # target at K=8


def test_batcher_and_raw_generate_produce_the_same_token_counts(tiny_policy):
    [r] = bench.bench_batcher(tiny_policy, batch=3, new_tokens=5, chunk_chars=60, repeats=1)
    assert r["tokens"] == r["baseline_tokens"] == 15
    assert r["seconds"] == statistics.median(r["times"]["batcher"])
    assert r["baseline_seconds"] == statistics.median(r["times"]["raw"])
    # tokens per second of the Batcher over those of the raw generate, and the target read off that ratio
    assert r["ratio"] == pytest.approx((r["tokens"] / r["seconds"]) / (r["baseline_tokens"] / r["baseline_seconds"]))
    assert r["target"] == ">= 0.9" and r["met"] == (r["ratio"] >= 0.9)


def test_plain_and_chunked_scoring_agree_in_process(tiny_policy):
    torch.manual_seed(0)
    input_ids_BT = torch.randint(1000, (2, 40))
    attention_mask_BT = torch.ones_like(input_ids_BT)
    loss_mask_BT = (torch.rand(2, 40) < 0.5).long()
    with torch.no_grad():
        chunked = tiny_policy.logprobs(input_ids_BT, attention_mask_BT, loss_mask_BT, chunk_size=16)
        plain = bench.plain_logprobs(tiny_policy, input_ids_BT, attention_mask_BT, loss_mask_BT)
    assert (chunked - plain).abs().max().item() <= logits_tolerance(tiny_policy, input_ids_BT)


def test_memory_measures_both_sides_in_fresh_processes(tmp_path, monkeypatch):
    # The children load on the default device, CUDA in bf16 when a GPU is visible; this test means the
    # float32 CPU measurement, so they see no GPU.
    monkeypatch.setitem(bench.CHILD_ENV, "CUDA_VISIBLE_DEVICES", "")
    tokenizer = load_smollm_tokenizer()
    model = make_tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    [r] = bench.bench_memory(str(tmp_path), batch=2, seq_len=48, grads=(True,))
    torch.manual_seed(0)   # the children's random ids (memory_child)
    input_ids_BT = torch.randint(model.config.vocab_size, (2, 48))
    assert r["max_abs_diff"] <= logits_tolerance(lora.Policy.from_model(model, tokenizer), input_ids_BT)
    assert r["agree"] == (r["max_abs_diff"] <= 1e-4)   # bench.py's own published criterion
    # a peak is a positive number of bytes (the scores alone are 2 x 48 floats), and the row is their ratio
    assert r["peak_bytes"] > 0 and r["baseline_peak_bytes"] > 0
    assert r["ratio"] == pytest.approx(r["peak_bytes"] / r["baseline_peak_bytes"])
    assert r["target"] == "<= 0.25" and r["met"] == (r["ratio"] <= 0.25)


def test_repl_and_tasks_rows_are_measured_over_baseline():
    rows = bench.bench_repl(context_chars=200_000, repeats=1) + bench.bench_tasks(20_000, repeats=1)
    assert [r["bench"] for r in rows] == ["repl"] * 3 + ["tasks"] * len(bench.tasks.FAMILIES)
    assert [r["what"] for r in rows[3:]] == [f"make_task {f} 20,000 chars" for f in bench.tasks.FAMILIES]
    for r in rows:   # each ratio is its own measured time over its baseline's, informative (no target)
        assert r["ratio"] == pytest.approx(r["seconds"] / r["baseline_seconds"]) and r["met"] is None
    assert len({r["baseline_seconds"] for r in rows[3:]}) == 1   # the tasks share one baseline


def test_merge_sides_sample_the_same_policy_in_float32_and_leave_the_weights_alone():
    policy = make_tiny_policy(seed=1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)   # so that merging changes the weights
    bf16 = lora.Policy.from_model(make_tiny_model(policy.tokenizer, seed=1), policy.tokenizer, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    prompt = policy.chat_ids([{"role": "user", "content": "hello"}])
    [now] = policy.sample([prompt], max_new_tokens=6, seeds=[3])
    [old] = bench.merging_every_call(policy).sample([prompt], max_new_tokens=6, seeds=[3])
    # the same float32 sums (W + BA, then the same decoding): equal up to summation order at most
    ids = torch.tensor([prompt + now.token_ids])
    assert now.token_ids == old.token_ids
    assert now.logprobs == pytest.approx(old.logprobs, abs=logits_tolerance(policy, ids))
    kept, call, gap = bench.bench_merge(policy, bf16, new_tokens=4, repeats=1)
    for r, sides in ((kept, ("kept", "every call")), (call, ("now", "before"))):
        assert r["seconds"] == statistics.median(r["times"][sides[0]])
        assert r["baseline_seconds"] == statistics.median(r["times"][sides[1]])
        assert r["ratio"] == pytest.approx(r["seconds"] / r["baseline_seconds"])
    assert gap["tokens"] == gap["baseline_tokens"] == 8 * 4 and 0 < gap["lost_delta_fraction"] < 1
    assert gap["ratio"] == pytest.approx(gap["gap_mean"] / gap["baseline_gap_mean"])
    assert all(torch.equal(p, before[n]) for n, p in policy.model.named_parameters())


def test_training_step_reports_both_parts_and_restores_the_adapter():
    policy = make_tiny_policy(seed=1)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    rollouts, update = bench.bench_train(policy, bench.TINY["train_argv"].split())
    # each part over the whole step (their sum): the ratios are their shares, adding up to 1
    assert rollouts["ratio"] == pytest.approx(rollouts["seconds"] / (rollouts["seconds"] + update["seconds"]))
    assert rollouts["ratio"] + update["ratio"] == pytest.approx(1.0)
    assert rollouts["generated_tokens"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))


def test_table_marks_missed_targets_and_main_writes_json(tmp_path, capsys):
    rows = [bench.row("x", "fast", "1 s", "4 s", 4.0, target=(">=", 4.0)),
            bench.row("x", "small", "9 MB", "10 MB", 0.9, target=("<=", 0.25)), bench.row("x", "info", "", "", 1.0)]
    assert [r["met"] for r in rows] == [True, False, None]
    table = bench.format_table(rows)
    assert "MISSED" in table and "met" in table
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--only", "tasks", "--task-chars", "5000", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] and len(report["rows"]) == len(bench.tasks.FAMILIES) and report["settings"]["tiny"]
    assert "make_task niah" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--only", "nonsense"])


def test_rows_trains_fewer_tokens_for_fewer_kinds_of_call_and_restores_the_adapter(tiny_policy):
    before = [p.detach().clone() for p in tiny_policy.trainable_parameters()]
    rows = bench.bench_rows(tiny_policy, length=3000, n_rollouts=1)
    assert [r["what"].split(",")[1].split()[0] for r in rows] == ["train_calls=rlm", "train_calls=root"]
    rlm, root = rows
    # every row carries its own prompt: fewer kinds of call, fewer tokens to score and train on
    assert 0 < root["row_tokens"] < rlm["row_tokens"] and 0 < root["sampled_tokens"] < rlm["sampled_tokens"]
    assert all(torch.equal(p, b) for p, b in zip(tiny_policy.trainable_parameters(), before))
