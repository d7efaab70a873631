"""
Checkpoints that a crash at any instant leaves whole: the old one or the new one, never half of each.

    save_checkpoint(out_dir, policy, optimizer, state)   # state: step, config, ... (a plain dict)
    folder, state = load_checkpoint(out_dir)             # folder/adapter is the saved LoRA adapter
    write_whole("out/train/adapter", policy.save_adapter)

A folder cannot be renamed over another, so `write_whole` writes the new folder beside the
old one, makes it durable (fsync), then swaps it in with two renames (old aside, new in),
each atomic. A crash between the two leaves only `path.old`, which `whole_folder` finds.
The logs (metrics.jsonl, ...) are appended a step at a time; a checkpoint records how long
each one was, and resuming cuts them back, so the steps redone after it are not logged twice.
`with DeferInterrupt():` around an update and its log lines makes Ctrl-C wait until both
have landed, so a checkpoint never holds half a step.
"""

import os
import random
import shutil
import signal

import numpy as np
import torch

LOGS = ("metrics.jsonl", "samples.jsonl", "eval.jsonl")  # appended a step at a time


def fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a folder too: that makes the names in it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path, write):
    """Write the folder `path` with write(folder), so that a crash at any instant leaves the old
    folder or the new one, whole."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save left
    write(tmp)
    for folder, _, files in os.walk(tmp):  # on disk before the renames can be
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)
    if os.path.exists(path):  # else path.old, if any, is the only whole copy until tmp is in place
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def whole_folder(path):
    """`path`, or the copy that a crash in the middle of write_whole's swap left at path.old."""
    return path + ".old" if not os.path.exists(path) and os.path.exists(path + ".old") else path


def save_checkpoint(out_dir, policy, optimizer, state):
    """The adapter, the optimizer, the RNGs, the lengths of the logs, and `state` (step, config, ...)."""
    logs = {}
    for name in LOGS:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            fsync(path)
        logs[name] = os.path.getsize(path) if os.path.exists(path) else 0
    state = {**state, "logs": logs, "optimizer": optimizer.state_dict(), "rng": {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def write(folder):
        policy.save_adapter(os.path.join(folder, "adapter"))
        torch.save(state, os.path.join(folder, "state.pt"))

    write_whole(os.path.join(out_dir, "checkpoint"), write)


STATE_KEYS = ("step", "evaluated", "stage", "phase", "config", "logs", "optimizer", "rng")  # save_checkpoint's


def load_checkpoint(out_dir):
    """-> (folder, state) of the checkpoint in out_dir, or (None, None) when there is none.
    Raises ValueError for a state.pt that is damaged or not one save_checkpoint wrote."""
    folder = whole_folder(os.path.join(out_dir, "checkpoint"))
    path = os.path.join(folder, "state.pt")
    if not os.path.exists(path):
        return None, None
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # a cut or damaged file fails in zip, pickle or torch, each with its own type
        raise ValueError(f"{path} is damaged or cut short ({type(e).__name__})") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ValueError(f"{path} is not a checkpoint that train.py wrote (it lacks {', '.join(missing)})")
    return folder, state


def truncate_logs(out_dir, sizes):
    """Cut each log back to its length at the checkpoint: the steps logged after it are about to be redone."""
    for name, size in sizes.items():
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and os.path.getsize(path) > size:
            os.truncate(path, size)


def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class DeferInterrupt:
    """Ctrl-C during an update waits until the step is done, so no checkpoint is half-updated."""

    def __enter__(self):
        self.interrupted = False
        self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "interrupted", True))

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        if self.interrupted:
            raise KeyboardInterrupt
