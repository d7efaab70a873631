"""
The Recursive Language Model: a policy that answers a query about a long input by
writing code against it in a REPL and calling itself on pieces, to any depth.

    python rlm.py --query "What is the magic number for the key 'blue-otter'?" --context notes.txt
    python rlm.py --query "..." --context notes.txt --html trace.html     # the call tree as a page (view.py)
    python rlm.py --query "..." --context big.txt --max-depth 3 --adapter out/train/adapter

How one rollout goes. The root call sees a system prompt that teaches the REPL's API and
a user message with the query and a description of the context (type, size, a short
preview), never the context itself. Each turn it samples a reply; the ```repl (or
```python) blocks of the reply run in the call's own REPL, whose output comes back as
the next user message. The call ends at the reply's first FINAL(value), called by code
or written as plain text (nothing after it runs), or when turns run out, after one last
turn that asks for the answer. Code may call `llm_query(prompt)` (one plain completion) or
`rlm_query(query, context)` (a child RLM with its own REPL at depth + 1; at max depth a
plain completion instead), synchronously or concurrently with their async twins.

Every generation of every call in every concurrent rollout goes through one Batcher,
which gathers the requests that are waiting into one batched sampling call run off the
event loop, so REPLs keep running while the model generates. What a rollout leaves behind
(the call tree with exact token ids, costs, the critical path, JSONL) is trace.py's.

Deliberate simplifications, one line each:
- each turn re-prefills the whole conversation (no KV cache across turns); prompt tokens are counted that way.
- a batch samples up to the largest max_new_tokens asked for and cuts each reply to its own limit.
- budgets (generated tokens, sub-calls) are handed down the call tree, not first come, first served: a
  sub-call gets up to a fixed share of its parent's, in the order the code asked, and gives back the rest at
  points the code fixes, so no budget depends on timing; the price: a grant sits idle while it runs (see RLM).
- with a seed, each sample's randomness comes from (seed, the call's path in the tree, turn), so a
  rollout does not depend on how requests happened to be batched; call ids follow the tree too.
- "synchronous" sub-calls (allow_async=False) means the sub-calls of one REPL are served one at a time.
- per-call limits (max_call_sub_calls, max_prompt_chars; off by default) refuse a sub-call with an error in the
  code, stated in the system prompt; a plain completion's prompt is otherwise only cut to the model's window.
- latency is counted in generated tokens on the critical path, not seconds (seconds are reported beside it).
  A sub-call waits for the earlier ones of its turn whose replies its code had received before asking
  (all earlier ones when they are served one at a time): what the code did, not which call was faster.
"""

import argparse
import asyncio
import dataclasses
import os

# Idle torch threads sleep instead of spinning: spinning threads on a busy CPU slow everything down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import re
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

from checks import InputError, adapter_folder, at_least, read_text, refuse, writable
from repl import REPL
from trace import Call, Rollout, finish_costs, format_rollout, write_jsonl

CODE_BLOCK = re.compile(r"```(?:repl|python|py)[ \t]*\n(.*?)```", re.DOTALL)


class SamplingPolicy(Protocol):
    """What the loop needs of a policy. lora.Policy is the real one; teacher.TeacherPolicy (scripted
    strategies), tests/scripted.py's ScriptedPolicy (canned replies) and bench.py's wrappers play its
    part with the same methods, so every one of them runs through the same RLM and Batcher.

    Token-in, token-out: the loop builds each call's conversation as chat_ids(first messages), then
    for each turn the sampled ids and followup_ids(observation, ...), never re-tokenizing text.
    """

    eos_token_ids: list  # ids that end a reply; a sample's last id is one of them when it stopped

    def chat_ids(self, messages: list) -> list:
        """[{"role", "content"}, ...] -> prompt ids, ending with the assistant's generation prompt."""

    def followup_ids(self, user_text: str, ended_with_eos: bool) -> list:
        """Ids that follow a sampled reply: its end-of-turn if it had none, a user turn, a new assistant prompt."""

    def decode(self, ids: list) -> str:
        """Text of ids (special tokens left out)."""

    def sample(self, prompts: list, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_strings=None,
               seeds=None) -> list:
        """One sample per prompt, each with .token_ids, .logprobs (of each sampled id, as drawn) and
        .finish_reason ("stop" or "length"). seeds[i], when given, fixes sample i's randomness alone,
        whatever else is in the batch."""


# The rollout budgets of a run, defined once: train.py, eval.py, teacher.py and `python rlm.py` start
# from these (each lets a flag change a value). The CPU preset is sized for minutes on 2 cores, the GPU
# one for longer contexts and more sub-calls. reward.RewardConfig.for_rollouts sizes the reward's cost
# and latency budgets from max_generated_tokens, so its penalties span their range on either preset.
BUDGETS = {
    "cpu": dict(max_depth=2, max_turns=2, max_new_tokens=256, max_sub_calls=8, max_generated_tokens=1024,
                max_call_tokens=8192),  # a reply: the teacher's longest program is about 210 tokens
    "gpu": dict(max_depth=2, max_turns=4, max_new_tokens=256, max_sub_calls=16, max_generated_tokens=2048,
                max_call_tokens=8192),
}


def default_budgets():
    """The preset for this machine: BUDGETS["gpu"] when CUDA is available, else BUDGETS["cpu"]."""
    import torch  # only here: the loop itself needs no torch

    return dict(BUDGETS["gpu" if torch.cuda.is_available() else "cpu"])


class BudgetExhausted(RuntimeError):
    """Raised inside a rollout when a call's share of the token or sub-call budget is spent."""


class SubCallRefused(RuntimeError):
    """Raised in the model's code when a sub-call breaks a per-call limit (RLM's max_call_sub_calls,
    max_prompt_chars); nothing is spent, and the message says what to do instead."""


# -----------------------------------------------------------------------------
# The batcher: many coroutines ask for one completion each; the model sees batches


@dataclass
class _Request:
    prompt_ids: list
    max_new_tokens: int
    seed: int | None
    future: asyncio.Future


class Batcher:
    """Turns concurrent `await batcher.sample(ids, n)` requests into batched policy.sample calls."""

    def __init__(self, policy: SamplingPolicy, max_batch_size=64, temperature=1.0, top_p=1.0, gather_window=0.01,
                 max_batch_tokens=16384):
        self.policy = policy
        self.max_batch_size = max_batch_size
        # Padded tokens (longest prompt + new tokens, times rows) per sampling call. On CPU, attention
        # over a padded batch materialises rows x heads x T x T scores: twenty 8k-token prompts at once
        # would need ~50 GB. A request longer than this still runs, alone.
        self.max_batch_tokens = max_batch_tokens
        self.temperature, self.top_p = temperature, top_p
        self.gather_window = gather_window  # seconds to wait so concurrent requests join one batch
        self.n_requests = 0  # counters for tests and benchmarks: how many requests went into how many batches
        self.n_sampling_calls = 0
        self._queue = []
        self._worker = None

    async def sample(self, prompt_ids, max_new_tokens, seed=None):
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(list(prompt_ids), max_new_tokens, seed, future))
        self.n_requests += 1
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _next_batch(self):
        """Requests in arrival order, as many as fit max_batch_size and max_batch_tokens (at least one)."""
        batch, longest, new = [], 0, 0
        for r in self._queue[: self.max_batch_size]:
            longest, new = max(longest, len(r.prompt_ids)), max(new, r.max_new_tokens)
            if batch and (len(batch) + 1) * (longest + new) > self.max_batch_tokens:
                break
            batch.append(r)
        self._queue = self._queue[len(batch):]
        return batch

    async def _drain(self):
        while self._queue:
            await asyncio.sleep(self.gather_window)
            batch = self._next_batch()
            max_new_tokens = max(r.max_new_tokens for r in batch)
            seeds = [r.seed for r in batch]
            extra = {"seeds": seeds} if any(s is not None for s in seeds) else {}
            self.n_sampling_calls += 1
            try:
                # The model runs in a worker thread so REPLs and sub-calls keep moving meanwhile.
                samples = await asyncio.to_thread(
                    self.policy.sample, [r.prompt_ids for r in batch], max_new_tokens=max_new_tokens,
                    temperature=self.temperature, top_p=self.top_p, **extra)
            except Exception as e:  # a failed batch fails its requests, never the worker
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            for r, s in zip(batch, samples):
                if len(s.token_ids) > r.max_new_tokens:
                    s = dataclasses.replace(s, token_ids=s.token_ids[: r.max_new_tokens],
                                            logprobs=s.logprobs[: r.max_new_tokens], finish_reason="length")
                if not r.future.done():
                    r.future.set_result(s)


# -----------------------------------------------------------------------------
# Prompts


def system_prompt(can_recurse, allow_async, max_call_sub_calls=0, max_prompt_chars=0):
    # Short on purpose: it is prefilled on every turn of every call, and trained on (as context) in
    # every row, so each token here costs compute many times over. The limits line appears only
    # when a run sets per-call limits, so the model can plan around them (see RLM).
    lines = [
        "You answer a query about a long context. It is the variable `context` in a Python REPL: write "
        "Python in ```repl blocks and see what they print; variables persist.",
        "In the REPL (asyncio, json, math and re are imported):",
        "- `context`, and `query`: the query, a str.",
        "- `llm_query(prompt)` -> str: a language model answers about a short text.",
    ]
    if can_recurse:
        lines.append("- `rlm_query(query, context)` -> str: a new RLM with its own REPL solves a sub-problem "
                     "on a piece of the context.")
    if allow_async:
        lines.append("- `llm_query_batched(prompts)` -> list of str; `await llm_query_async(prompt)`"
                     + (", `await rlm_query_async(query, context)`" if can_recurse else "")
                     + ": run many at once, e.g. with `await asyncio.gather(...)`.")
    limits = [f"each call may start at most {max_call_sub_calls} sub-calls" if max_call_sub_calls else "",
              f"an llm_query prompt may hold at most {max_prompt_chars} characters" if max_prompt_chars else ""]
    if any(limits):
        lines.append("- Limits: " + "; ".join(x for x in limits if x) + ".")
    lines += [
        "- `FINAL(answer)`: give the answer. The first FINAL ends your work: nothing after it runs.",
        "Inspect the context with code (slicing, re, chunks), ask sub-calls about pieces, combine, then FINAL.",
    ]
    return "\n".join(lines)


def describe_context(context, preview_chars=300):
    if isinstance(context, str):
        kind, size, preview = "str", f"{len(context):,} characters", context[:preview_chars]
    elif isinstance(context, dict):
        size = f"{len(context):,} keys, {sum(len(str(v)) for v in context.values()):,} characters"
        kind, preview = "dict", repr(dict(list(context.items())[:3]))[:preview_chars]
    else:
        size = f"{len(context):,} items, {sum(len(str(v)) for v in context):,} characters"
        kind, preview = type(context).__name__, repr(list(context[:3]))[:preview_chars]
    return f"The context is a {kind} of {size}. It begins:\n{preview}..."


def user_prompt(query, context, preview_chars):
    return f"Query: {query}\n\n{describe_context(context, preview_chars)}"


LAST_TURN = "You are out of turns. Reply with FINAL(your answer) now."


# -----------------------------------------------------------------------------
# The RLM


class _Budget:
    """What one call and the sub-calls it starts may still spend. Its own replies draw on it
    one at a time; a sub-call is lent a share, which comes back only at points the code fixes."""

    def __init__(self, tokens, sub_calls):
        self.tokens = tokens  # generated tokens
        self.sub_calls = sub_calls  # sub-calls below this call, of any kind and depth
        self.lent = {}  # REPL request id -> the budget lent to that sub-call
        self.ended = asyncio.Event()  # set when the call it belongs to has ended

    def lend(self, request_id, tokens, sub_calls):
        """A sub-call's budget: up to `tokens`, and `sub_calls` counting the sub-call itself."""
        tokens, sub_calls = min(tokens, self.tokens), min(sub_calls, self.sub_calls)
        if sub_calls < 1:
            raise BudgetExhausted("this call's share of the rollout's sub-call budget is spent; "
                                  "combine what you have and call FINAL")
        if tokens < 1:
            raise BudgetExhausted("this call's share of the rollout's token budget is spent; "
                                  "combine what you have and call FINAL")
        self.tokens, self.sub_calls = self.tokens - tokens, self.sub_calls - sub_calls
        self.lent[request_id] = child = _Budget(tokens, sub_calls - 1)
        return child

    def take_back(self, request_id):
        child = self.lent.pop(request_id, None)
        if child is not None:  # a refused request was never lent anything
            self.tokens, self.sub_calls = self.tokens + child.tokens, self.sub_calls + child.sub_calls

    async def take_back_all(self):
        await asyncio.gather(*[child.ended.wait() for child in self.lent.values()])
        for request_id in list(self.lent):
            self.take_back(request_id)


class _RolloutState:
    """Mutable bookkeeping shared by every call of one rollout."""

    def __init__(self, seed):
        self.seed = seed
        self.paths = {}  # call id -> its path in the tree, e.g. (0, 2): the root's third sub-call's first
        self.calls = []
        self.budgets = {}  # call id -> _Budget
        self.clock = 0  # logical clock: orders sub-call starts and ends, for display only
        # For the critical path, per call and reset each turn: which sub-call each REPL request
        # started, and which of them the code knows have ended (it received their replies, or
        # they belong to an earlier cell of the turn, all of whose sub-calls end before the next).
        self.requested = {}  # call id -> {REPL request id: sub-call id}
        self.known_ended = {}  # call id -> sub-call ids
        self.started = {}  # call id -> how many sub-calls it has started (max_call_sub_calls)

    def tick(self):
        self.clock += 1
        return self.clock


class RLM:
    """Runs rollouts of one policy as recursive language models.

    Budgets are handed down the call tree so that no budget depends on timing. The root owns
    max_generated_tokens and max_sub_calls. When code asks for a sub-call, the call grants it
    a share of what it has left, at once and in the order the code asked: an llm_query (or an
    rlm_query at max_depth) gets up to max_new_tokens and one sub-call, an rlm_query up to
    max_child_tokens and max_child_sub_calls (one of them for itself); a request that would get
    nothing fails in the code with BudgetExhausted. A call's own replies draw on its share.
    What a sub-call leaves unused returns to its parent when the parent's code, having
    received its reply, asks for another sub-call, or else when the parent's code cell ends.
    """

    def __init__(self, batcher, *, max_depth=2, max_turns=6, max_new_tokens=256, max_sub_calls=16,
                 max_generated_tokens=4096, max_child_tokens=None, max_child_sub_calls=None,
                 max_call_tokens=8192, max_call_sub_calls=0, max_prompt_chars=0, allow_async=True,
                 allow_rlm_query=True,
                 repl_timeout=10.0, max_output_chars=2000, preview_chars=300, on_sample=None):
        self.batcher = batcher
        self.policy = batcher.policy
        self.max_depth = max_depth  # the root is depth 0; rlm_query at max_depth becomes a plain completion
        self.max_turns = max_turns  # sampled turns per RLM call, before the last "answer now" turn
        self.max_new_tokens = max_new_tokens  # per sampled reply
        self.max_sub_calls = max_sub_calls  # per rollout, every kind and depth together
        self.max_generated_tokens = max_generated_tokens  # per rollout, the whole tree
        # The share an rlm_query is granted: by default a quarter of each budget (at least one
        # reply's worth), so a few concurrent children each get a turn and leave some behind.
        self.max_child_tokens = max_child_tokens or max(max_new_tokens, max_generated_tokens // 4)
        self.max_child_sub_calls = max_child_sub_calls or max(1, max_sub_calls // 4)
        self.max_call_tokens = max_call_tokens  # one call's conversation must fit the model's window
        # Per-call limits (0 = none), stated in the system prompt: how many sub-calls one call may start,
        # and how many characters a plain completion may read. Together they bound what one level of
        # calls can cover (K pieces of C characters), so a longer input needs a child RLM per part,
        # which splits its part again: the reason for depth in tasks.py's tally family.
        self.max_call_sub_calls, self.max_prompt_chars = max_call_sub_calls, max_prompt_chars
        self.allow_async = allow_async
        self.allow_rlm_query = allow_rlm_query
        self.repl_timeout, self.max_output_chars = repl_timeout, max_output_chars
        self.preview_chars = preview_chars
        self.on_sample = on_sample  # callback(n_tokens) for progress displays

    async def run(self, query, context, seed=None):
        """One rollout. With a seed, its samples are reproducible whatever else runs beside it."""
        state = _RolloutState(seed)
        root = self._new_call(state, None, "root", 0, query)
        state.budgets[root.id] = _Budget(self.max_generated_tokens, self.max_sub_calls)
        answer = await self._rlm_call(state, root, context)
        calls = _in_tree_order(state.calls, state.paths)
        finish_costs(calls)
        return Rollout(query, answer, calls, calls[0].cost, self.max_generated_tokens)

    # --- one generation, within the call's budget

    async def _generate(self, state, call, max_new_tokens):
        budget = state.budgets[call.id]
        window = self.max_call_tokens - len(call.token_ids)
        n = min(max_new_tokens, budget.tokens, window)
        if n <= 0:
            raise BudgetExhausted(
                "this call's share of the rollout's token budget is spent" if budget.tokens <= 0
                else "this call's conversation has filled the model's context window")
        seed = None
        if state.seed is not None:
            path = f"{state.seed}/{state.paths[call.id]}/{len(call.prompt_lengths)}"
            seed = zlib.crc32(path.encode())
        call.prompt_lengths.append(len(call.token_ids))
        # A call lends nothing while it samples (its code is not running), so no reservation is needed.
        sample = await self.batcher.sample(call.token_ids, n, seed)
        budget.tokens -= len(sample.token_ids)
        call.append(sample.token_ids, True, sample.logprobs)
        if self.on_sample:
            self.on_sample(len(sample.token_ids))
        return sample

    def _new_call(self, state, parent, kind, depth, query):
        call = Call(id=len(state.calls), parent=parent, kind=kind, depth=depth, query=query, started=time.time())
        siblings = sum(c.parent == parent for c in state.calls) if parent is not None else 0
        # Requests from one REPL arrive in the order its code made them, so paths are stable.
        state.paths[call.id] = () if parent is None else state.paths[parent] + (siblings,)
        state.calls.append(call)
        return call

    # --- a plain completion

    async def _llm_call(self, state, call):
        call.started, prompt = time.time(), call.query
        limit = self.max_call_tokens - self.max_new_tokens
        ids = self.policy.chat_ids([{"role": "user", "content": prompt}])
        while len(ids) > limit:  # cut the middle; the question usually sits at one end
            keep = int(len(prompt) * limit / len(ids) * 0.9) // 2
            prompt = f"{prompt[:keep]}\n[... {len(prompt) - 2 * keep} characters cut ...]\n{prompt[-keep:]}"
            ids = self.policy.chat_ids([{"role": "user", "content": prompt}])
        call.append(ids, False)
        try:
            sample = await self._generate(state, call, self.max_new_tokens)
            call.answer = self.policy.decode(strip_eos(sample.token_ids, self.policy.eos_token_ids)).strip()
            call.turns.append({"reply": call.answer, "code": [], "observation": None, "sub_calls": []})
        finally:
            call.ended = time.time()
        return call.answer

    # --- a full recursive call

    async def _rlm_call(self, state, call, context):
        call.started, query = time.time(), call.query
        can_recurse = self.allow_rlm_query and call.depth < self.max_depth
        messages = [{"role": "system", "content": system_prompt(can_recurse, self.allow_async,
                                                                self.max_call_sub_calls, self.max_prompt_chars)},
                    {"role": "user", "content": user_prompt(query, context, self.preview_chars)}]
        call.append(self.policy.chat_ids(messages), False)
        lock = None if self.allow_async else asyncio.Lock()

        async def handler(request):
            return await self._sub_call(state, call, request, lock)

        # The query is a variable too, so code can pass it on to sub-calls. Setup code runs
        # again after a restart, so what the system prompt promises is always there.
        setup = f"import asyncio, json, math, re\nquery = {query!r}"
        try:
            async with REPL(context, handler=handler, timeout=self.repl_timeout,
                            max_output_chars=self.max_output_chars, setup=setup) as repl:
                for turn in range(self.max_turns + 1):
                    try:
                        sample = await self._generate(state, call, self.max_new_tokens)
                    except BudgetExhausted as e:
                        call.turns.append({"reply": None, "code": [], "observation": f"[stopped: {e}]",
                                           "sub_calls": []})
                        break
                    reply = self.policy.decode(strip_eos(sample.token_ids, self.policy.eos_token_ids))
                    record = {"reply": reply, "code": [], "observation": None, "sub_calls": []}
                    call.turns.append(record)
                    observation, call.answer = await self._run_reply(state, call, repl, record)
                    if call.answer is not None or turn == self.max_turns:
                        # What the last cells printed is kept for the record (a failed last cell
                        # is a failure eval.py counts), though no model reads it.
                        record["observation"] = observation or None
                        break
                    if turn == self.max_turns - 1:
                        observation += "\n\n" + LAST_TURN
                    record["observation"] = observation
                    ended_with_eos = bool(sample.token_ids) and sample.token_ids[-1] in self.policy.eos_token_ids
                    call.append(self.policy.followup_ids(observation, ended_with_eos), False)
        finally:
            call.ended = time.time()
        return call.answer

    async def _run_reply(self, state, call, repl, record):
        """Run the reply's code blocks in order until the first FINAL, in code or in the text
        between blocks. -> (observation, answer or None)."""
        reply, outputs, text_from = record["reply"], [], 0
        requested = state.requested[call.id] = {}
        for block in CODE_BLOCK.finditer(reply):
            answer = _text_final(reply[text_from:block.start()])
            if answer is not None:
                return "\n".join(outputs), answer
            record["code"].append(block.group(1))
            # Every sub-call of the cells before has ended (see take_back_all below).
            state.known_ended[call.id] = set(requested.values())
            # Sub-calls made while this runs are recorded on this turn (the call's last).
            outputs.append(await repl.execute(block.group(1)))
            # The cell has ended: its sub-calls' leftovers come home (stragglers first finish).
            await state.budgets[call.id].take_back_all()
            if repl.answer is not None:
                return "\n".join(outputs), repl.answer
            text_from = block.end()
        answer = _text_final(reply[text_from:])
        if not outputs and answer is None:
            return ("No ```repl code block found in your reply. Write code in a ```repl block, "
                    "or call FINAL(answer) when you know the answer."), None
        return "\n".join(outputs), answer

    async def _sub_call(self, state, call, request, lock):
        # Up to the first await this runs as the request arrives, and requests arrive in the
        # order the code made them: so the grant and the new call's path do not depend on timing.
        budget, requested = state.budgets[call.id], state.requested[call.id]
        for request_id in request.get("received", ()):  # sub-calls the code has seen finish
            budget.take_back(request_id)
            if request_id in requested:  # not one of an earlier turn's
                state.known_ended[call.id].add(requested[request_id])
        # What this sub-call waits for; served one at a time, it waits for every earlier one.
        after = sorted(state.known_ended[call.id] if lock is None else requested.values())
        fn = request.get("fn")
        if fn == "rlm_query" and not self.allow_rlm_query:
            raise RuntimeError("rlm_query is not available in this run; use llm_query instead")
        recurse = fn == "rlm_query" and call.depth < self.max_depth
        # The prompt of a plain completion: llm_query's, or rlm_query's past max depth (None: a child RLM).
        prompt = None if recurse else request["prompt"] if fn == "llm_query" else \
            f"{request['query']}\n\n{request['context']}"
        self._check_limits(state, call, prompt)
        shares = (self.max_child_tokens, self.max_child_sub_calls) if recurse else (self.max_new_tokens, 1)
        child_budget = budget.lend(request.get("id"), *shares)
        state.started[call.id] = state.started.get(call.id, 0) + 1
        if recurse:
            child = self._new_call(state, call.id, "rlm_query", call.depth + 1, request["query"])
        else:
            child = self._new_call(state, call.id, "llm_query", call.depth + 1, prompt)
        state.budgets[child.id] = child_budget
        requested[request.get("id")] = child.id
        record = call.turns[-1]
        try:
            if lock is not None:
                await lock.acquire()
            try:
                start = state.tick()
                result = await (self._rlm_call(state, child, request["context"]) if recurse
                                else self._llm_call(state, child))
                record["sub_calls"].append({"fn": fn, "call": child.id, "after": after,
                                            "start": start, "end": state.tick()})
            finally:
                if lock is not None:
                    lock.release()
        finally:
            child_budget.ended.set()
        if result is None:
            stopped = any((t["observation"] or "").startswith("[stopped") for t in child.turns)
            return "(the sub-call gave no answer" + (": its budget ran out)" if stopped else ")")
        return result

    def _check_limits(self, state, call, prompt):
        """Refuse a sub-call that breaks a per-call limit, before anything is lent or counted."""
        if self.max_call_sub_calls and state.started.get(call.id, 0) >= self.max_call_sub_calls:
            raise SubCallRefused(f"this call has started its {self.max_call_sub_calls} sub-calls, the most one call "
                                 "may start; hand bigger parts to rlm_query (a child can split its part again), "
                                 "or combine what you have and call FINAL")
        if self.max_prompt_chars and prompt is not None and len(prompt) > self.max_prompt_chars:
            raise SubCallRefused(f"this llm_query prompt has {len(prompt):,} characters, more than the "
                                 f"{self.max_prompt_chars:,} one may hold; ask about smaller pieces, or hand "
                                 "the text to rlm_query, whose code can split it")


def strip_eos(ids, eos_ids):
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def _text_final(text):
    """The value of the first FINAL(...) in plain text: up to its matching parenthesis."""
    start = text.find("FINAL(")
    if start < 0:
        return None
    depth, opening = 0, start + len("FINAL")
    for i in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            break
    else:  # never closed: up to the last ")", if there is one
        i = text.rfind(")")
        if i <= opening:
            return None
    return text[opening + 1:i].strip().strip("'\"").strip()


def _in_tree_order(calls, paths):
    """Renumber calls depth first, children in the order their parent asked: ids that, unlike
    the order in which concurrent calls happened to start, do not depend on timing."""
    ordered = sorted(calls, key=lambda c: paths[c.id])
    new_id = {c.id: i for i, c in enumerate(ordered)}
    for c in ordered:
        c.id, c.parent = new_id[c.id], None if c.parent is None else new_id[c.parent]
        for turn in c.turns:
            # A sub-call that failed has no record, so nothing can be on a path through it.
            recorded = {s["call"] for s in turn["sub_calls"]}
            for s in turn["sub_calls"]:
                s["call"] = new_id[s["call"]]
                s["after"] = sorted(new_id[a] for a in s["after"] if a in recorded)
            turn["sub_calls"].sort(key=lambda s: s["call"])  # in the order asked, not the order they ended
    return ordered


# Tokens a plain sub-call's prompt needs at least (chat template, the cut marker, some text): below
# this, _llm_call cannot cut a prompt to fit max_call_tokens - max_new_tokens.
CALL_ROOM = 128


def main():
    # The budgets of BUDGETS for this machine (as train.py's); flags you give win over them.
    cpu_budgets, gpu_budgets = BUDGETS["cpu"], BUDGETS["gpu"]
    valid = dict(max_depth="at least 0 (0: no rlm_query)", max_turns="at least 0", max_new_tokens="at least 1",
                 max_sub_calls="at least 0", max_generated_tokens="at least 1",
                 max_call_tokens=f"at least max-new-tokens + {CALL_ROOM}")
    parser = argparse.ArgumentParser(description="Run one RLM on a text file and print its call tree.")
    parser.add_argument("--query", required=True, help="the question, not empty")
    parser.add_argument("--context", required=True, help="path of a text file (UTF-8): the long input")
    parser.add_argument("--model", default=None, help="HF hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="a saved LoRA adapter folder, e.g. out/train/adapter")
    for name in cpu_budgets:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"{valid[name]}; default: {cpu_budgets[name]} on CPU, {gpu_budgets[name]} on GPU")
    parser.add_argument("--temperature", type=float, default=0.7, help="at least 0; 0 is greedy")
    parser.add_argument("--sync", action="store_true", help="serve sub-calls one at a time")
    parser.add_argument("--trace", default=None, help="write the rollout as one JSONL line here")
    parser.add_argument("--html", default=None, help="write the rollout as a self-contained page here (view.py)")
    args = parser.parse_args()

    budgets = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in default_budgets().items()}
    refuse("rlm.py", [
        not args.query.strip() and "--query is empty; ask a question",
        at_least("--temperature", args.temperature, 0), at_least("--max-depth", budgets["max_depth"], 0),
        at_least("--max-turns", budgets["max_turns"], 0), at_least("--max-new-tokens", budgets["max_new_tokens"], 1),
        at_least("--max-sub-calls", budgets["max_sub_calls"], 0),
        at_least("--max-generated-tokens", budgets["max_generated_tokens"], 1),
        # a plain sub-call's prompt is cut to fit max_call_tokens - max_new_tokens: it needs some room
        at_least("--max-call-tokens", budgets["max_call_tokens"], budgets["max_new_tokens"] + CALL_ROOM)])
    try:
        context, replaced = read_text(args.context, "--context")
        if args.adapter:
            adapter_folder(args.adapter, "--adapter")
        outputs = [(path, flag) for path, flag in ((args.trace, "--trace"), (args.html, "--html")) if path]
        if len(outputs) == 2 and os.path.abspath(args.trace) == os.path.abspath(args.html):
            raise InputError("--trace and --html are the same file; give them different paths")
        for path, flag in outputs:
            writable(path, flag, inputs=[args.context])
    except InputError as e:
        sys.exit(f"rlm.py: {e}")
    if replaced:
        print(f"note: {replaced:,} bytes of {args.context} are not UTF-8; each became U+FFFD in the context",
              file=sys.stderr, flush=True)

    from tqdm import tqdm

    from lora import load_policy

    print(f"loading the policy ({args.model or 'SmolLM2-135M-Instruct'})...", flush=True)
    policy = load_policy(args.model, adapter=args.adapter)
    bar = tqdm(total=budgets["max_generated_tokens"], desc="generated tokens (budget)", unit="tok")
    rlm = RLM(Batcher(policy, temperature=args.temperature), allow_async=not args.sync, on_sample=bar.update,
              **budgets)
    rollout = asyncio.run(rlm.run(args.query, context))
    bar.close()
    print(format_rollout(rollout))
    if args.trace:
        write_jsonl([rollout], args.trace)
        print(f"trace written to {args.trace}")
    if args.html:
        from view import write_html

        write_html([rollout], args.html, title=f"rlm.py: {args.query}")
        print(f"page written to {args.html}")


if __name__ == "__main__":
    main()
