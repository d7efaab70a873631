"""
More than one process: train.py under torchrun, with torch.distributed and nothing else.

    torchrun --nproc_per_node 8 train.py                       # one node, one GPU per process
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 train.py
    python train.py                                            # no torchrun: world of one, every helper a no-op

The idea is data parallelism over rollouts. Every rank holds the whole policy (the same base
model and the same LoRA adapter) and takes a contiguous share of each step's task groups
(a group never spans ranks, so its advantages are computed where its rollouts are). Each rank
samples, scores and rewards its share; the step's tasks and each rollout's seed come from
(seed, step, the rollout's index in the step), so the share a rank gets is fixed by (step, rank),
and the union of the shares is the very step one process would take. Then one all-reduce:

    loss on rank r = (sum over r's sampled tokens of the token loss) / (ALL ranks' rollouts x budget)
    grad           = SUM over ranks of their grads       (all_reduce_grads)

Each rank divides by the global count, so the summed gradient is the gradient of the loss one
process would compute over every rollout: N ranks equal one rank doing all the work, up to the
order float sums run in. Every rank then takes the same optimizer step on the same gradient,
so the adapters stay identical without ever being sent (they are broadcast once, at the start).
Rank 0 alone evaluates, logs and writes files; what it decides (the curriculum's stage) is
broadcast. A rank that raises prints its rank and ends the process group; torchrun then stops
the others, and a rank stuck in a collective gives up after TIMEOUT (set DIST_TIMEOUT_MINUTES).

Backend: NCCL when CUDA is available (one GPU per process, cuda:LOCAL_RANK), gloo on CPU.
"""
import datetime
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as td

# A rank waits in a collective while rank 0 evaluates alone, so this must outlast an evaluation.
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("DIST_TIMEOUT_MINUTES", 60)))


def world():
    return td.get_world_size() if td.is_initialized() else 1


def rank():
    return td.get_rank() if td.is_initialized() else 0


def is_main():
    return rank() == 0


def init():
    """Join the process group when started by torchrun (WORLD_SIZE > 1); -> the device this rank
    uses, or None without torchrun (then nothing changes: the policy picks its device as always)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not td.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")


def close():
    if td.is_initialized():
        td.destroy_process_group()


@contextmanager
def fail_loudly():
    """A rank that raises says which rank it was, and leaves the group, so torchrun stops the run
    instead of the other ranks waiting in their next collective."""
    try:
        yield
    except BaseException as e:
        if world() > 1 and not (isinstance(e, SystemExit) and e.code in (0, None)):
            print(f"\ntrain.py: rank {rank()} of {world()} stopped: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            close()
        raise


def share(n_groups):
    """The groups this rank takes, as a range: contiguous, sizes differing by at most one."""
    return range(n_groups * rank() // world(), n_groups * (rank() + 1) // world())


def my_part(items, group_size=1):
    """-> (index of this rank's first item, its items): whole groups of consecutive items."""
    groups = share(len(items) // group_size)
    first, end = groups.start * group_size, groups.stop * group_size
    return first, items[first:end]


def total(x):
    """Sum of a number over the ranks (itself, untouched, in a world of one)."""
    if world() == 1:
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=_device())
    td.all_reduce(t)
    return type(x)(t.item()) if isinstance(x, int) else t.item()


def gather(items):
    """Every rank's list, concatenated in rank order, on every rank (the list itself in a world of one)."""
    if world() == 1:
        return items
    parts = [None] * world()
    td.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast(obj):
    """Rank 0's value, on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(params):
    """Start every rank from rank 0's weights (they are made equal anyway by the same seed)."""
    if world() > 1:
        for p in params:
            td.broadcast(p.data, src=0)


def flat_grads(params):
    """The parameters' .grad as one flat float32 vector, zeros where a grad is None."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])


def all_reduce_grads(params):
    """Sum every parameter's gradient over the ranks, in float32, in one flat buffer. A rank with
    no rows this step adds zeros (its grads are None)."""
    if world() == 1:
        return
    flat = flat_grads(params)
    td.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def check_world(saved_world):
    """None, or why a checkpoint written by saved_world processes cannot resume in this world."""
    if saved_world == world():
        return None
    how = ("python train.py --resume" if saved_world == 1
           else f"torchrun --nproc_per_node {saved_world} train.py --resume")
    return (f"train.py: this checkpoint was written by a run of {saved_world} process(es), and this one has {world()}. "
            f"The step's tasks and seeds do not depend on the number of processes, but the order in which the "
            f"gradient is summed does, so the continued run would not be the one that was stopped. Continue it "
            f"with the same number: {how} (on several nodes, the same total), or start a new run in another --out_dir.")


def _device():
    return torch.device(f"cuda:{torch.cuda.current_device()}") if td.get_backend() == "nccl" else torch.device("cpu")
