"""train.py under torchrun, on CPU with gloo and a tiny model: two processes take the step one process
takes on the union of their shares; a whole run logs and checkpoints once, resumes, refuses another world
size, and a failing rank ends the run with its rank named instead of a hang."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import dist
import train
from dist_worker import two_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "dist_worker.py")
# Two warm-start steps (niah's 5 strategies, one demonstration each, 3 to a step) and 2 RL steps of two
# tasks, one group per rank; an evaluation before and after, on rank 0.
RUN = ["--steps", "2", "--tasks_per_step", "2", "--group_size", "2", "--families", "niah", "--lengths", "2000",
       "--warm_demos", "1", "--warm_epochs", "1", "--warm_batch", "3", "--warm_lengths", "2000", "--max_turns", "1",
       "--max_new_tokens", "160", "--max_generated_tokens", "512", "--eval_n", "1", "--eval_every", "0",
       "--eval_lengths", "2000", "--checkpoint_every", "10", "--lr", "0.01", "--temperature", "1.0",
       "--warm_strategies", "regex,look,window,split_async,split_sync"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, cwd, n=2, timeout=600):
    """`torchrun --nproc_per_node n script args` on CPU (gloo), from cwd. -> CompletedProcess"""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), script, *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def why(done):
    """A failed torchrun's story: the lines where a rank says why it stopped (the others then only
    report a closed connection), then the end of stderr."""
    stopped = [line for line in done.stderr.splitlines() if " stopped: " in line]
    return "\n".join(stopped) + "\n...\n" + done.stderr[-3000:]


def test_two_processes_take_the_step_one_process_takes_on_both_shares(tiny_model_dir, tmp_path):
    done = torchrun(WORKER, ["steps", tiny_model_dir, str(tmp_path)], cwd=tmp_path)
    assert done.returncode == 0, why(done)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the same step on every rank
    initial, one = two_steps(tiny_model_dir)  # one process, all eight rollouts
    for name, expected in one.items():
        got, start = ranks[0][name], initial[name]
        # The two sides differ only in the order float32 sums run: rows split over two ranks, other micro-batches,
        # other thread counts, one all-reduce. A sum in another order is off by some float32 eps of the terms it
        # adds up, so the adapter may differ by that much of its entries and of its update (lr x grad): the
        # magnitude below. The update's terms can be larger than the update itself: the q and k projections'
        # gradients are per-token terms that mostly cancel (a random model attends almost uniformly), and
        # there the two sides were ~20 eps of the update apart on our CPU. 256 eps leaves room for other
        # CPUs and BLAS builds, and is still ~1e4 times below what a bug makes (a rank's rollouts dropped or
        # counted twice, a per-rank normaliser: entries off by a good part of their whole update).
        magnitude = max(start.abs().max().item(), (expected - start).abs().max().item())
        tolerance = 256 * torch.finfo(torch.float32).eps * magnitude
        assert (got - expected).abs().max().item() <= tolerance, (name, (got - expected).abs().max().item(), tolerance)
    assert all(one[n].abs().max() > 0 for n in one if "lora_B" in n)  # B starts at 0: every one of them trained


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("torchrun")
    done = torchrun(os.path.join(REPO, "train.py"), RUN + ["--model", tiny_model_dir, "--out_dir", str(out_dir)],
                    cwd=out_dir)
    assert done.returncode == 0, why(done)
    return str(out_dir), done


def lines(path):
    return [json.loads(line) for line in open(path)]


def test_torchrun_train_logs_and_checkpoints_once(two_process_run):
    out_dir, done = two_process_run
    assert done.stdout.count("training ") == 1 and done.stdout.count("done: adapter") == 1  # rank 0 speaks
    metrics = lines(os.path.join(out_dir, "metrics.jsonl"))
    assert [(m["step"], m["phase"]) for m in metrics] == [(1, "warm"), (2, "warm"), (3, "rl"), (4, "rl")]
    evals = lines(os.path.join(out_dir, "eval.jsonl"))
    assert [(e["step"], e["label"]) for e in evals] == [(0, "before"), (4, "after")]
    # samples.jsonl: the first rollout of each group of both ranks, in the order of the one-process step
    cfg = train.parse_config(RUN)
    queries = [r["query"] for r in lines(os.path.join(out_dir, "samples.jsonl"))]
    assert queries == [t.query for step in (2, 3) for t in train.step_tasks(cfg, step, [2000])[::cfg["group_size"]]]
    state = torch.load(os.path.join(out_dir, "checkpoint", "state.pt"), weights_only=False)
    assert state["step"] == 4 and state["world_size"] == 2
    assert sorted(os.listdir(out_dir)) == ["adapter", "checkpoint", "curves.png", "eval.jsonl", "eval_after.html",
                                           "eval_before.html", "metrics.jsonl", "samples.jsonl"]


def test_torchrun_resume_continues_and_another_world_size_is_refused(two_process_run, tiny_model_dir, tmp_path):
    out_dir, _ = two_process_run
    with pytest.raises(SystemExit) as refused:  # one process, on a two-process checkpoint
        train.main(["--resume", "--out_dir", out_dir])
    assert "written by a run of 2 process(es), and this one has 1" in str(refused.value)
    assert "torchrun --nproc_per_node 2 train.py --resume" in str(refused.value)
    done = torchrun(os.path.join(REPO, "train.py"), ["--resume", "--out_dir", out_dir, "--steps", "3"], cwd=tmp_path)
    assert done.returncode == 0, why(done)
    assert [m["step"] for m in lines(os.path.join(out_dir, "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    state = torch.load(os.path.join(out_dir, "checkpoint", "state.pt"), weights_only=False)
    assert state["step"] == 5 and state["world_size"] == 2


def test_a_failing_rank_ends_the_run_and_is_named(tiny_model_dir, tmp_path):
    # The process group's timeout is an hour (dist.TIMEOUT): ending within this test's limit is no hang.
    done = torchrun(WORKER, ["crash", "1", *RUN, "--model", tiny_model_dir, "--out_dir", str(tmp_path)],
                    cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    assert "rank 1 of 2 stopped: RuntimeError: a simulated failure in the update" in done.stderr


def test_without_torchrun_every_helper_is_the_identity():
    assert (dist.init(), dist.world(), dist.rank(), dist.is_main()) == (None, 1, 0, True)
    items = list(range(6))
    assert dist.my_part(items, 2) == (0, items) and dist.gather(items) is items
    assert dist.total(3) == 3 and dist.broadcast("x") == "x" and dist.check_world(1) is None
