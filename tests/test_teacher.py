"""teacher.py: every strategy solves its family through the real REPL, demonstrations are
token-exact traces, and the teacher never sees the ground truth."""

import asyncio
import dataclasses
import json
import random
import re

import pytest

from eval import _same_code  # what eval.py counts as the same code after a failed cell
from reward import RewardConfig, compute_reward
from tasks import AGGREGATE_TEXTS, make_task
from rlm import system_prompt
import teacher
from teacher import STRATEGIES, TeacherPolicy, demonstrate, make_demonstrations

SETTINGS = dict(max_turns=2, max_new_tokens=256, max_generated_tokens=1024, max_sub_calls=8)
# tally runs under per-call limits of its own: tests/test_recursion.py tests its strategies.
CASES = [(family, strategy) for family, strategies in STRATEGIES.items() for strategy in strategies
         if family != "tally"]
# (length, seed) per family. A records strategy sends every record to a sub-call, in two or four
# chunks that must fit a sub-call's window, so its lengths stop where the chunks still fit.
SEARCH_LENGTHS = [(2000, 11), (30_000, 12), (300_000, 13)]
RECORD_LENGTHS = [(2000, 11), (2000, 14), (8000, 12), (8000, 15), (30_000, 13)]
LENGTHS = {"niah": SEARCH_LENGTHS, "multihop": SEARCH_LENGTHS, "aggregate": RECORD_LENGTHS, "pairs": RECORD_LENGTHS,
           "source": SEARCH_LENGTHS}
TOPIC_OF = {text: label for label, texts in AGGREGATE_TEXTS.items() for text in texts}  # the test's own lookup


def run(policy, task, strategy, seed=0, settings=SETTINGS):
    return asyncio.run(demonstrate(policy, task, strategy, settings, seed))


@pytest.mark.parametrize("family, strategy", CASES)
def test_every_strategy_solves_its_family_across_lengths_and_seeds(tiny_policy, family, strategy):
    for length, seed in LENGTHS[family]:
        task = make_task(family, length, seed=seed)
        demo = run(tiny_policy, task, strategy, seed)
        assert demo.correctness == 1.0, (family, strategy, length, demo.rollout.answer, task.answer)
        # The answer came out of the REPL (FINAL in code) or out of an observation, never from the task.
        root = demo.rollout.calls[0]
        assert root.turns[0]["code"], "the first reply runs code"


def test_multihop_with_more_hops_is_solved_by_code_and_sub_calls(tiny_policy):
    task = make_task("multihop", 20_000, seed=5, hops=4)
    for strategy in ("regex", "llm_chain", "rlm_chain"):
        assert run(tiny_policy, task, strategy).correctness == 1.0, strategy


@pytest.mark.parametrize("family, variant", [("aggregate", {"question": "most_common"}),
                                             ("pairs", {"condition": "same_month"})])
def test_the_records_strategies_answer_the_other_questions_too(tiny_policy, family, variant):
    for strategy in STRATEGIES[family]:
        for length, seed in [(2000, 31), (8000, 32), (8000, 33)]:
            task = make_task(family, length, seed=seed, **variant)
            demo = run(tiny_policy, task, strategy, seed)
            assert demo.correctness == 1.0, (family, strategy, length, demo.rollout.answer, task.answer)


def _topic(record):
    return TOPIC_OF.get(record.split(" || Text: ")[-1])


def _user(record):
    return int(re.search(r"User: (\d+)", record).group(1))


def test_records_answers_follow_the_context_through_the_repl(tiny_policy):
    """The records strategies count and pair in the REPL what their sub-calls read: on a context
    with records taken out, the answer follows the context, away from the task's stored answer."""
    task = make_task("aggregate", 8000, seed=7)
    topic = re.search(r"How many records are about (\w+)\?", task.query).group(1)
    lines = task.context.split("\n")
    kept = [r for i, r in enumerate(lines) if i < len(lines) // 2 or _topic(r) != topic]
    changed = dataclasses.replace(task, context="\n".join(kept))
    expected = sum(_topic(r) == topic for r in kept)
    assert expected != task.answer
    for strategy in STRATEGIES["aggregate"]:
        demo = run(tiny_policy, changed, strategy)
        root = demo.rollout.calls[0]
        assert demo.rollout.answer == str(expected), strategy
        # One turn: the sub-calls' replies were combined by code, which called FINAL.
        assert len(root.turns) == 1 and root.turns[0]["sub_calls"] and "FINAL(" in root.turns[0]["code"][0]

    task = make_task("pairs", 8000, seed=7)
    topic = re.search(r"records? about (\w+)", task.query).group(1)
    lines = task.context.split("\n")
    writers = sorted({_user(r) for r in lines[1:] if _topic(r) == topic})
    kept = [r for r in lines if not (r.startswith("Date:") and _user(r) == writers[0] and _topic(r) == topic)]
    changed = dataclasses.replace(task, context="\n".join(kept))
    expected = [(a, b) for a in writers[1:] for b in writers[1:] if a < b]
    assert len(expected) < len(task.answer)
    for strategy in STRATEGIES["pairs"]:
        demo = run(tiny_policy, changed, strategy)
        assert demo.rollout.answer == str(expected), strategy
        assert str(writers[1]) not in demo.rollout.calls[0].turns[0]["reply"]


def test_a_sub_call_judges_each_record_of_its_prompt():
    """The teacher's plain sub-call reads the records from its prompt and judges their topics."""
    food, travel = AGGREGATE_TEXTS["food"], AGGREGATE_TEXTS["travel"]
    records = "\n".join([f"Date: 2024-03-01 || User: 11111 || Text: {food[0]}",
                         f"Date: 2024-03-09 || User: 22222 || Text: {travel[5]}",
                         f"Date: 2024-05-02 || User: 33333 || Text: {food[7]}",
                         f"Date: 2024-05-30 || User: 11111 || Text: {food[3]}"])

    def answer(kind, topic):
        prompt = teacher.PIECE_ASKS[kind].format(topic) + "\n" + records
        return teacher.reply([("user", prompt)], "halves", random.Random(0))

    assert answer("count", "food") == "3" and answer("count", "money") == "0"
    assert json.loads(answer("tally", "food, travel, sports")) == {"food": 3, "travel": 1}
    assert answer("users", "food") == "11111, 33333" and answer("users", "music") == "none"
    assert answer("months", "food").splitlines() == ["11111 2024-03", "33333 2024-05", "11111 2024-05"]


def test_the_truth_appears_in_a_reply_only_after_the_call_has_seen_it(tiny_policy):
    """What the teacher writes comes from what it was shown: a reply may hold the answer only if
    that call's prompt so far (its query, context preview, observations) holds it."""
    for family, strategy in CASES:
        task = make_task(family, 20_000, seed=21)
        demo = run(tiny_policy, task, strategy, seed=21)
        for call in demo.rollout.calls:
            for k, start in enumerate(call.prompt_lengths):
                end = call.prompt_lengths[k + 1] if k + 1 < len(call.prompt_lengths) else len(call.token_ids)
                seen = tiny_policy.decode(call.token_ids[:start])
                reply = tiny_policy.decode([t for t, m in zip(call.token_ids[start:end], call.sampled_mask[start:end])
                                            if m])
                if str(task.answer) in reply:
                    assert str(task.answer) in seen, (family, strategy, call.kind, reply)


def test_the_root_never_writes_the_answer_before_an_observation_shows_it(tiny_policy):
    task = make_task("niah", 20_000, seed=3)
    for strategy in STRATEGIES["niah"]:
        root = run(tiny_policy, task, strategy).rollout.calls[0]
        assert task.answer not in root.turns[0]["reply"], strategy


@pytest.mark.parametrize("family, strategy, turns", [("multihop", "look", 3), ("aggregate", "rlm_halves", 1),
                                                     ("pairs", "chunks_async", 1)])
def test_demonstrations_are_token_exact(tiny_policy, family, strategy, turns):
    """Each call's ids are the template's rendering of its conversation, built as previous ids +
    sampled ids + observation ids; the sampled ids are exactly the teacher's reply + end-of-turn."""
    demo = run(tiny_policy, make_task(family, 8000, seed=2), strategy)
    root = demo.rollout.calls[0]
    assert len(root.prompt_lengths) == turns  # multihop look: two looks, then FINAL
    eos = tiny_policy.eos_token_ids[0]
    for call in demo.rollout.calls:  # the root, child RLMs and plain sub-calls alike
        for k, start in enumerate(call.prompt_lengths):
            end = call.prompt_lengths[k + 1] if k + 1 < len(call.prompt_lengths) else len(call.token_ids)
            sampled = [t for t, m in zip(call.token_ids[start:end], call.sampled_mask[start:end]) if m]
            assert sampled == tiny_policy.encode(call.turns[k]["reply"]) + [eos]
            assert all(call.sampled_mask[start:start + len(sampled)])
            assert not any(call.sampled_mask[start + len(sampled):end])  # the observation is not sampled
            if k + 1 < len(call.prompt_lengths):
                follow = tiny_policy.followup_ids(call.turns[k]["observation"], ended_with_eos=True)
                assert call.token_ids[start + len(sampled):end] == follow
    # The whole conversation re-rendered by the chat template gives the same ids.
    text = tiny_policy.decode(root.token_ids, skip_special_tokens=False)
    system = text.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    conversation = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    for k, turn in enumerate(root.turns):
        conversation.append({"role": "assistant", "content": turn["reply"]})
        if turn["observation"] is not None and k + 1 < len(root.turns):   # the last one is kept, never fed
            conversation.append({"role": "user", "content": turn["observation"]})
    rendered = tiny_policy.tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tiny_policy.encode(rendered.rstrip("\n")) == root.token_ids


def test_children_search_their_part_the_cheapest_way(tiny_policy):
    demo = run(tiny_policy, make_task("niah", 8000, seed=4), "split_async")
    children = [c for c in demo.rollout.calls if c.kind == "rlm_query"]
    assert len(children) == 2 and sorted(c.answer == "not found" for c in children) == [False, True]
    assert all(len(c.turns) == 1 and "context.splitlines()" in c.turns[0]["reply"] for c in children)
    # The two halves ran concurrently: their intervals on the logical clock overlap.
    (a, b) = demo.rollout.calls[0].turns[0]["sub_calls"]
    assert a["start"] < b["end"] and b["start"] < a["end"]


def test_the_cheaper_correct_strategy_is_rewarded_more(tiny_policy):
    """Under the default reward, correct strategies are ordered by what they cost."""
    task = make_task("niah", 8000, seed=9)
    rewards = {s: compute_reward(1.0, run(tiny_policy, task, s).rollout.cost, RewardConfig())["reward"]
               for s in STRATEGIES["niah"]}
    # Reading needs no sub-call: one cell of code (regex) or a printed line copied (look) cost less
    # than child RLMs; a printed line copied costs less than a window handed to a sub-call too (regex,
    # whose code also finds the key, costs about what window does: within 0.001 of a reward of 1).
    assert min(rewards["regex"], rewards["look"]) > max(rewards[s] for s in ("split_async", "split_sync"))
    assert rewards["look"] > rewards["window"] and abs(rewards["regex"] - rewards["window"]) < 1e-3
    assert rewards["split_async"] > rewards["split_sync"]  # same tokens, shorter critical path
    task = make_task("multihop", 8000, seed=9)
    rewards = {s: compute_reward(1.0, run(tiny_policy, task, s).rollout.cost, RewardConfig())["reward"]
               for s in STRATEGIES["multihop"]}
    # Reading the lines costs least; one search per hop in code costs about what one sub-call per hop does.
    assert rewards["look"] > rewards["llm_chain"] > rewards["rlm_chain"] and rewards["regex"] > rewards["rlm_chain"]
    # Records: child RLMs cost the most, and the same four chunks are quicker at once than in turn.
    # Two halves save prompt tokens over four chunks; counts are short replies, so for aggregate
    # that wins, while in pairs a half's longer list of users waits on the critical path.
    for family in ("aggregate", "pairs"):
        task = make_task(family, 8000, seed=9)
        rewards = {s: compute_reward(1.0, run(tiny_policy, task, s).rollout.cost, RewardConfig())["reward"]
                   for s in STRATEGIES[family]}
        assert rewards["rlm_halves"] == min(rewards.values()), family
        assert rewards["chunks_async"] > rewards["chunks_sync"], family
        assert (rewards["halves"] > rewards["chunks_async"]) == (family == "aggregate"), family


def test_make_demonstrations_is_balanced_and_only_keeps_correct_ones(tiny_policy):
    demos = make_demonstrations(tiny_policy, sorted({f for f, _ in CASES}), [2000, 8000], per_strategy=2, seed=1,
                                rlm_settings=SETTINGS)
    counts = {}
    for d in demos:
        counts[(d.family, d.strategy)] = counts.get((d.family, d.strategy), 0) + 1
    assert counts == {case: 2 for case in CASES}
    assert all(d.correctness == 1.0 for d in demos)


def test_a_budget_too_small_for_a_strategy_is_reported(tiny_policy):
    with pytest.raises(RuntimeError, match="raise the rollout budgets"):
        make_demonstrations(tiny_policy, ["niah"], [2000], per_strategy=1,
                            rlm_settings=dict(max_new_tokens=8, max_generated_tokens=64))


def test_teacher_policy_respects_max_new_tokens(tiny_policy):
    teacher = TeacherPolicy(tiny_policy, "regex")
    task = make_task("niah", 2000, seed=0)
    prompt = teacher.chat_ids([{"role": "system", "content": system_prompt(True, True)},
                               {"role": "user", "content": f"Query: {task.query}\n\nThe context is ..."}])
    [full] = teacher.sample([prompt], max_new_tokens=500)
    [cut] = teacher.sample([prompt], max_new_tokens=5)
    assert full.finish_reason == "stop" and cut.finish_reason == "length"
    assert cut.token_ids == full.token_ids[:5]


def test_after_a_failed_cell_the_teacher_reads_instead_and_never_resubmits(tiny_policy):
    """The guess strategy's classic-frame regex fails on another frame; the next cell differs (it
    prints the key's lines) and the answer is read from what it printed."""
    from eval import error_profile
    recovered = 0
    for seed in range(6):
        task = make_task("niah", 8000, seed=100 + seed)
        demo = run(tiny_policy, task, "guess", seed)
        assert demo.correctness == 1.0
        profile = error_profile(demo.rollout)
        assert profile["errors_changed"] == profile["errors_followed"]
        if profile["errors"]:
            recovered += 1
            turns = demo.rollout.calls[0].turns
            assert "Error" in turns[0]["observation"] and turns[1]["code"] != turns[0]["code"]
    assert recovered >= 3   # 7 of 8 seen frames are not the classic one


def test_after_its_one_cell_failed_the_regex_teacher_reads_instead_of_resubmitting():
    """regex is one cell; if that cell raised (say a key written otherwise than in the context),
    the next reply is different code, the key's lines printed, and the turn after that answers
    from what they showed."""
    task = make_task("niah", 8000, seed=7)
    key = re.search(teacher.NIAH_QUERY, task.query)
    key = teacher.first_group(key)
    start = [("system", system_prompt(True, True)), ("user", f"Query: {task.query}\n\nThe context is ...")]
    first = teacher.reply(start, "regex", random.Random(0))
    failed = start + [("assistant", first), ("user", "ValueError: max() arg is an empty sequence")]
    second = teacher.reply(failed, "regex", random.Random(0))
    assert "FINAL" not in second and second != first and f"{key!r} in" in second
    line = next(ln for ln in task.context.splitlines() if key in ln)
    answered = teacher.reply(failed + [("assistant", second), ("user", line)], "regex", random.Random(0))
    assert task.answer in answered and "FINAL" in answered


def _run_cell(code, query, context):
    """FINAL's value of one teacher cell run in the real REPL, with `query` set as an RLM sets it."""
    from repl import REPL

    async def go():
        async with REPL(context, handler=None, timeout=60.0, setup=f"import re\nquery = {query!r}") as repl:
            observation = await repl.execute(code)
            return repl.answer, observation
    return asyncio.run(go())


@pytest.mark.parametrize("asked", [
    "Tell me where the courier of the contact of {agent}'s handler has a safehouse.",   # outside in
    "{agent}'s handler's contact's courier: which city is their safehouse in?",          # inside out
])
def test_the_multihop_program_reads_the_chain_from_the_question(tiny_policy, asked):
    """The regex program copies no name or relation from the question: it reads them from `query`
    in code, so the same cell answers a question in a phrasing that no template has, the hops named
    in either order."""
    task = make_task("multihop", 30_000, seed=21, hops=4)
    agent = re.search(teacher.AGENT, task.query)[0]
    start = [("system", system_prompt(True, True)), ("user", f"Query: {task.query}\n\nThe context is ...")]
    cell = re.search(r"```repl\n(.*?)```", teacher.reply(start, "regex", random.Random(3)), re.S).group(1)
    assert agent not in cell and "courier" not in cell
    answer, observation = _run_cell(cell, asked.format(agent=agent), task.context)
    assert answer == task.answer, observation


def test_after_its_one_cell_failed_the_multihop_regex_teacher_tries_another_way():
    """If the chain program raised (a relation worded otherwise in the context), the next cell is
    different: the chain followed again with the names copied from the question, which fits in the
    one turn left under the CPU budgets."""
    task = make_task("multihop", 8000, seed=7)
    agent = re.search(teacher.AGENT, task.query)[0]
    start = [("system", system_prompt(True, True)), ("user", f"Query: {task.query}\n\nThe context is ...")]
    first = teacher.reply(start, "regex", random.Random(0))
    failed = start + [("assistant", first), ("user", "StopIteration")]
    second = teacher.reply(failed, "regex", random.Random(0))
    assert second != first and f"name = {agent!r}" in second and agent not in first
    answer, observation = _run_cell(re.search(r"```repl\n(.*?)```", second, re.S).group(1), task.query, task.context)
    assert answer == task.answer, observation


@pytest.mark.parametrize("family, seed", [("multihop", s) for s in range(6)] + [("source", s) for s in range(6)])
def test_a_slip_demonstration_teaches_the_recovery_and_not_the_slip(tiny_policy, family, seed):
    """slip opens with the program and one mistake in it, certain to raise; every later cell is
    different and the rollout answers right (multihop in one more cell; source prints the def line,
    then answers from it). The slipped reply stays in the trace as context, but no token of it is
    marked sampled, so training (grpo.build_rows) learns only the recovery."""
    task = make_task(family, 8000, seed=40 + seed)
    demo = run(tiny_policy, task, "slip", seed)
    root = demo.rollout.calls[0]
    assert demo.correctness == 1.0 and len(root.turns) == {"multihop": 2, "source": 3}[family]
    assert teacher.failed(root.turns[0]["observation"])
    assert not any(_same_code(root.turns[0], later) for later in root.turns[1:])
    learned = tiny_policy.decode([t for t, m in zip(root.token_ids, root.sampled_mask) if m])
    assert root.turns[1]["code"][0].strip() in learned and "plan:" not in learned
    slip_first_line = next(line for line in root.turns[0]["code"][0].splitlines() if not line.startswith("#"))
    assert slip_first_line not in learned  # the slipped program's opening, taught by no later turn


@pytest.mark.parametrize("question, asked", [
    ("first_param", "Whatever `{name}` is for, which identifier heads its parameter list?"),
    ("default", "Suppose {param} is left out of a call to {name}. Its value, as the source spells it?"),
])
def test_the_source_program_reads_the_function_from_the_question(tiny_policy, question, asked):
    """parse copies no function or parameter name from the question: its cell reads them from
    `query`, so it answers a phrasing that no template has."""
    task = make_task("source", 30_000, seed=5, question=question)
    kind, name, param = teacher.parse_source_query(task.query)
    start = [("system", system_prompt(True, True)), ("user", f"Query: {task.query}\n\nThe context is ...")]
    cell = re.search(r"```repl\n(.*?)```", teacher.reply(start, "parse", random.Random(2)), re.S).group(1)
    assert name not in cell and (param is None or param not in cell)
    answer, observation = _run_cell(cell, asked.format(name=name, param=param), task.context)
    assert answer == str(task.answer), observation


def test_after_its_one_cell_failed_the_source_parse_teacher_looks_instead():
    task = make_task("source", 8000, seed=7)
    _, name, _ = teacher.parse_source_query(task.query)
    start = [("system", system_prompt(True, True)), ("user", f"Query: {task.query}\n\nThe context is ...")]
    first = teacher.reply(start, "parse", random.Random(0))
    failed = start + [("assistant", first), ("user", "StopIteration")]
    second = teacher.reply(failed, "parse", random.Random(0))
    assert "FINAL" not in second and second != first and f"def {name}(" in second
