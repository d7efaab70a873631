"""rlm.py driven by a scripted policy (canned replies, byte-level tokens) and by a tiny real model."""

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlm import RLM, Batcher
from scripted import EOS, ScriptedPolicy, encode, parse, repl_block
from trace import dependencies, heaviest_chain, read_jsonl, write_jsonl


def run(policy, query="q", context="abcdefghij" * 10, **settings):
    rlm = RLM(Batcher(policy, gather_window=0.005), **settings)
    return asyncio.run(rlm.run(query, context)), rlm


def assert_prefix_property(rollout, policy):
    """Every prompt sampled from is a prefix of its call's final ids; sampled ids are masked in."""
    seen = {tuple(p) for p in policy.prompts}
    for call in rollout.calls:
        assert len(call.token_ids) == len(call.sampled_mask) == len(call.sampling_logprobs)
        for n in call.prompt_lengths:
            assert tuple(call.token_ids[:n]) in seen  # the prompt was exactly this prefix
            assert call.sampled_mask[n] == 1  # and what follows it was sampled
        assert not any(call.sampled_mask[: call.prompt_lengths[0]])
    assert sum(sum(c.sampled_mask) for c in rollout.calls) == rollout.cost.generated_tokens


def test_recursion_to_depth_3_and_final_from_nested_children():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "plain"
        depth = int(p["query"][-1])
        if depth < 3:
            return repl_block(f"FINAL('d{depth}<' + rlm_query('depth{depth + 1}', context[1:]))")
        return repl_block("FINAL('leaf:' + context[:3])")

    rollout, _ = run(ScriptedPolicy(script), query="depth0", context="0123456789", max_depth=3)
    assert rollout.answer == "d0<d1<d2<leaf:345"
    assert [c.kind for c in rollout.calls] == ["root", "rlm_query", "rlm_query", "rlm_query"]
    assert [c.depth for c in rollout.calls] == [0, 1, 2, 3]
    assert [c.parent for c in rollout.calls] == [None, 0, 1, 2]
    assert rollout.cost.depth == 3 and rollout.cost.sub_calls == {"llm_query": 0, "rlm_query": 3}
    # each child's FINAL ended only that child: the parent went on to its own FINAL
    assert [c.answer for c in rollout.calls] == ["d0<d1<d2<leaf:345", "d1<d2<leaf:345", "d2<leaf:345", "leaf:345"]


def test_rlm_query_at_max_depth_falls_back_to_a_plain_completion():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "plain answer"
        return repl_block("FINAL(rlm_query('deeper', context))")

    rollout, _ = run(ScriptedPolicy(script), max_depth=1)
    assert [c.kind for c in rollout.calls] == ["root", "rlm_query", "llm_query"]
    assert rollout.answer == "plain answer"
    assert rollout.calls[2].query.startswith("deeper\n\n")


def test_parallel_sub_calls_are_batched_into_fewer_sampling_calls():
    n = 8

    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "a" + p["query"]
        return repl_block(f"r = await asyncio.gather(*[llm_query_async(str(i)) for i in range({n})])\n"
                          "FINAL(','.join(r))")

    policy = ScriptedPolicy(script, delay=0.05)
    rollout, rlm = run(policy)
    assert rollout.answer == ",".join(f"a{i}" for i in range(n))
    sub_call_batches = policy.batch_sizes[1:]  # the first sampling call is the root's turn
    assert sum(sub_call_batches) == n
    assert len(sub_call_batches) < n
    assert rlm.batcher.n_requests == n + 1 and rlm.batcher.n_sampling_calls == len(policy.batch_sizes)


def test_batches_stay_within_the_padded_token_budget_and_every_request_is_answered():
    # Long prompts at once (the `direct` baseline at 512k characters) must not become one huge padded
    # batch; a request longer than the budget still runs, alone.
    class Recording:
        def __init__(self):
            self.calls = []

        def sample(self, prompts, max_new_tokens, **kw):
            self.calls.append([len(p) for p in prompts])
            return [type("S", (), {"token_ids": [len(p)], "logprobs": [0.0]})() for p in prompts]

    policy = Recording()
    batcher = Batcher(policy, max_batch_tokens=1000)
    lengths = [100, 300, 2000, 50, 400, 400, 10, 990]

    async def main():
        return await asyncio.gather(*[batcher.sample([1] * n, max_new_tokens=10) for n in lengths])

    replies = asyncio.run(main())
    assert [r.token_ids for r in replies] == [[n] for n in lengths]  # each reply went to its own request
    assert sorted(n for call in policy.calls for n in call) == sorted(lengths)
    for call in policy.calls:
        assert len(call) == 1 or len(call) * (max(call) + 10) <= 1000
    assert [2000] in policy.calls and [990] in policy.calls


def test_hundreds_of_sub_calls_in_flight_do_not_deadlock():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "x"
        return repl_block("r = llm_query_batched([str(i) for i in range(300)])\nFINAL(len(r))")

    rollout, _ = run(ScriptedPolicy(script), max_sub_calls=300, max_generated_tokens=100_000)
    assert rollout.answer == "300"
    assert rollout.cost.sub_calls["llm_query"] == 300


def test_cost_arithmetic_critical_path_versus_totals():
    # Root turn: one sequential call, then two concurrent ones, then FINAL.
    root_reply = repl_block("a = llm_query('x')\n"
                            "b, c = await asyncio.gather(llm_query_async('y'), llm_query_async('zz'))\n"
                            "FINAL(a + b + c)")
    replies = {"x": "aaaa", "y": "bb", "zz": "cccccc"}

    def script(text):
        p = parse(text)
        return replies[p["query"]] if p["kind"] == "llm" else root_reply

    policy = ScriptedPolicy(script)
    rollout, _ = run(policy)
    assert rollout.answer == "aaaabbcccccc"
    root_gen = len(encode(root_reply)) + 1  # +1: the end-of-turn token is sampled too
    gen = {q: len(r) + 1 for q, r in replies.items()}
    assert rollout.cost.generated_tokens == root_gen + sum(gen.values())
    # sequential calls add up, concurrent ones take the maximum
    assert rollout.cost.critical_path_tokens == root_gen + gen["x"] + max(gen["y"], gen["zz"])
    assert rollout.cost.prompt_tokens == sum(len(p) for p in policy.prompts)
    assert rollout.cost.sub_calls == {"llm_query": 3, "rlm_query": 0}
    assert rollout.calls[0].cost.critical_path_tokens == rollout.cost.critical_path_tokens


def test_sync_mode_serves_sub_calls_one_at_a_time_and_latency_adds_up():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "r" * 5
        return repl_block("r = await asyncio.gather(*[llm_query_async(str(i)) for i in range(3)])\nFINAL(len(r))")

    policy = ScriptedPolicy(script, delay=0.02)
    rollout, _ = run(policy, allow_async=False)
    assert rollout.answer == "3"
    assert policy.batch_sizes == [1, 1, 1, 1]
    root_gen = sum(rollout.calls[0].sampled_mask)  # the root's own tokens, not its subtree's
    assert rollout.cost.critical_path_tokens == root_gen + 3 * 6


def test_heaviest_chain_by_hand():
    assert heaviest_chain([], []) == []
    assert heaviest_chain([5, 7], [[], [0]]) == [0, 1]  # one waited for the other: 12
    assert heaviest_chain([5, 7], [[], []]) == [1]  # concurrent: 7
    assert heaviest_chain([5, 1, 4, 2], [[], [0], [0], [0, 1, 2]]) == [0, 2, 3]  # 5 + 4 + 2


def test_dependencies_of_old_traces_fall_back_to_the_clock():
    # Traces written before "after" existed: a sub-call waited for those that ended before it started.
    old = [{"call": 3, "start": 4, "end": 5}, {"call": 1, "start": 1, "end": 2}, {"call": 2, "start": 3, "end": 6}]
    records, after = dependencies(old)
    assert [s["call"] for s in records] == [1, 3, 2] and after == [[], [0], [0]]
    new = [{**s, "after": []} for s in old]  # with "after", the clock is ignored: all concurrent here
    records, after = dependencies(new)
    assert [s["call"] for s in records] == [1, 2, 3] and after == [[], [], []]


# Slow work before it asks, holding the REPL's loop: the sub-call asked before may end first.
LATER = "async def later(prompt):\n    time.sleep(PAUSE)\n    return await llm_query_async(prompt)\n"


def with_random_timing(script, n, seed):
    """n rollouts at once, each with its own random sampling times (up to twice PAUSE) and gather window."""
    async def one(rng):
        policy = ScriptedPolicy(script, delay=lambda: rng.uniform(0.0, 0.2))
        rlm = RLM(Batcher(policy, gather_window=rng.uniform(0.0, 0.005)), max_new_tokens=1000)
        return await rlm.run("q", "abcdefghij")

    async def all_of_them():
        # A thread each, so that one rollout's sampling never waits for another's: its own times are what vary.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(n))
        return await asyncio.gather(*[one(random.Random(seed + i)) for i in range(n)])

    return asyncio.run(all_of_them())


def gen(text):
    return len(encode(text)) + 1  # a reply's tokens and its end-of-turn token


def after_by_query(rollout, call_id=0):
    """query -> queries of the sub-calls it waited for, for one call's sub-calls."""
    query = {c.id: c.query for c in rollout.calls}
    return {query[s["call"]]: [query[a] for a in s["after"]]
            for turn in rollout.calls[call_id].turns for s in turn["sub_calls"]}


def test_gathered_sub_calls_take_the_maximum_however_fast_each_one_is():
    # The fast sub-call often ends before the slow one is even asked for, so on the clock they
    # look like a chain; but the code had not received its reply when it asked for the slow one.
    root = repl_block(f"import time\nPAUSE = 0.1\n{LATER}"
                      "a, b = await asyncio.gather(llm_query_async('fast'), later('slow'))\nFINAL(a + b)")
    replies = {"fast": "f" * 5, "slow": "s" * 40}

    def script(text):
        p = parse(text)
        return replies[p["query"]] if p["kind"] == "llm" else root

    seen = set()
    for rollout in with_random_timing(script, 15, seed=0):
        assert rollout.answer == replies["fast"] + replies["slow"]
        assert after_by_query(rollout) == {"fast": [], "slow": []}
        seen.add(rollout.cost.critical_path_tokens)
    assert seen == {gen(root) + max(gen(replies["fast"]), gen(replies["slow"]))}


def test_sequential_sync_sub_calls_add_up():
    root = repl_block("FINAL([llm_query(c) for c in ['a', 'bb', 'ccc', 'dddd']])")
    replies = {q: q * 7 for q in ["a", "bb", "ccc", "dddd"]}

    def script(text):
        p = parse(text)
        return replies[p["query"]] if p["kind"] == "llm" else root

    seen = set()
    for repeat in range(5):
        rng = random.Random(repeat)
        rollout, _ = run(ScriptedPolicy(script, delay=lambda: rng.uniform(0.0, 0.03)))
        # each waited for every one before it: the code had each reply before it asked again
        assert after_by_query(rollout) == {"a": [], "bb": ["a"], "ccc": ["a", "bb"], "dddd": ["a", "bb", "ccc"]}
        seen.add(rollout.cost.critical_path_tokens)
    assert seen == {gen(root) + sum(gen(r) for r in replies.values())}


def test_a_call_then_a_gather_is_the_first_plus_the_heavier_of_the_gathered():
    # a = await rlm_query_async(...); then b and c gathered, both after a, neither after the other.
    root = repl_block(f"import time\nPAUSE = 0.1\n{LATER}"
                      "a = await rlm_query_async('child', context[:5])\n"
                      "b, c = await asyncio.gather(llm_query_async(a + '1'), later(a + '2'))\nFINAL(b + c)")
    child = repl_block("FINAL(context[:3])")
    replies = {"abc1": "b" * 30, "abc2": "c" * 3}

    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return replies[p["query"]]
        return root if p["query"] == "q" else child

    seen = set()
    for rollout in with_random_timing(script, 15, seed=100):
        assert rollout.answer == replies["abc1"] + replies["abc2"]
        assert after_by_query(rollout) == {"child": [], "abc1": ["child"], "abc2": ["child"]}
        seen.add(rollout.cost.critical_path_tokens)
    assert seen == {gen(root) + gen(child) + max(gen(replies["abc1"]), gen(replies["abc2"]))}


def test_later_cells_of_a_turn_wait_for_every_sub_call_of_the_cells_before():
    # The second block starts only once the first block's sub-calls have all ended, even one
    # whose reply its code never took.
    first = repl_block("t = asyncio.ensure_future(llm_query_async('x'))\nawait asyncio.sleep(0)\nb = llm_query('y')")
    second = repl_block("c = llm_query('z')\nFINAL(b + c)")
    replies = {"x": "x" * 20, "y": "y", "z": "z" * 2}

    def script(text):
        p = parse(text)
        return replies[p["query"]] if p["kind"] == "llm" else first + "\n" + second

    rollout, _ = run(ScriptedPolicy(script))
    assert after_by_query(rollout) == {"x": [], "y": [], "z": ["x", "y"]}
    assert rollout.cost.critical_path_tokens == gen(first + "\n" + second) + gen(replies["x"]) + gen(replies["z"])


def test_reply_without_code_gets_an_observation_and_the_rollout_goes_on():
    def script(text):
        p = parse(text)
        if p["turn"] == 0:
            return "I am thinking about it."
        assert "No ```repl code block" in p["observation"]
        return repl_block("FINAL('done')")

    rollout, _ = run(ScriptedPolicy(script))
    assert rollout.answer == "done"
    assert len(rollout.calls[0].turns) == 2


def test_final_written_as_text_counts_and_turns_run_out_with_a_last_turn():
    def script(text):
        p = parse(text)
        if "out of turns" in p["observation"]:
            return "FINAL(forty two)"
        return repl_block("print(len(context))")

    rollout, _ = run(ScriptedPolicy(script), max_turns=3)
    assert rollout.answer == "forty two"
    assert len(rollout.calls[0].turns) == 4  # 3 turns and the last one


def test_no_answer_when_the_model_never_answers():
    rollout, _ = run(ScriptedPolicy(lambda text: repl_block("x = 1")), max_turns=2)
    assert rollout.answer is None and rollout.calls[0].answer is None


def test_errors_inside_sub_calls_reach_the_model_code_and_the_rollout_goes_on():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            if p["query"] == "bad":
                raise ValueError("the model broke on this prompt")
            return "fine"
        if p["turn"] == 0:
            return repl_block("try:\n    llm_query('bad')\nexcept Exception as e:\n    print('caught:', e)\n"
                              "print(llm_query('good'))")
        return repl_block("FINAL('ok')")

    rollout, _ = run(ScriptedPolicy(script))
    observation = rollout.calls[0].turns[0]["observation"]
    assert "caught:" in observation and "the model broke on this prompt" in observation and "fine" in observation
    assert rollout.answer == "ok"


def test_rlm_query_can_be_disabled():
    def script(text):
        p = parse(text)
        if p["turn"] == 0:
            return repl_block("rlm_query('sub', context)")
        assert "rlm_query is not available" in p["observation"]
        return repl_block("FINAL('no recursion')")

    rollout, _ = run(ScriptedPolicy(script), allow_rlm_query=False)
    assert rollout.answer == "no recursion" and len(rollout.calls) == 1


def test_sub_call_budget_is_enforced_with_a_clear_observation():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "y"
        if p["turn"] == 0:
            return repl_block("for i in range(5):\n    try:\n        print(llm_query(str(i)))\n"
                              "    except Exception as e:\n        print('error:', e)")
        return repl_block("FINAL('stop')")

    rollout, _ = run(ScriptedPolicy(script), max_sub_calls=3)
    observation = rollout.calls[0].turns[0]["observation"]
    assert observation.count("error:") == 2 and "sub-call budget" in observation
    assert rollout.cost.sub_calls["llm_query"] == 3


def test_token_budget_is_never_exceeded():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "z" * 50
        return repl_block("r = llm_query_batched(['a'] * 10)\nprint(r)")

    rollout, _ = run(ScriptedPolicy(script), max_generated_tokens=300, max_turns=5, max_sub_calls=100)
    assert rollout.cost.generated_tokens <= 300
    assert any("token budget" in (t["observation"] or "") for t in rollout.calls[0].turns)


def test_budgets_that_run_out_do_not_depend_on_timing():
    # Concurrent rlm_query children and llm_query leaves race for a budget too small for all of
    # them, while sampling takes a random time that differs from repeat to repeat.
    root_code = ("r = await asyncio.gather(*[rlm_query_async(q, context) for q in 'ACE'], llm_query_async('b'), "
                 "llm_query_async('d'), return_exceptions=True)\nFINAL([str(x)[:40] for x in r])")

    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "leaf:" + p["query"] + "." * 15
        if p["query"] == "root":
            return repl_block(root_code)
        return repl_block("x = [llm_query(query + '1')] + llm_query_batched([query + '2', query + '3'])\n"
                          "FINAL(query + str(x))")

    settings = dict(max_generated_tokens=600, max_new_tokens=200, max_child_tokens=150, max_sub_calls=12,
                    max_child_sub_calls=4, max_depth=1)
    outcomes = set()
    for repeat in range(20):
        rng = random.Random(repeat)
        policy = ScriptedPolicy(script, delay=lambda: rng.uniform(0.0, 0.03))
        rlm = RLM(Batcher(policy, gather_window=rng.uniform(0.001, 0.01)), **settings)
        rollout = asyncio.run(rlm.run("root", "abcdefghij", seed=7))
        assert rollout.cost.generated_tokens <= 600 and sum(rollout.cost.sub_calls.values()) <= 12
        outcomes.add((rollout.answer, tuple(rollout.cost.sub_calls.items()), tuple(
            (c.id, c.parent, c.kind, c.query, sum(c.sampled_mask), c.answer) for c in rollout.calls)))
    assert len(outcomes) == 1
    [(answer, sub_calls, calls)] = outcomes
    # After its 184-token reply the root had 416 tokens: A and C got 150 each, E the last 116, in
    # the order the code asked; b and d got none. A child's 111-token reply left A and C 39 tokens:
    # 23 for the first leaf, whose 16 left over came back when the code asked again, so the second
    # leaf was cut to 16 and the third refused; E's first leaf was cut to 5 and the others refused.
    assert [(c[1], c[3], c[4]) for c in calls] == [
        (None, "root", 184), (0, "A", 111), (1, "A1", 23), (1, "A2", 16), (0, "C", 111), (4, "C1", 23),
        (4, "C2", 16), (0, "E", 111), (7, "E1", 5)]
    assert answer.count("llm_query failed: BudgetExhausted") == 2 and sub_calls == (("llm_query", 5), ("rlm_query", 3))


def test_what_a_sub_call_leaves_comes_back_once_the_code_has_its_reply():
    # What the root's reply leaves is one sub-call's grant; one after another, every sub-call gets one.
    root_reply = repl_block("FINAL([llm_query(str(i)) for i in range(6)])")
    root_tokens = len(encode(root_reply)) + 1
    policy = ScriptedPolicy(lambda text: "ok" if parse(text)["kind"] == "llm" else root_reply)
    rollout, _ = run(policy, max_generated_tokens=2 * root_tokens, max_new_tokens=root_tokens)
    assert rollout.answer == str(["ok"] * 6)
    assert rollout.cost.generated_tokens == root_tokens + 6 * 3


def test_a_restarted_repl_keeps_query_and_the_modules_and_says_what_was_lost():
    def script(text):
        p = parse(text)
        if p["turn"] == 0:
            return repl_block("x = 1\nimport random\nrandom._os._exit(3)")
        if p["turn"] == 1:
            return repl_block("print(query, re.escape('a.b'), json.dumps([math.pi > 3]), asyncio.sleep)\nprint(x)")
        return "FINAL(done)"

    rollout, _ = run(ScriptedPolicy(script), query="what is x?")
    first, second = (t["observation"] for t in rollout.calls[0].turns[:2])
    assert "restarted" in first and "`context` was reloaded" in first
    assert "as were asyncio, json, math, query, re" in first and "all other variables were lost" in first
    assert second.startswith("what is x? a\\.b [true] <function sleep") and "NameError: name 'x'" in second


def test_the_first_final_ends_the_call():
    first = repl_block("FINAL('first')\nprint(llm_query('not after FINAL in its cell'))")
    second = repl_block("llm_query('nor in a later block')\nFINAL('second')")

    def script(text):
        p = parse(text)
        return "sub" if p["kind"] == "llm" else f"{first}\n{second}"

    rollout, _ = run(ScriptedPolicy(script))
    assert rollout.answer == "first" and len(rollout.calls) == 1
    assert rollout.calls[0].turns[0]["code"] == [first[len("```repl\n"):-len("```")]]  # the blocks that ran
    # FINAL written as text comes first in this reply, so the code after it does not run
    rollout, _ = run(ScriptedPolicy(lambda text: "FINAL(f(x) = 2)\n" + second + " FINAL(3)"))
    assert rollout.answer == "f(x) = 2" and len(rollout.calls) == 1


def test_token_ids_obey_the_prefix_property_and_the_trace_round_trips(tmp_path):
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "child"
        if p["turn"] == 0:
            return repl_block("print(rlm_query('sub', context[:5]))")
        return repl_block("FINAL('x')")

    policy = ScriptedPolicy(script)
    rollout, _ = run(policy, max_depth=2)
    assert_prefix_property(rollout, policy)
    root = rollout.calls[0]
    sampled = [t for t, m in zip(root.token_ids, root.sampled_mask) if m]
    expected = encode(repl_block("print(rlm_query('sub', context[:5]))")) + [EOS]
    assert sampled[: len(expected)] == expected  # the first reply, byte for byte, then its end-of-turn
    path = tmp_path / "trace.jsonl"
    write_jsonl([rollout, rollout], path)
    back = read_jsonl(path)
    assert len(back) == 2 and back[0] == rollout


def test_tiny_real_model_end_to_end(tiny_policy):
    torch = pytest.importorskip("torch")
    from conftest import summation_tolerance
    rlm = RLM(Batcher(tiny_policy), max_turns=2, max_new_tokens=24, max_generated_tokens=200)

    async def main():
        return await asyncio.gather(*[rlm.run("What is the key?", "The key is 42. " * 50) for _ in range(3)])

    rollouts = asyncio.run(main())
    assert rlm.batcher.n_sampling_calls < rlm.batcher.n_requests  # the three roots shared batches
    for rollout in rollouts:
        root = rollout.calls[0]
        assert 0 < rollout.cost.generated_tokens <= 200
        # the trace's sampling log-probs agree with the training scoring path
        ids = torch.tensor([root.token_ids])
        mask = torch.tensor([root.sampled_mask], dtype=torch.bool)
        with torch.no_grad():
            scored = tiny_policy.logprobs(ids, torch.ones_like(ids), mask)
            logits = tiny_policy.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        sampled = torch.tensor(root.sampling_logprobs)[mask[0]]
        # the same float32 sums in another order (cached, batched decoding vs one pass): float32 steps
        # at the logits' size (see summation_tolerance); a wrong token or position moves one by ~1
        assert torch.allclose(scored[0][mask[0]], sampled, atol=summation_tolerance(logits.abs().max()), rtol=0)


def test_a_seeded_rollout_does_not_depend_on_what_runs_beside_it(tiny_policy):
    def make():
        return RLM(Batcher(tiny_policy), max_turns=1, max_new_tokens=16, max_generated_tokens=100)

    async def alone():
        return await make().run("Where is the key?", "key " * 100, seed=11)

    async def crowded():
        rlm = make()
        runs = [rlm.run("Where is the key?", "key " * 100, seed=s) for s in (3, 11, 5)]
        return (await asyncio.gather(*runs))[1]

    a, b = asyncio.run(alone()), asyncio.run(crowded())
    assert [c.token_ids for c in a.calls] == [c.token_ids for c in b.calls]
