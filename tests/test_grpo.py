"""Tests for grpo.py: the loss against hand-computed numbers, and every claim its comments make."""
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import summation_tolerance
from grpo import (Row, build_rows, dr_grpo_loss, group_advantages, loss_stats, merge_stats,
                  micro_batches, token_budget_norm, unsolved_fraction, zero_spread_fraction)


# ---- advantages -------------------------------------------------------------------------------

def test_group_advantages_subtract_group_mean_without_std():
    advantages = group_advantages([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], group_size=4)
    # group 1: mean 0.5; group 2: mean 0 (all equal). No division by the std (it would give +-1).
    assert advantages.dtype == torch.float32
    assert advantages.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    skewed = group_advantages(torch.tensor([3.0, 0.0, 0.0]), group_size=3)
    assert torch.allclose(skewed, torch.tensor([2.0, -1.0, -1.0]))


def test_group_advantages_equal_rewards_are_exactly_zero():
    # 0.3 * 7 / 7 != 0.3 in float32; the advantage must still be exactly 0.
    assert group_advantages([0.3] * 7, group_size=7).tolist() == [0.0] * 7
    assert group_advantages([0.1] * 3, group_size=3).tolist() == [0.0] * 3


def test_group_advantages_silence_groups_with_no_correct_rollout():
    # Two groups of wrong answers that differ only in cost, and one group with a right answer.
    rewards = [-0.01, -0.02, -0.03, -0.04, 0.99, -0.02, -0.03, -0.04]
    correctness = [0, 0, 0, 0, 1, 0, 0, 0]
    plain = group_advantages(rewards, group_size=4)
    assert plain[:4].abs().sum() > 0  # the cost terms alone spread the wrong group
    gated = group_advantages(rewards, group_size=4, correctness_N=correctness)
    assert gated[:4].tolist() == [0.0] * 4
    assert torch.equal(gated[4:], plain[4:])  # a solved group keeps every advantage, cost included
    assert gated[4] > 0 and (gated[5:] < 0).all()
    assert unsolved_fraction(correctness, group_size=4) == 0.5


def test_partial_credit_does_not_make_a_group_solved():
    # Four wrong counts with partial credit (0.75 ** |error|): close guesses, none of them right.
    # Only full credit solves a task, so this group teaches nothing, while a group with one exact
    # count among partial ones is solved and keeps its advantages.
    guesses = [0.42, 0.13, 0.08, 0.03]
    one_right = [1.0, 0.42, 0.13, 0.08]
    rewards = [c - 0.01 for c in guesses + one_right]
    gated = group_advantages(rewards, group_size=4, correctness_N=guesses + one_right)
    assert gated[:4].tolist() == [0.0] * 4
    assert torch.equal(gated[4:], group_advantages(rewards, group_size=4)[4:])
    assert unsolved_fraction(guesses + one_right, group_size=4) == 0.5
    # a per-family bar can be set explicitly
    assert group_advantages(rewards, 4, correctness_N=guesses + one_right, solved_at=0.4)[:4].abs().sum() > 0


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages([1.0, 0.0, 1.0], group_size=2)
    with pytest.raises(ValueError, match="group_size must be"):
        group_advantages([1.0, 0.0], group_size=1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        zero_spread_fraction([1.0, 0.0, 1.0], group_size=2)


def test_zero_spread_fraction():
    rewards = [1, 1, 1,  0, 1, 0,  0.5, 0.5, 0.5,  0, 0, 1]
    assert zero_spread_fraction(rewards, group_size=3) == 0.5
    assert zero_spread_fraction([], group_size=3) == 0.0


def test_token_budget_norm():
    assert token_budget_norm(8, 4096) == 8 * 4096
    with pytest.raises(ValueError):
        token_budget_norm(0, 4096)


# ---- the loss against hand-computed values ----------------------------------------------------

# 2 rows x 3 tokens, eps_low = eps_high = 0.2, so the clip range is [0.8, 1.2].
# Row 0, A = +1:  ratio 1.5 -> clipped:   -min(1.5*1, 1.2*1) = -1.2
#                 ratio 1.1 -> unclipped: -min(1.1*1, 1.1*1) = -1.1
#                 ratio 0.5 -> unclipped: -min(0.5*1, 0.8*1) = -0.5  (A > 0 never clips below)
# Row 1, A = -2:  ratio 0.5 -> clipped:   -min(0.5*-2, 0.8*-2) = -min(-1.0, -1.6) = +1.6
#                 ratio 1.5 -> unclipped: -min(1.5*-2, 1.2*-2) = -min(-3.0, -2.4) = +3.0
#                 masked (a garbage log-prob there must not matter)
# sum = -1.2 - 1.1 - 0.5 + 1.6 + 3.0 = 1.8; norm = 6 -> loss 0.3
# d loss / d logp = d(-ratio*A)/d logp / norm = -ratio*A/6 on unclipped tokens, 0 on clipped ones:
#   row 0: [0, -1.1/6, -0.5/6]; row 1: [0, +3.0/6, 0]
RATIOS = [[1.5, 1.1, 0.5], [0.5, 1.5, 1.0]]
ADVANTAGES = [1.0, -2.0]
MASK = [[1, 1, 1], [1, 1, 0]]


def hand_case():
    old_logprobs_BT = torch.full((2, 3), -1.0)
    logprobs_BT = (old_logprobs_BT + torch.tensor(RATIOS).log()).requires_grad_()
    logprobs_BT.data[1, 2] = 50.0  # padding garbage: exp(51) is huge, but it is masked out
    return logprobs_BT, old_logprobs_BT, torch.tensor(ADVANTAGES), torch.tensor(MASK, dtype=torch.bool)


def test_loss_hand_values_with_clipping_on_both_sides():
    logprobs_BT, old_logprobs_BT, advantages_B, mask_BT = hand_case()
    loss = dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, norm=6.0)
    assert loss.item() == pytest.approx(0.3, abs=1e-6)
    loss.backward()
    expected_grad = torch.tensor([[0.0, -1.1 / 6, -0.5 / 6], [0.0, 3.0 / 6, 0.0]])
    assert torch.allclose(logprobs_BT.grad, expected_grad, atol=1e-6)


def test_loss_asymmetric_clip_range():
    # Same tokens. eps_high = 0.6 (range [0.8, 1.6]): row 0 token 0 (A = +1, ratio 1.5) no longer
    # clips, -1.5 instead of -1.2; row 1 token 0 still clips: -1.5 - 1.1 - 0.5 + 1.6 + 3.0 = 1.5 -> 0.25
    logprobs_BT, old_logprobs_BT, advantages_B, mask_BT = hand_case()
    loss = dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, norm=6.0, eps_low=0.2, eps_high=0.6)
    assert loss.item() == pytest.approx(0.25, abs=1e-6)
    # eps_low = 0.6 (range [0.4, 1.2]): row 1 token 0 (A = -2, ratio 0.5) no longer clips,
    # -(0.5 * -2) = +1.0 instead of +1.6; row 0 token 0 clips again: -1.2 - 1.1 - 0.5 + 1.0 + 3.0 = 1.2 -> 0.2
    loss = dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, norm=6.0, eps_low=0.6, eps_high=0.2)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)


def test_clip_fraction_and_ratio_stats_hand_case():
    logprobs_BT, old_logprobs_BT, advantages_B, mask_BT = hand_case()
    stats = loss_stats(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT)
    # clipped: row 0 token 0 (A > 0, 1.5 > 1.2) and row 1 token 0 (A < 0, 0.5 < 0.8): 2 of 5.
    # Row 0 token 2 (A > 0, 0.5) and row 1 token 1 (A < 0, 1.5) are outside the range but do not clip.
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["ratio"] == pytest.approx((1.5 + 1.1 + 0.5 + 0.5 + 1.5) / 5)
    assert stats["n_tokens"] == 5
    assert "kl" not in stats


def test_kl_term_hand_values():
    # A = 0 everywhere so only the KL term is left. k3 = exp(d) - d - 1 with d = ref - logp:
    #   d = ln 2  -> 2 - ln 2 - 1 = 1 - ln 2
    #   d = 0     -> 0
    #   d = -ln 2 -> 1/2 + ln 2 - 1 = ln 2 - 1/2
    # beta = 0.1, norm = 4 (3 masked tokens): loss = 0.1 * (1 - ln2 + 0 + ln2 - 1/2) / 4 = 0.0125
    # d k3 / d logp = 1 - exp(d): [-1, 0, +1/2]; times beta / norm = [-0.025, 0, 0.0125]
    logprobs_BT = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    d = math.log(2.0)
    ref_logprobs_BT = torch.tensor([[-1.0 + d, -2.0, -3.0 - d, 7.0]])
    mask_BT = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    args = (logprobs_BT, logprobs_BT.detach(), torch.zeros(1), mask_BT)
    loss = dr_grpo_loss(*args, norm=4.0, beta=0.1, ref_logprobs_BT=ref_logprobs_BT)
    assert loss.item() == pytest.approx(0.1 * ((1 - math.log(2)) + 0 + (math.log(2) - 0.5)) / 4, abs=1e-7)
    assert loss.item() == pytest.approx(0.0125, abs=1e-7)
    loss.backward()
    assert torch.allclose(logprobs_BT.grad, torch.tensor([[-0.025, 0.0, 0.0125, 0.0]]), atol=1e-7)
    stats = loss_stats(*args, ref_logprobs_BT=ref_logprobs_BT)
    assert stats["kl"] == pytest.approx(0.5 / 3)
    # beta = 0 ignores the reference entirely
    assert dr_grpo_loss(*args, norm=4.0, beta=0.0, ref_logprobs_BT=ref_logprobs_BT).item() == 0.0


def test_loss_errors():
    logprobs_BT, old_logprobs_BT, advantages_B, mask_BT = hand_case()
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, norm=6.0, beta=0.1)
    with pytest.raises(ValueError, match="norm"):
        dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, norm=0)
    with pytest.raises(ValueError, match="mask_BT"):
        dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT[:, :2], norm=6.0)
    with pytest.raises(ValueError, match="advantages_B"):
        dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B[:1], mask_BT, norm=6.0)


def test_equal_rewards_give_zero_gradient():
    advantages_N = group_advantages([0.3] * 7 + [1.0] * 7, group_size=7)
    logprobs_BT = torch.randn(14, 5, requires_grad=True)
    old_logprobs_BT = logprobs_BT.detach() + 0.3 * torch.randn(14, 5)
    loss = dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_N, torch.ones(14, 5, dtype=torch.bool), norm=70.0)
    loss.backward()
    assert torch.equal(logprobs_BT.grad, torch.zeros(14, 5))


def test_long_rows_are_not_down_weighted():
    # A 2-token and a 10-token row, same advantage, ratio 1: every token gets the same gradient,
    # -A / norm. Per-sequence mean normalisation would give -A/2 and -A/10 instead.
    logprobs_BT = torch.zeros(2, 10, requires_grad=True)
    mask_BT = torch.zeros(2, 10, dtype=torch.bool)
    mask_BT[0, :2] = True
    mask_BT[1, :] = True
    norm = token_budget_norm(2, 10)
    dr_grpo_loss(logprobs_BT, logprobs_BT.detach(), torch.tensor([1.0, 1.0]), mask_BT, norm).backward()
    assert torch.allclose(logprobs_BT.grad[mask_BT], torch.full((12,), -1.0 / 20))
    assert torch.equal(logprobs_BT.grad[~mask_BT], torch.zeros(8))


# ---- rows and micro-batches ---------------------------------------------------------------------

def fake_call(kind, depth, token_ids, sampled_mask):
    return SimpleNamespace(kind=kind, depth=depth, token_ids=token_ids, sampled_mask=sampled_mask)


def fake_rollouts():
    tree = [fake_call("root", 0, [1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 0, 0, 1]),
            fake_call("rlm_query", 1, [8, 9, 10, 11], [0, 0, 1, 1]),
            fake_call("llm_query", 2, [12, 13, 14], [0, 1, 1]),
            fake_call("llm_query", 1, [15, 16], [0, 0])]  # never got to sample: no row
    alone = [fake_call("root", 0, [20, 21, 22, 23, 24], [0, 0, 0, 1, 1])]
    return [SimpleNamespace(calls=tree), SimpleNamespace(calls=alone)]


def test_build_rows_masks_advantages_and_every_call():
    rows = build_rows(fake_rollouts(), torch.tensor([0.5, -0.5]))
    assert [(r.kind, r.depth, r.rollout_index) for r in rows] == [
        ("root", 0, 0), ("rlm_query", 1, 0), ("llm_query", 2, 0), ("root", 0, 1)]
    assert [r.loss_mask for r in rows] == [[0, 0, 1, 1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1]]
    assert rows[0].token_ids == [1, 2, 3, 4, 5, 6, 7]
    assert [r.advantage for r in rows] == [0.5, 0.5, 0.5, -0.5]  # children carry their root's advantage


def test_build_rows_skip_zero_advantage():
    rows = build_rows(fake_rollouts(), [0.0, 0.25], skip_zero_advantage=True)
    assert [(r.rollout_index, r.advantage) for r in rows] == [(1, 0.25)]
    assert len(build_rows(fake_rollouts(), [0.0, 0.25])) == 4


def test_build_rows_refuses_bad_traces():
    bad_lengths = [SimpleNamespace(calls=[fake_call("root", 0, [1, 2, 3], [0, 1])])]
    with pytest.raises(ValueError, match="3 token_ids but 2 sampled_mask"):
        build_rows(bad_lengths, [1.0])
    sampled_first = [SimpleNamespace(calls=[fake_call("root", 0, [1, 2], [1, 1])])]
    with pytest.raises(ValueError, match="first token"):
        build_rows(sampled_first, [1.0])
    with pytest.raises(ValueError, match="one advantage per rollout"):
        build_rows(fake_rollouts(), [1.0])


def test_micro_batches_pad_right_and_respect_the_token_limit():
    lengths = [3, 9, 4, 4, 20, 5, 3, 8]
    rows = [Row(list(range(1, n + 1)), [0] + [1] * (n - 1), advantage=float(i), rollout_index=i)
            for i, n in enumerate(lengths)]
    batches = micro_batches(rows, max_tokens=16, pad_id=-7)
    seen = []
    for batch in batches:
        B, T = batch.input_ids_BT.shape
        assert B * T <= 16 or B == 1  # the 20-token row gets a batch of its own
        assert batch.loss_mask_BT.dtype == torch.bool and batch.old_logprobs_BT is None
        for b in range(B):
            i = batch.rollout_index_B[b].item()
            n = lengths[i]
            assert batch.input_ids_BT[b, :n].tolist() == rows[i].token_ids
            assert (batch.input_ids_BT[b, n:] == -7).all()
            assert batch.attention_mask_BT[b].tolist() == [1] * n + [0] * (T - n)
            assert batch.loss_mask_BT[b].tolist() == [False] + [True] * (n - 1) + [False] * (T - n)
            assert batch.advantages_B[b].item() == float(i)
            seen.append(i)
    assert sorted(seen) == list(range(len(rows)))
    assert [b.input_ids_BT.shape for b in batches[:1]] == [(1, 20)]  # longest first
    with pytest.raises(ValueError):
        micro_batches(rows, max_tokens=0)


def toy_logprobs(table_VV, batch):
    """A bigram 'model': log p(token t | token t-1) = log_softmax(table[token t-1])[token t]."""
    logits_BTV = table_VV[batch.input_ids_BT[:, :-1]]
    logprobs_BT = logits_BTV.log_softmax(-1).gather(-1, batch.input_ids_BT[:, 1:, None])[..., 0]
    logprobs_BT = torch.cat([torch.zeros_like(logprobs_BT[:, :1]), logprobs_BT], dim=1)
    return torch.where(batch.loss_mask_BT, logprobs_BT, 0.0)


def test_micro_batch_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    V = 11
    table_VV = torch.randn(V, V, dtype=torch.float64, requires_grad=True)
    old_table_VV = table_VV.detach() + 0.5 * torch.randn(V, V, dtype=torch.float64)  # ratios != 1, some clip
    ref_table_VV = table_VV.detach() + 0.5 * torch.randn(V, V, dtype=torch.float64)
    rollouts = []
    for _ in range(8):
        calls = []
        for kind in ("root", "llm_query", "rlm_query")[: torch.randint(1, 4, ()).item()]:
            n = torch.randint(3, 15, ()).item()
            calls.append(fake_call(kind, 0 if kind == "root" else 1, torch.randint(0, V, (n,)).tolist(),
                                   [0] + torch.randint(0, 2, (n - 1,)).tolist()))
        rollouts.append(SimpleNamespace(calls=calls))
    advantages_N = group_advantages(torch.rand(8), group_size=4)
    rows = build_rows(rollouts, advantages_N)
    norm = token_budget_norm(len(rollouts), 32)

    def accumulate(batches):
        table_VV.grad = None
        total, stats = 0.0, []
        for batch in batches:
            with torch.no_grad():
                batch.old_logprobs_BT = toy_logprobs(old_table_VV, batch)
                batch.ref_logprobs_BT = toy_logprobs(ref_table_VV, batch)
            logprobs_BT = toy_logprobs(table_VV, batch)
            loss = dr_grpo_loss(logprobs_BT, batch.old_logprobs_BT, batch.advantages_B, batch.loss_mask_BT,
                                norm, beta=0.05, ref_logprobs_BT=batch.ref_logprobs_BT)
            loss.backward()
            total += loss.item()
            stats.append(loss_stats(logprobs_BT, batch.old_logprobs_BT, batch.advantages_B, batch.loss_mask_BT,
                                    ref_logprobs_BT=batch.ref_logprobs_BT))
        return total, table_VV.grad.clone(), merge_stats(stats)

    one = micro_batches(rows, max_tokens=10**6)
    many = micro_batches(rows, max_tokens=30)
    assert len(one) == 1 and len(many) > 3
    loss_one, grad_one, stats_one = accumulate(one)
    loss_many, grad_many, stats_many = accumulate(many)
    assert grad_one.abs().sum() > 0 and stats_one["clip_fraction"] > 0
    # float64 throughout: the same terms added up in another order differ by float64 steps at the
    # size of the sum (see summation_tolerance), whatever the CPU; a micro-batch lost or counted twice
    # moves the loss and gradient by their own size
    assert loss_many == pytest.approx(loss_one, abs=summation_tolerance(abs(loss_one), torch.float64))
    assert torch.allclose(grad_many, grad_one, rtol=0,
                          atol=summation_tolerance(grad_one.abs().max(), torch.float64))
    for key in ("clip_fraction", "ratio", "kl", "n_tokens"):
        assert stats_many[key] == pytest.approx(stats_one[key])


def test_batch_to_device_keeps_every_field():
    rows = build_rows(fake_rollouts(), [0.5, -0.5])
    batch = micro_batches(rows, max_tokens=100)[0]
    batch.old_logprobs_BT = torch.zeros(batch.input_ids_BT.shape)
    moved = batch.to("cpu")
    assert torch.equal(moved.old_logprobs_BT, batch.old_logprobs_BT) and moved.ref_logprobs_BT is None
    assert torch.equal(moved.loss_mask_BT, batch.loss_mask_BT)
