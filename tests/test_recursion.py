"""The recursion experiment's pieces: rlm.py's per-call limits, the tally family, the teacher's
tally strategies and habit mix, RL rows by kind of call, and recurse.py's report figures."""

import asyncio
import math

import pytest

import recurse
from eval import strategy_profile
from grpo import build_rows
from rlm import RLM, Batcher, system_prompt
from scripted import ScriptedPolicy, ScriptedSample, parse, repl_block
from tasks import AGGREGATE_LABELS, TOPIC_OF, cheap_answers, make_task, score, task_seed
from teacher import (HABITS, STRATEGIES, TALLY_ASK, demonstrate, habit_counts, label_drills as make_drills,
                     make_demonstrations, read_answer)

LIMITS = dict(max_call_sub_calls=4, max_prompt_chars=800)
SETTINGS = dict(recurse.ROLLOUTS)  # the experiment's rollouts: limits, 24 sub-calls, 4,096 tokens


def run(policy, query="q", context="abcdefghij" * 10, **settings):
    return asyncio.run(RLM(Batcher(policy, gather_window=0.005), **settings).run(query, context))


# --- rlm.py: per-call limits

def test_a_call_may_start_at_most_max_call_sub_calls_and_hears_why_when_refused():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "ok"
        if p["turn"] == 0:
            return repl_block("got = []\nfor i in range(6):\n    got.append(llm_query(f'piece {i}'))\nprint(got)")
        return "FINAL(done)"

    rollout = run(ScriptedPolicy(script), max_call_sub_calls=4, max_sub_calls=20, max_generated_tokens=4000)
    observation = rollout.calls[0].turns[0]["observation"]
    assert rollout.cost.sub_calls["llm_query"] == 4  # the fifth was refused before anything was spent
    assert "SubCallRefused" in observation or "the most one call may start" in observation
    assert "rlm_query" in observation  # the message says what to do instead


def test_limits_hold_per_call_so_children_cover_more_than_one_level():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "x"
        if p["query"] == "root":
            return repl_block("FINAL(''.join(rlm_query('child', context) for _ in range(3)))")
        return repl_block("FINAL(''.join(llm_query('p') for _ in range(3)))")

    rollout = run(ScriptedPolicy(script), query="root", max_call_sub_calls=3, max_sub_calls=20,
                  max_generated_tokens=4000, max_child_sub_calls=5)
    assert rollout.answer == "x" * 9 and rollout.cost.sub_calls == {"llm_query": 9, "rlm_query": 3}


def test_a_prompt_longer_than_max_prompt_chars_is_refused_and_a_child_rlm_may_take_the_text():
    def script(text):
        p = parse(text)
        if p["kind"] == "llm":
            return "read"
        if p["query"] == "child":
            return repl_block("FINAL(str(len(context)))")
        if p["turn"] == 0:
            return repl_block("print(llm_query('q ' + context))")
        return repl_block("FINAL(rlm_query('child', context))")

    rollout = run(ScriptedPolicy(script), context="y" * 900, max_prompt_chars=800)
    assert "902 characters, more than the 800" in rollout.calls[0].turns[0]["observation"]
    assert rollout.cost.sub_calls["llm_query"] == 0 and rollout.answer == "900"


def test_the_system_prompt_states_limits_only_when_a_run_sets_them():
    assert "Limits" not in system_prompt(True, True)
    stated = system_prompt(True, True, 4, 800)
    assert "at most 4 sub-calls" in stated and "at most 800 characters" in stated


# --- tasks.py: tally

@pytest.mark.parametrize("length", [1200, 3000, 6000, 50_000])
def test_a_tally_count_is_the_notes_of_the_topic_and_the_context_fits_its_length(length):
    for i in range(5):
        task = make_task("tally", length, task_seed("eval", "tally", length, i))
        label = next(lab for lab in AGGREGATE_LABELS if f"about {lab}" in task.query or f"notes about {lab}" in task.query)
        notes = task.context.splitlines()[1:]
        assert task.answer == sum(TOPIC_OF[n] == label for n in notes)
        assert length - 130 < len(task.context) <= length
        assert not any(lab in n.lower().split() for n in notes for lab in AGGREGATE_LABELS)  # judged from meaning


def test_cheap_answers_earn_little_on_tally():
    """An even share, every count at once, the whole context: floors the experiment reports. The
    first count (0) is a constant guess; counts spread over [0, 0.6 of the notes] keep it rare."""
    for length in (1200, 3000, 6000):
        tasks = [make_task("tally", length, task_seed("eval", "tally", length, i)) for i in range(100)]
        for name in cheap_answers(tasks[0]):
            earned = sum(score(t, cheap_answers(t)[name]) for t in tasks) / len(tasks)
            assert earned <= 0.2, (length, name, earned)


def test_tally_refuses_a_held_out_wording_for_training_seeds():
    with pytest.raises(ValueError, match="evaluation only"):
        make_task("tally", 1200, task_seed("train", "tally", 1200, 0), wording="held_out")
    held = make_task("tally", 1200, task_seed("eval", "tally", 1200, 0), wording="held_out")
    assert "How many notes" not in held.query and "Count the notes" not in held.query


# --- teacher.py: tally strategies and the habit mix

@pytest.mark.parametrize("strategy", STRATEGIES["tally"])
def test_tally_strategies_solve_every_length_under_the_limits(tiny_policy, strategy):
    for length, deep in ((1200, False), (3000, True), (6000, True)):
        for seed in (1, 2):
            task = make_task("tally", length, task_seed("demo", "tally", length, seed))
            demo = asyncio.run(demonstrate(tiny_policy, task, strategy, SETTINGS, seed))
            assert demo.correctness == 1.0, (strategy, length, demo.rollout.answer, task.answer)
            cost = demo.rollout.cost
            assert (cost.depth == 2) == deep and (cost.sub_calls["rlm_query"] > 0) == deep
            profile = strategy_profile(demo.rollout)
            # sync: each sub-call waits for the one before; async: all of a turn's run together
            # (a turn with a single sub-call has nothing to run beside)
            together = sum(len(t["sub_calls"]) for c in demo.rollout.calls for t in c.turns if len(t["sub_calls"]) > 1)
            assert profile["concurrent"] == (0 if strategy == "sync" else together) and together > 0


def test_async_tally_has_a_shorter_critical_path_at_the_longest_length(tiny_policy):
    task = make_task("tally", 6000, task_seed("demo", "tally", 6000, 3))
    paths = {s: asyncio.run(demonstrate(tiny_policy, task, s, SETTINGS, 3)).rollout.cost.critical_path_tokens
             for s in STRATEGIES["tally"]}
    assert paths["async"] < 0.6 * paths["sync"], paths  # the experiment's target is 40% shorter
    # the latency penalty grows over the habit's whole range: its longest path is not clipped, and not far below
    assert paths["sync"] <= recurse.BUDGETS["latency_budget"] <= 1.25 * paths["sync"], paths


def test_the_sub_model_labels_each_note_of_its_prompt():
    notes = [AGGREGATE_TEXTS_FIRST[label] for label in ("food", "money", "food")]
    assert read_answer(TALLY_ASK + "\n".join(notes)).split() == ["food", "money", "food"]


AGGREGATE_TEXTS_FIRST = {label: next(t for t, lab in TOPIC_OF.items() if lab == label) for label in AGGREGATE_LABELS}


def test_habit_counts_make_the_efficient_strategies_a_fifth(tiny_policy):
    counts = habit_counts(list(HABITS), 10)
    for family, (habit, efficient) in HABITS.items():
        assert counts[(family, habit)] == 8 and counts[(family, efficient)] == 2
    assert set(habit_counts(["tally"], 0).values()) == {0}  # no demonstrations asked, none made
    demos = make_demonstrations(tiny_policy, ["tally"], [1200], per_strategy=99, seed=4, rlm_settings=SETTINGS,
                                counts=habit_counts(["tally"], 5))
    assert sorted(d.strategy for d in demos) == ["async"] + ["sync"] * 4
    assert all(d.correctness == 1.0 for d in demos)


# --- grpo.py: which calls become rows

def test_train_calls_keeps_rows_of_the_chosen_kinds_only(tiny_policy):
    task = make_task("tally", 3000, task_seed("demo", "tally", 3000, 5))
    rollout = asyncio.run(demonstrate(tiny_policy, task, "sync", SETTINGS, 5)).rollout
    kinds = lambda calls: sorted({row.kind for row in build_rows([rollout], [1.0], calls=calls)})  # noqa: E731
    assert kinds("all") == ["llm_query", "rlm_query", "root"]
    assert kinds("rlm") == ["rlm_query", "root"] and kinds("root") == ["root"]
    with pytest.raises(ValueError, match="calls must be one of"):
        build_rows([rollout], [1.0], calls="children")


# --- recurse.py: the report's figures

def record(correct, sub_calls, concurrent, depth, critical, family="tally", length=1200):
    return {"correctness": float(correct), "sub_calls": sub_calls, "concurrent": concurrent, "depth": depth,
            "critical_path": critical, "prompt_tokens": 400, "generated_tokens": 100, "family": family,
            "length": length}


def test_a_cell_pools_shares_over_sub_calls_and_gives_intervals_that_hold_the_estimate():
    records = [record(1, 4, 4, 2, 200), record(0, 2, 0, 1, 300), record(1, 0, 0, 0, 100)]
    c = recurse.cell(records)
    assert c["n"] == 3 and c["accuracy"] == pytest.approx(2 / 3)
    assert c["concurrent"] == pytest.approx(4 / 6) and c["second_level"] == pytest.approx(1 / 3)
    assert c["sub_calls"] == pytest.approx(2.0) and c["critical_path"] == pytest.approx(200.0)
    assert c["weighted_tokens"] == pytest.approx(0.25 * 400 + 100)
    for key in ("accuracy", "concurrent", "sub_calls", "critical_path"):
        low, high = c[key + "_ci"]
        assert low <= c[key] <= high, key
    same = recurse.cell([record(1, 4, 0, 2, 200)] * 5)
    assert same["critical_path_ci"] == (200, 200)  # no spread, no interval
    # none of 20 sub-calls concurrent: not a certainty, Wilson's interval over the sub-calls
    assert same["concurrent"] == 0 and same["concurrent_ci"][0] == 0 and 0.1 < same["concurrent_ci"][1] < 0.2
    assert math.isnan(recurse.mean([]))


def test_sub_model_accuracy_counts_notes_labelled_right():
    notes = [AGGREGATE_TEXTS_FIRST["food"], AGGREGATE_TEXTS_FIRST["travel"]]
    trace = {"calls": [{"kind": "root", "query": "q", "answer": "1"},
                       {"kind": "llm_query", "query": TALLY_ASK + "\n".join(notes), "answer": "food\nsports"}]}
    assert recurse.sub_model_accuracy([{"trace": trace}, {"trace": None}]) == (1, 2)


def test_label_drills_are_token_exact_one_call_demonstrations_of_the_right_labels(tiny_policy):
    drills = make_drills(tiny_policy, 6, seed=2)
    again = make_drills(tiny_policy, 6, seed=2)  # a function of the seed alone
    assert [d.rollout.calls[0].token_ids for d in drills] == [d.rollout.calls[0].token_ids for d in again]
    for d in drills:
        (call,) = d.rollout.calls
        assert call.kind == "llm_query" and call.query.startswith(TALLY_ASK)
        notes = call.query[len(TALLY_ASK):].splitlines()
        assert 1 <= len(notes) <= 6 and call.answer.split() == [TOPIC_OF[n] for n in notes]
        prompt = [t for t, m in zip(call.token_ids, call.sampled_mask) if not m]
        assert prompt == tiny_policy.chat_ids([{"role": "user", "content": call.query}])  # the template's own ids
        assert sum(call.sampled_mask) == d.rollout.cost.generated_tokens and call.sampled_mask[-1] == 1
    assert len(build_rows([d.rollout for d in drills], [1.0] * 6)) == 6


def test_root_drills_are_the_teachers_root_calls_alone_on_both_sides_of_one_level(tiny_policy):
    from teacher import TALLY_ONE_LEVEL, root_drills

    drills = root_drills(tiny_policy, 10, 6000, seed=3, rlm_settings=SETTINGS)
    assert [d.strategy for d in drills] == ["sync"] * 4 + ["async"] + ["sync"] * 4 + ["async"]  # the habit mix
    assert [d.length <= TALLY_ONE_LEVEL for d in drills] == [True, False] * 5
    for d in drills:
        (call,) = d.rollout.calls
        assert call.kind == "root" and d.correctness == 1.0 and sum(call.sampled_mask) > 0
        reply = tiny_policy.decode([t for t, m in zip(call.token_ids, call.sampled_mask) if m])
        # one program at every size: the code reads how many notes there are and chooses the depth
        assert "if len(notes) <= 24:" in reply and "rlm_query" in reply
        notes = make_task("tally", d.length, d.seed).context.splitlines()[1:]
        assert (call.cost.depth == 2) == (len(notes) > 24)
        assert (("llm_query_batched" in reply or "gather" in reply) == (d.strategy == "async"))
    again = root_drills(tiny_policy, 10, 6000, seed=3, rlm_settings=SETTINGS)  # a function of the seed alone
    assert [d.rollout.calls[0].token_ids for d in drills] == [d.rollout.calls[0].token_ids for d in again]
    assert len(build_rows([d.rollout for d in drills], [1.0] * 10)) == 10


def test_every_run_of_the_experiment_passes_train_py_checks():
    """recurse.py runs train.py with these flags: each set must parse and pass check_config as given
    (a bool as --name/--no-name), and the arms differ in the reward's weights alone."""
    import config
    import train

    for name, preset in recurse.PRESETS.items():
        runs = recurse.run_flags(preset)
        assert list(runs)[:5] == ["warm-demos", "warm-drills", "warm-mix", "warm-labels", "warm"]
        assert len(runs) == 5 + len(recurse.ARMS) * len(preset["seeds"])
        for flags in runs.values():
            config.check_config(train.parse_config(recurse.as_flags(flags)))
        seed = preset["seeds"][0]
        cost, accuracy = runs[f"cost-s{seed}"], runs[f"accuracy-s{seed}"]
        assert {k for k in cost if cost[k] != accuracy[k]} == {"cost_weight", "latency_weight"}
        assert cost["warm_demos"] == 0 and "no-curriculum" in " ".join(recurse.as_flags(cost))


# --- recurse.py: the policy's odds at tally's choice of plan

def test_plan_prompts_hold_the_teachers_two_replies_which_differ_in_the_asking_lines_alone(tiny_policy):
    rows = recurse.plan_prompts(tiny_policy, 2, (1200, 6000))
    assert [(level, length) for level, length, *_ in rows] == [("root", 1200)] * 2 + [("root", 6000), ("child", 6000)] * 2
    for level, length, prompt, sync, concurrent in rows:
        a, b = tiny_policy.decode(sync).splitlines(), tiny_policy.decode(concurrent).splitlines()
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        # the one program of every size and level: labelled pieces, or parts for child RLMs
        assert len(a) == len(b) and len(changed) == 2, (level, length)
        assert all("replies" in x and ("batched" in y or "gather" in y) for x, y in changed)
        assert "llm_query(" in changed[0][0] and "rlm_query(" in changed[1][0]


def test_plan_preference_is_the_tempered_odds_of_the_two_replies(tiny_policy):
    """Checked against a plain forward pass of each reply alone (no padding, no batch). Float32 logits of
    the two paths differ by rounding (about 1e-5 a token here); the sums over about 110 reply tokens
    then differ by well under 1e-2, and the share, a logistic of their difference (slope <= 1/4), by
    under 5e-3."""
    import torch

    rows = recurse.plan_prompts(tiny_policy, 1, (3000,))
    shares = recurse.plan_preference(tiny_policy, rows, temperature=0.7)
    model = tiny_policy.model
    for (level, length, prompt, *replies), (level2, length2, *got) in zip(rows, shares):
        assert (level, length) == (level2, length2)
        sums = []
        for reply in replies:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + reply])).logits[0].float() / 0.7
            logp = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(reply)[:, None])
            sums.append(logp.sum().item())
        assert got[0] == pytest.approx(1 / (1 + math.exp(sums[0] - sums[1])), abs=5e-3)
        assert 0 < got[0] < 1


class FixedReplyOdds:
    """A stand-in policy whose every reply token has a set log-prob: each reply's probability is then
    known exactly (a reply of k tokens at log-prob l has probability exp(k l))."""

    def __init__(self, per_token):
        self.per_token = per_token  # [log-prob of a sync reply's tokens, of a concurrent reply's]

    def logprobs(self, ids_BT, attention_BT, loss_BT, temperature):
        import torch

        return loss_BT.float() * torch.tensor(self.per_token)[:, None]


def test_plan_preference_gives_the_mass_the_policy_puts_on_the_two_programs():
    """The odds alone cannot tell a policy that writes neither program from one that writes them: the
    mass can. Sync reply 0.6 (2 tokens of log 0.6^0.5), concurrent 0.2: share 0.25, mass 0.8."""
    rows = [("root", 3000, [1, 2, 3], [7, 8], [7, 9])]
    [(level, length, share, mass)] = recurse.plan_preference(
        FixedReplyOdds([math.log(0.6) / 2, math.log(0.2) / 2]), rows, temperature=0.7)
    assert (level, length) == ("root", 3000)
    assert share == pytest.approx(0.25, rel=1e-6) and mass == pytest.approx(0.8, rel=1e-6)
    # a policy that puts almost nothing on either has the same odds and next to no mass
    [(_, _, share, mass)] = recurse.plan_preference(
        FixedReplyOdds([math.log(0.6e-6) / 2, math.log(0.2e-6) / 2]), rows, temperature=0.7)
    assert share == pytest.approx(0.25, rel=1e-6) and mass == pytest.approx(0.8e-6, rel=1e-6)


# --- recurse.py: the sub-model's own skill, on held-out pieces

def test_label_pieces_are_held_out_pieces_of_six_notes_with_their_true_topics():
    pieces = recurse.label_pieces(12)
    assert len(pieces) == 12 and len({prompt for prompt, _, _ in pieces}) == 12
    for prompt, label, topics in pieces:
        notes = prompt[len(TALLY_ASK):].splitlines()
        assert prompt.startswith(TALLY_ASK) and len(notes) == len(topics) == 6
        assert label in AGGREGATE_LABELS and topics == [TOPIC_OF[n] for n in notes]
        assert read_answer(prompt).split() == topics  # the teacher's reply to it is right


class ReplyByRule:
    """A stand-in sub-model: its reply to a prompt is rule(prompt, its index among the prompts)."""

    def __init__(self, rule):
        self.rule, self.prompts = rule, []

    def chat_ids(self, messages):
        self.prompts.append(messages[-1]["content"])
        return [len(self.prompts) - 1]

    def sample(self, prompts, max_new_tokens, temperature, seeds):
        assert len(set(seeds)) == len(prompts)  # each piece its own seed
        return [ScriptedSample(p, [], "stop") for p in prompts]

    def decode(self, ids):
        return self.rule(self.prompts[ids[0]], ids[0])


def test_label_skill_counts_notes_in_place_and_pieces_by_the_count_the_code_adds_up():
    pieces = recurse.label_pieces(10)
    right = recurse.label_skill(ReplyByRule(lambda prompt, i: read_answer(prompt)), pieces, 0.7)
    assert right == {"notes": 60, "notes_right": 60, "pieces": 10, "pieces_right": 10}
    # the right labels in reverse order: few notes in place, every piece's count still right
    backwards = ReplyByRule(lambda prompt, i: "\n".join(read_answer(prompt).split()[::-1]))
    reverse = recurse.label_skill(backwards, pieces, 0.7)
    assert reverse["pieces_right"] == 10
    assert reverse["notes_right"] == sum(t[j] == t[5 - j] for _, _, t in pieces for j in range(6)) < 60
    # no label at all: a piece is right only when the task's label is not among its notes
    none = recurse.label_skill(ReplyByRule(lambda prompt, i: "none"), pieces, 0.7)
    assert none["notes_right"] == 0
    assert none["pieces_right"] == sum(label not in topics for _, label, topics in pieces)


@pytest.mark.parametrize("strategy", STRATEGIES["tally"])
def test_teacher_py_prints_a_solved_tally_demonstration_under_the_experiments_rollouts(strategy, capsys):
    import teacher

    teacher.main(["--family", "tally", "--strategy", strategy, "--length", "6000"])
    out = capsys.readouterr().out
    assert "correctness: 1.0" in out and "depth=2" in out


def test_the_report_reads_plan_files_with_and_without_the_mass_and_label_skill(tmp_path):
    """Files measured before the mass and label skill were added hold (level, length, share): the
    report still reads them, and shows the new figures where they were measured."""
    import json

    (tmp_path / "eval").mkdir()
    old = {"temperature": 0.7, "shares": [["root", 3000, 0.02], ["root", 3000, 0.04]]}
    new = {"temperature": 0.7, "shares": [["root", 3000, 0.5, 0.9], ["root", 3000, 0.7, 0.7]],
           "labels": {"notes": 60, "notes_right": 54, "pieces": 10, "pieces_right": 7}}
    (tmp_path / "eval" / "warm-plans.json").write_text(json.dumps(old))
    (tmp_path / "eval" / "cost-s0-plans.json").write_text(json.dumps(new))
    recurse.report(str(tmp_path), recurse.PRESETS["short"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["plans/warm/root/3000"]["share"] == pytest.approx(0.03)
    assert "mass" not in results["plans/warm/root/3000"]
    assert results["plans/cost/root/3000"]["share"] == pytest.approx(0.6)
    assert results["plans/cost/root/3000"]["mass"] == pytest.approx(0.8)
    assert results["labels/cost"]["pieces_right"] == 7 and "labels/warm" not in results
    text = (tmp_path / "results.md").read_text()
    assert "7/10 pieces" in text and "54/60 notes" in text
    assert (tmp_path / "steps.png").exists()
