"""
Dr. GRPO: group-relative advantages and a clipped policy-gradient loss, as pure
functions; traces (trace.py) turned into masked token batches; and grpo_step, the update.

For each task we sample a group of G rollouts and score them, rewards r_1..r_G.

    A_i     = r_i - mean_j r_j                           (one advantage per rollout)
    ratio_t = exp(logp_t - logp_old_t)                   (per sampled token)
    pg_t    = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (k3 estimator of KL(policy || ref))
    loss    = sum over every sampled token t of every call of every rollout i
              of (pg_t + beta * kl_t), divided by N_rollouts * token_budget

Usage (train.py's RL step; the warm start is the same call with every advantage 1):

    advantages_N = group_advantages(rewards_N, group_size, correctness_N=correctness_N)
    stats = grpo_step(policy, optimizer, rollouts, advantages_N, temperature=0.4,
                      max_generated_tokens=1024, micro_batch_tokens=4096)

grpo_step is the only place the step is written: rows from traces (build_rows), padded
micro-batches (micro_batches), scoring, the loss, accumulation, clipping, the optimizer.

Deliberate simplifications, one line each:
- No division by the group's reward std (Dr. GRPO): it would up-weight groups that are almost all right or all wrong.
- A constant normaliser (rollouts x token budget), never the sequence length nor the row count, so no length bias.
- Every call in a rollout's tree (root, child RLMs, plain sub-calls) gets the root's advantage: no per-call credit.
- Groups with no reward spread give no policy gradient; we log their share instead of resampling them away.
- The KL term is off by default (beta=0); when on it uses the k3 estimator against the base model.
- With one update per batch the ratio is 1 and clipping never fires; with epochs > 1 the ratio is against the
  scorer before the update (not the sampler's log-probs), and clipping bounds how far later epochs move.
- No entropy bonus, no value function, no reward whitening across the batch.
"""
from dataclasses import dataclass

import torch

import dist


def _groups(rewards_N, group_size):
    """Rewards as a (groups, group_size) float64 tensor, with the checks both users need."""
    rewards_N = torch.as_tensor(rewards_N, dtype=torch.float64).flatten()
    if int(group_size) != group_size or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (a group of one has no baseline), got {group_size}")
    if len(rewards_N) % group_size != 0:
        raise ValueError(f"got {len(rewards_N)} rewards, not a multiple of group_size={group_size}: "
                         f"sample exactly group_size rollouts per task, one task's rollouts consecutive")
    return rewards_N.view(-1, int(group_size))


# A rollout solved its task only with full credit. Partial credit (a count off by one earns
# 0.75, a pairs list half right an F1 of 0.5) is a wrong answer that came close.
SOLVED_AT = 1.0


def group_advantages(rewards_N, group_size, correctness_N=None, solved_at=SOLVED_AT):
    """A = r - mean(r over its group); groups are consecutive runs of group_size rollouts.

    With correctness_N, a group in which no rollout solved its task (correctness >= solved_at)
    gets advantage 0 too. Among wrong answers only the cost terms and partial credit spread the
    rewards, so such a group would teach broken code to be shorter, or one wrong guess over
    another, and Adam's normalisation turns even that tiny spread into a full-sized step.
    Cost is meant to choose between answers that are right."""
    rewards_GS = _groups(rewards_N, group_size)
    advantages_GS = rewards_GS - rewards_GS.mean(dim=1, keepdim=True)
    # Float rounding of the mean can leave ~1e-8 on a group of equal rewards; make it exactly 0
    # so such a group has exactly zero gradient and skip_zero_advantage can drop it.
    silent_G = rewards_GS.amax(dim=1) == rewards_GS.amin(dim=1)
    if correctness_N is not None:
        silent_G |= _unsolved(correctness_N, group_size, solved_at)
    advantages_GS[silent_G] = 0.0
    return advantages_GS.flatten().to(torch.float32)


def zero_spread_fraction(rewards_N, group_size):
    """Share of groups whose rewards are all equal: they teach nothing this step."""
    rewards_GS = _groups(rewards_N, group_size)
    if len(rewards_GS) == 0:
        return 0.0
    return (rewards_GS.amax(dim=1) == rewards_GS.amin(dim=1)).double().mean().item()


def _unsolved(correctness_N, group_size, solved_at=SOLVED_AT):
    """Per group: True when no rollout of it solved its task (correctness >= solved_at)."""
    return _groups(correctness_N, group_size).amax(dim=1) < solved_at


def unsolved_fraction(correctness_N, group_size, solved_at=SOLVED_AT):
    """Share of groups in which no rollout solved its task: group_advantages(..., correctness_N) silences them."""
    unsolved_G = _unsolved(correctness_N, group_size, solved_at)
    return unsolved_G.double().mean().item() if len(unsolved_G) else 0.0


def token_budget_norm(n_rollouts, max_generated_tokens):
    """The loss's constant denominator. Using the same value in every micro-batch makes the
    summed micro-batch losses (and grads) equal the full-batch ones exactly."""
    if n_rollouts < 1 or max_generated_tokens < 1:
        raise ValueError(f"need n_rollouts >= 1 and max_generated_tokens >= 1, "
                         f"got {n_rollouts} and {max_generated_tokens}")
    return float(n_rollouts * max_generated_tokens)


def _check_shapes(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, ref_logprobs_BT):
    for name, t in (("old_logprobs_BT", old_logprobs_BT), ("mask_BT", mask_BT), ("ref_logprobs_BT", ref_logprobs_BT)):
        if t is not None and t.shape != logprobs_BT.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs_BT has {tuple(logprobs_BT.shape)}: "
                             f"score both on the same padded batch")
    if advantages_B.shape != logprobs_BT.shape[:1]:
        raise ValueError(f"advantages_B has shape {tuple(advantages_B.shape)}, "
                         f"expected ({logprobs_BT.shape[0]},): one advantage per row")


def _per_token(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, eps_low, eps_high, ref_logprobs_BT):
    """Per-token pieces of the loss. Off-mask positions are zeroed *before* exp so that padding
    (whatever value it holds) cannot produce inf/nan in the forward or the backward pass."""
    mask_BT = mask_BT.bool()
    advantages_B1 = torch.as_tensor(advantages_B, dtype=logprobs_BT.dtype, device=logprobs_BT.device)[:, None]
    log_ratio_BT = torch.where(mask_BT, logprobs_BT - old_logprobs_BT, 0.0)
    ratio_BT = log_ratio_BT.exp()
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_BT = -torch.minimum(ratio_BT * advantages_B1, clipped_BT * advantages_B1)
    # Clipping is active (and the token's gradient is zero) only on the side the advantage pushes:
    # up past 1 + eps_high when A > 0, down past 1 - eps_low when A < 0.
    clip_active_BT = (((advantages_B1 > 0) & (ratio_BT > 1.0 + eps_high))
                      | ((advantages_B1 < 0) & (ratio_BT < 1.0 - eps_low)))
    kl_BT = None
    if ref_logprobs_BT is not None:
        ref_minus_logp_BT = torch.where(mask_BT, ref_logprobs_BT - logprobs_BT, 0.0)
        kl_BT = ref_minus_logp_BT.exp() - ref_minus_logp_BT - 1.0
    return mask_BT, ratio_BT, pg_BT, clip_active_BT & mask_BT, kl_BT


def dr_grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, norm,
                 eps_low=0.2, eps_high=0.2, beta=0.0, ref_logprobs_BT=None):
    """Sum over masked tokens of the clipped surrogate (+ beta * k3 KL), divided by the constant norm."""
    if beta > 0 and ref_logprobs_BT is None:
        raise ValueError("beta > 0 needs ref_logprobs_BT (score the batch with the adapter off), or set beta=0")
    if not norm > 0:
        raise ValueError(f"norm must be > 0, got {norm}: use token_budget_norm(n_rollouts, max_generated_tokens)")
    advantages_B = torch.as_tensor(advantages_B)
    _check_shapes(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, ref_logprobs_BT)
    mask_BT, _, pg_BT, _, kl_BT = _per_token(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT,
                                             eps_low, eps_high, ref_logprobs_BT if beta > 0 else None)
    per_token_BT = pg_BT if kl_BT is None else pg_BT + beta * kl_BT
    return torch.where(mask_BT, per_token_BT, 0.0).sum() / norm


@torch.no_grad()
def loss_stats(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT,
               eps_low=0.2, eps_high=0.2, ref_logprobs_BT=None):
    """Diagnostics over masked tokens: {"clip_fraction", "ratio", "n_tokens"} and "kl" (k3, masked
    mean) when ref_logprobs_BT is given. Combine micro-batches with merge_stats."""
    advantages_B = torch.as_tensor(advantages_B)
    _check_shapes(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, ref_logprobs_BT)
    mask_BT, ratio_BT, _, clip_active_BT, kl_BT = _per_token(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT,
                                                             eps_low, eps_high, ref_logprobs_BT)
    n_tokens = int(mask_BT.sum())
    denominator = max(n_tokens, 1)
    stats = {"clip_fraction": clip_active_BT.sum().item() / denominator,
             "ratio": ratio_BT[mask_BT].sum().item() / denominator,
             "n_tokens": n_tokens}
    if kl_BT is not None:
        stats["kl"] = kl_BT[mask_BT].sum().item() / denominator
    return stats


def merge_stats(stats_list):
    """Token-weighted means of loss_stats over micro-batches (so they match the full batch's)."""
    n_tokens = sum(s["n_tokens"] for s in stats_list)
    merged = {"n_tokens": n_tokens}
    for key in stats_list[0] if stats_list else ():
        if key != "n_tokens":
            merged[key] = sum(s[key] * s["n_tokens"] for s in stats_list) / max(n_tokens, 1)
    return merged


@dataclass
class Row:
    """One call of one rollout, ready to score: loss_mask[t] = 1 where token t was sampled."""
    token_ids: list[int]
    loss_mask: list[int]
    advantage: float
    rollout_index: int
    kind: str = "root"  # kind and depth: which call the row came from, for a reader inspecting rows
    depth: int = 0      # (the loss treats every call alike; tests check rows come from every call)


TRAIN_CALLS = {"all": ("root", "rlm_query", "llm_query"), "rlm": ("root", "rlm_query"), "root": ("root",)}


def build_rows(rollouts, advantages_N, skip_zero_advantage=False, calls="all"):
    """Every call of every rollout's tree (rollout.calls: root and children) becomes a Row that
    carries its root rollout's advantage. Calls with no sampled token are skipped. With
    skip_zero_advantage, rows of rollouts with A == 0 are dropped: their policy gradient is exactly
    zero (but with beta > 0 they would still have contributed a KL term). calls: a key of
    TRAIN_CALLS, the kinds of call that become rows."""
    if calls not in TRAIN_CALLS:
        raise ValueError(f"calls must be one of {sorted(TRAIN_CALLS)}, got {calls!r}")
    advantages_N = [float(a) for a in torch.as_tensor(advantages_N, dtype=torch.float64).flatten()]
    if len(advantages_N) != len(rollouts):
        raise ValueError(f"got {len(advantages_N)} advantages for {len(rollouts)} rollouts: one advantage per rollout")
    rows = []
    for rollout_index, (rollout, advantage) in enumerate(zip(rollouts, advantages_N)):
        if skip_zero_advantage and advantage == 0.0:
            continue
        for call_index, call in enumerate(rollout.calls):
            if call.kind not in TRAIN_CALLS[calls]:
                continue
            token_ids, sampled_mask = list(call.token_ids), [int(bool(m)) for m in call.sampled_mask]
            where = f"rollout {rollout_index}, call {call_index} ({call.kind})"
            if len(token_ids) != len(sampled_mask):
                raise ValueError(f"{where}: {len(token_ids)} token_ids but {len(sampled_mask)} sampled_mask "
                                 f"entries; the trace must record exactly one mask entry per token")
            if not any(sampled_mask):
                continue
            if sampled_mask[0]:
                # logprobs_BT[b, t] is log p(token t | tokens < t): token 0 has no prefix to predict it from
                raise ValueError(f"{where}: the first token is marked sampled; a call must start with its prompt")
            rows.append(Row(token_ids, sampled_mask, advantage, rollout_index, call.kind, call.depth))
    return rows


@dataclass
class Batch:
    """Right-padded rows. old_logprobs_BT / ref_logprobs_BT are filled in by the trainer."""
    input_ids_BT: torch.Tensor       # long
    attention_mask_BT: torch.Tensor  # long, 1 on real tokens
    loss_mask_BT: torch.Tensor       # bool, True on sampled tokens (never on padding or position 0)
    advantages_B: torch.Tensor       # float32
    rollout_index_B: torch.Tensor    # long; which rollout each row is of (for inspection; the loss needs none)
    old_logprobs_BT: torch.Tensor | None = None
    ref_logprobs_BT: torch.Tensor | None = None

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return Batch(*(move(getattr(self, name)) for name in self.__dataclass_fields__))


def micro_batches(rows, max_tokens, pad_id=0):
    """Group rows of similar length so that each batch's padded size (rows x longest row) is
    <= max_tokens; a row longer than max_tokens gets a batch of its own. Longest rows come first,
    so an out-of-memory error shows up on the first step rather than late in the run."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].token_ids))  # stable: ties keep their order
    groups, current = [], []
    for i in order:
        longest = len(rows[current[0]].token_ids) if current else len(rows[i].token_ids)
        if current and (len(current) + 1) * longest > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return [_pad([rows[i] for i in group], pad_id) for group in groups]


def _pad(rows, pad_id):
    B, T = len(rows), max(len(row.token_ids) for row in rows)
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    loss_mask_BT = torch.zeros((B, T), dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row.token_ids)
        input_ids_BT[b, :n] = torch.tensor(row.token_ids, dtype=torch.long)
        attention_mask_BT[b, :n] = 1
        loss_mask_BT[b, :n] = torch.tensor(row.loss_mask, dtype=torch.bool)
    advantages_B = torch.tensor([row.advantage for row in rows], dtype=torch.float32)
    rollout_index_B = torch.tensor([row.rollout_index for row in rows], dtype=torch.long)
    return Batch(input_ids_BT, attention_mask_BT, loss_mask_BT, advantages_B, rollout_index_B)


# -----------------------------------------------------------------------------
# The step: rollouts and advantages in, one optimizer step (per epoch) out


def grpo_step(policy, optimizer, rollouts, advantages_N, *, temperature, max_generated_tokens, micro_batch_tokens,
              epochs=1, eps_low=0.2, eps_high=0.28, beta=0.0, grad_clip=1.0, train_calls="all"):
    """The Dr. GRPO update on one batch of rollouts, one advantage each. -> what is worth logging.

        advantages_N = group_advantages(rewards_N, group_size, correctness_N=correctness_N)
        stats = grpo_step(policy, optimizer, rollouts, advantages_N, temperature=0.4,
                          max_generated_tokens=1024, micro_batch_tokens=4096)
        stats["grad_norm"], stats["clip_fraction"], stats["train_rows"], stats["nll"]

    Every call of every rollout becomes a row (build_rows); rows are padded into micro-batches
    of at most micro_batch_tokens (micro_batches), each scored and back-propagated in turn: the
    loss's constant norm (token_budget_norm) makes the accumulated gradient the full batch's.
    Then the gradient is clipped to grad_clip and the optimizer steps, epochs times.

    temperature: what the log-probs are scored at: the sampling temperature for RL (the policy
    that sampled), 1 for behaviour cloning (plain NLL). max_generated_tokens: the rollouts' token
    budget, the loss's normaliser. beta > 0 adds the k3 KL to the base model (a reference pass
    with the adapter off); at 0 rows with advantage 0 are skipped, their gradient being 0.

    The ratio's reference ("old") is the same scorer before the update, not the log-probs the
    sampler recorded: those come from another computation (bf16 on a GPU, other rows padded
    alongside, none at all from the teacher), so a ratio against them would clip on rounding.
    With epochs=1 old is the current score (ratio 1, nothing clips, no extra pass); each later
    epoch's ratio measures how far the earlier steps moved, and the clip range bounds it.

    train_calls: which calls of each tree become rows (TRAIN_CALLS): "all", "rlm" (the root and child
    RLMs: the calls that write code and choose sub-calls) or "root". Plain completions' prompts carry
    the pieces they read, so with many sub-calls they are most of an update's tokens.
    """
    policy.train_mode()
    rows = build_rows(rollouts, advantages_N, skip_zero_advantage=beta == 0, calls=train_calls)
    batches = micro_batches(rows, micro_batch_tokens, pad_id=policy.pad_token_id)
    batches = [b.to(policy.device) for b in batches]
    # Under torchrun (dist.py) every rank's rollouts count in the norm and the ranks' gradients are
    # summed before clipping: N ranks take the step one process would take on all their rollouts.
    # Without torchrun every dist helper returns its argument untouched.
    norm = token_budget_norm(dist.total(len(rollouts)), max_generated_tokens)
    params = policy.trainable_parameters()
    score = lambda b, **kw: policy.logprobs(b.input_ids_BT, b.attention_mask_BT, b.loss_mask_BT,
                                            temperature=temperature, **kw)
    with torch.no_grad():
        for b in batches:
            # One epoch means old == current (ratio 1, same gradient): no separate pass needed.
            b.old_logprobs_BT = score(b) if epochs > 1 else None
            b.ref_logprobs_BT = score(b, use_adapter=False) if beta > 0 else None
    stats, grad_norms, nll = [], [], 0.0
    for _ in range(epochs if dist.total(len(batches)) else 0):  # a rank with no rows still joins the sum
        optimizer.zero_grad(set_to_none=True)
        for b in batches:  # the loss's constant norm makes accumulation exact
            logprobs_BT = score(b)
            old_BT = b.old_logprobs_BT if b.old_logprobs_BT is not None else logprobs_BT.detach()
            loss = dr_grpo_loss(logprobs_BT, old_BT, b.advantages_B, b.loss_mask_BT, norm,
                                eps_low=eps_low, eps_high=eps_high, beta=beta, ref_logprobs_BT=b.ref_logprobs_BT)
            loss.backward()
            nll -= float(logprobs_BT.detach()[b.loss_mask_BT].sum())
            stats.append(loss_stats(logprobs_BT, old_BT, b.advantages_B, b.loss_mask_BT,
                                    eps_low=eps_low, eps_high=eps_high, ref_logprobs_BT=b.ref_logprobs_BT))
        dist.all_reduce_grads(params)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
        optimizer.step()
    stats = dist.gather(stats)
    merged = merge_stats(stats) if stats else {}
    tokens = dist.total(sum(sum(r.loss_mask) for r in rows))
    return {"grad_norm": max(grad_norms, default=0.0), "clip_fraction": merged.get("clip_fraction", 0.0),
            "kl": merged.get("kl"),  # against the base model, measured only when beta > 0
            "train_rows": dist.total(len(rows)), "train_tokens": tokens,
            "nll": dist.total(nll) / max(1, tokens * len(grad_norms))}  # per trained token, as scored in the update
