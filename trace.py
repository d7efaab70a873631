"""
What a rollout leaves behind, and how it is read: the call tree with exact token ids, what
it cost, which sub-calls waited for which, the critical path, JSONL lines and a printout.

    from trace import read_jsonl, write_jsonl, format_rollout, critical_calls
    rollouts = read_jsonl("out/train/samples.jsonl")     # what train.py writes, one rollout a line
    print(format_rollout(rollouts[0]))                    # the call tree as text
    rollouts[0].cost.critical_path_tokens                 # the latency the reward charges

rlm.py writes these records; reward.py, grpo.py, eval.py and view.py read them, and none of
them needs the loop that made them. A rollout is a tree of calls: calls[0] is the root, and
every other call is an rlm_query (a child RLM with its own REPL and turns) or an llm_query
(one plain completion) made by its parent's code. Each call keeps its whole conversation as
the token ids the policy saw and sampled (sampled_mask marks the sampled ones, the only ones
trained on), and each turn a readable record of its reply, code, observation and sub-calls.

Latency is the critical path in generated tokens: a call's own tokens, plus, for each of its
turns, the heaviest chain of that turn's sub-calls, where a sub-call follows those it waited
for (whose replies its code had received before it asked). Sequential calls add up, gathered
calls count only the heaviest, and none of it depends on the clock.
"""

import dataclasses
import json
from dataclasses import dataclass, field

# -----------------------------------------------------------------------------
# The records


@dataclass
class Cost:
    prompt_tokens: int = 0  # tokens prefilled, summed over every sampling call of the tree
    generated_tokens: int = 0  # tokens sampled over the tree
    sub_calls: dict = field(default_factory=lambda: {"llm_query": 0, "rlm_query": 0})
    depth: int = 0  # deepest call reached, the root being 0
    critical_path_tokens: int = 0  # generated tokens along the longest chain of dependent calls
    wall_seconds: float = 0.0


@dataclass
class Call:
    """One node of the call tree: its whole conversation as exact token ids."""

    id: int
    parent: int | None
    kind: str  # "root", "rlm_query" or "llm_query"
    depth: int
    query: str
    token_ids: list = field(default_factory=list)
    sampled_mask: list = field(default_factory=list)  # 1 where the policy sampled the token
    sampling_logprobs: list = field(default_factory=list)  # aligned with token_ids, 0.0 where not sampled
    prompt_lengths: list = field(default_factory=list)  # len(token_ids) at each sampling call
    turns: list = field(default_factory=list)  # readable: reply, code, observation, sub-calls
    answer: str | None = None
    cost: Cost = field(default_factory=Cost)
    started: float = 0.0
    ended: float = 0.0

    def append(self, ids, sampled, logprobs=None):
        self.token_ids += ids
        self.sampled_mask += [int(sampled)] * len(ids)
        self.sampling_logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)


@dataclass
class Rollout:
    query: str
    answer: str | None
    calls: list  # calls[0] is the root; a child's parent is an index into this list
    cost: Cost
    max_generated_tokens: int


def write_jsonl(rollouts, path, mode="w"):
    """One rollout a line (mode "a" appends, as train.py does each step)."""
    with open(path, mode) as f:
        for rollout in rollouts:
            f.write(json.dumps(dataclasses.asdict(rollout)) + "\n")


def rollout_from_dict(d):
    """The inverse of dataclasses.asdict(rollout): a JSONL line, or a record's "trace", as a Rollout."""
    calls = [Call(**{**c, "cost": Cost(**c["cost"])}) for c in d["calls"]]
    return Rollout(**{**d, "calls": calls, "cost": Cost(**d["cost"])})


def read_jsonl(path):
    with open(path) as f:
        return [rollout_from_dict(json.loads(line)) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Who waited for whom: the dependency rule and the critical path


def dependencies(sub_calls):
    """One turn's sub-call records, each after those it waited for, and for each the positions
    (in that order) of those it waited for. -> (records, after).

    A sub-call waited for the ones in its "after": their replies had reached the code before it
    asked (or it was served after them). That is fixed by the code alone, so concurrent calls stay
    concurrent however fast each one was. Traces written before "after" existed fall back to the
    logical clock: a sub-call waited for those that ended before it started.
    """
    if all("after" in s for s in sub_calls):
        records = sorted(sub_calls, key=lambda s: s["call"])  # call ids follow the order asked
        position = {s["call"]: i for i, s in enumerate(records)}
        return records, [[position[a] for a in s["after"] if a in position] for s in records]
    records = sorted(sub_calls, key=lambda s: s["end"])
    return records, [[j for j, t in enumerate(records) if t["end"] < s["start"]] for s in records]


def heaviest_chain(weights, after):
    """Positions of one heaviest chain of calls, each waiting for the one before.

    weights[i]: call i's own latency; after[i]: the positions of the calls that call i waited
    for, all before i. Calls that did not wait for each other ran concurrently, so only the
    heaviest chain counts: a loop of sequential calls adds up, a gather takes the maximum.
    """
    best, back = [], []  # best[i]: the heaviest chain that ends with call i; back[i]: the call before it
    for weight, before in zip(weights, after):
        j = max(before, key=lambda j: best[j], default=None)
        best.append(weight + (best[j] if j is not None else 0))
        back.append(j)
    i = max(range(len(best)), key=lambda i: best[i], default=None)
    chain = []
    while i is not None:
        chain.append(i)
        i = back[i]
    return chain[::-1]


def finish_costs(calls):
    """Fill every call's cost (its subtree's totals and critical path), children before parents.
    calls: in tree order, each call's children after it (as RLM.run leaves them)."""
    for call in reversed(calls):
        _finish_cost(call, calls)


def _finish_cost(call, calls):
    """Fill call.cost from its own tokens and its children's (already finished) costs."""
    children = [c for c in calls if c.parent == call.id]
    cost = Cost(prompt_tokens=sum(call.prompt_lengths), generated_tokens=sum(call.sampled_mask),
                depth=call.depth, wall_seconds=call.ended - call.started)
    cost.critical_path_tokens = cost.generated_tokens
    for turn in call.turns:  # each turn's sub-calls end before the next turn starts: turns add up
        records, after = dependencies(turn["sub_calls"])
        weights = [calls[s["call"]].cost.critical_path_tokens for s in records]
        cost.critical_path_tokens += sum(weights[i] for i in heaviest_chain(weights, after))
        for s in turn["sub_calls"]:
            cost.sub_calls[s["fn"]] += 1
    for child in children:
        cost.prompt_tokens += child.cost.prompt_tokens
        cost.generated_tokens += child.cost.generated_tokens
        cost.depth = max(cost.depth, child.cost.depth)
        for k, v in child.cost.sub_calls.items():
            cost.sub_calls[k] += v
    call.cost = cost


def critical_calls(rollout):
    """Ids of the calls on the critical path: their own generated tokens sum to cost.critical_path_tokens."""
    calls, marked, todo = rollout.calls, set(), [0] if rollout.calls else []
    while todo:
        call = calls[todo.pop()]
        marked.add(call.id)
        for turn in call.turns:
            records, after = dependencies(turn["sub_calls"])
            chain = heaviest_chain([calls[s["call"]].cost.critical_path_tokens for s in records], after)
            todo += [records[i]["call"] for i in chain]
    return marked


# -----------------------------------------------------------------------------
# A rollout as text


def format_rollout(rollout, max_chars=600):
    def cut(text):
        text = str(text)
        return text if len(text) <= max_chars else text[: max_chars // 2] + " [...] " + text[-max_chars // 2:]

    lines = []
    for call in rollout.calls:
        pad = "  " * call.depth
        c = call.cost
        lines.append(f"{pad}#{call.id} {call.kind} depth={call.depth} parent={call.parent} "
                     f"gen={c.generated_tokens} prompt={c.prompt_tokens} critical={c.critical_path_tokens} "
                     f"{c.wall_seconds:.1f}s :: {cut(call.query)!r}")
        for i, turn in enumerate(call.turns):
            if call.kind != "llm_query":
                lines.append(f"{pad}  turn {i}: reply: {cut(turn['reply'])!r}")
                for s in turn["sub_calls"]:
                    lines.append(f"{pad}    -> {s['fn']} #{s['call']}")
                if turn["observation"] is not None:
                    lines.append(f"{pad}    observation: {cut(turn['observation'])!r}")
        lines.append(f"{pad}  answer: {call.answer!r}")
    c = rollout.cost
    lines.append(f"total: generated={c.generated_tokens} prompt={c.prompt_tokens} sub_calls={c.sub_calls} "
                 f"depth={c.depth} critical_path={c.critical_path_tokens} wall={c.wall_seconds:.1f}s")
    lines.append(f"answer: {rollout.answer!r}")
    return "\n".join(lines)
