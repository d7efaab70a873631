"""What tests/test_dist.py runs under torchrun (python -m torch.distributed.run ... dist_worker.py MODE ...).

    dist_worker.py steps MODEL_DIR OUT_DIR     one warm-start step and one RL step on scripted rollouts,
                                               each rank its share; every rank saves its adapter to OUT_DIR
    dist_worker.py crash RANK TRAIN_FLAGS...   train.py's main, with RANK raising in its first update
                                               (grpo_step, as train.py's warm and RL steps call it)

two_steps is also what the test runs in one plain process, on the union of the shares.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import dist  # noqa: E402
import grpo  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
from trace import Call, Cost, Rollout  # noqa: E402

REPLIES = ["The key is 7.", "FINAL(42)", "```repl\nprint(context[:100])\n```", "I do not know.",
           "FINAL(re.search(r'key is (\\d+)', context).group(1))", " banana purple window", "7", "Let me look first."]
REWARDS = [1.0, 0.0, 0.3, 0.9]  # the RL step's two groups of two: advantages +-0.5 and -+0.3
LR = 0.05


def scripted_rollouts(policy):
    """Eight one-call rollouts whose sampled tokens are fixed replies (nothing is sampled from the model)."""
    prompt = policy.chat_ids([{"role": "user", "content": "What is the key?"}])
    rollouts = []
    for k, reply in enumerate(REPLIES):
        ids = policy.encode(reply) + ([policy.eos_token_ids[0]] if k % 3 else [])  # some were cut off
        call = Call(id=0, parent=None, kind="root", depth=0, query="What is the key?")
        call.append(prompt, False)
        call.append(ids, True, [0.0] * len(ids))
        rollouts.append(Rollout("What is the key?", None, [call], Cost(), 64))
    return rollouts


def two_steps(model_dir):
    """One warm-start step on the first four rollouts and one RL step on the last four, as train.py
    spreads them over the ranks; SGD, so the adapter moves by exactly lr x the summed gradient.
    -> the adapter's tensors before and after, by name."""
    torch.manual_seed(0)
    policy = lora.load_policy(model_dir, lora_rank=8, lora_alpha=16, device="cpu", dtype="float32")
    params = policy.trainable_parameters()
    dist.broadcast_parameters(params)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    # Micro-batches of a row or two, so each side sums its rows in its own order.
    cfg = train.parse_config(["--max_generated_tokens", "64", "--micro_batch_tokens", "100", "--group_size", "2",
                              "--grad_clip", "1000"])
    rollouts = scripted_rollouts(policy)
    optimizer = torch.optim.SGD(params, lr=LR)
    _, mine = dist.my_part(rollouts[:4])
    grpo.grpo_step(policy, optimizer, mine, [1.0] * len(mine), **train.update_settings(cfg))
    first, mine = dist.my_part(rollouts[4:], cfg["group_size"])
    advantages = train.group_advantages(REWARDS[first:first + len(mine)], cfg["group_size"])
    grpo.grpo_step(policy, optimizer, mine, advantages, **train.update_settings(cfg))
    return before, {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def crash_in_first_update(rank):
    real = train.grpo_step

    def grpo_step(*args, **kwargs):
        if dist.rank() == rank:
            raise RuntimeError("a simulated failure in the update")
        return real(*args, **kwargs)

    train.grpo_step = grpo_step  # what train.warm_step and train.rl_step call


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "steps":
        dist.init()
        with dist.fail_loudly():
            _, adapter = two_steps(args[0])
            torch.save(adapter, os.path.join(args[1], f"rank{dist.rank()}.pt"))
        dist.close()
    else:
        crash_in_first_update(int(args[0]))
        train.main(args[1:])
