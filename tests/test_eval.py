"""eval.py end to end: a scripted policy that really solves needle tasks, and a tiny model."""

import asyncio
import json
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval as evaluation
import tasks
from repl import REPL
from reward import RewardConfig
from rlm import Batcher
from scripted import NEEDLE_SOLVER, ScriptedPolicy, parse, repl_block
from trace import Call, Cost, Rollout

ROOT = Path(__file__).resolve().parents[1]   # eval.py runs from here, whatever the working directory

SOLVER = NEEDLE_SOLVER


def needle_solver(text):
    """RLM calls search the context with code; a direct prompt gets a confident wrong guess."""
    return SOLVER if parse(text)["kind"] == "rlm" else "1234567"


def test_evaluate_scores_what_the_model_produced_for_every_method_and_length():
    suite = evaluation.held_out_suite(["niah"], [2000, 6000], n=2)
    policy = ScriptedPolicy(needle_solver)
    settings = {"max_new_tokens": 512}  # the solver's code is longer than the CPU default reply
    records = asyncio.run(evaluation.evaluate(Batcher(policy), suite, list(evaluation.METHODS), settings,
                                              progress=False))
    assert len(records) == 2 * 2 * len(evaluation.METHODS)
    for r in records:
        if r["method"] == "direct":
            assert r["answer"] == "1234567" and r["correctness"] == 0.0
        else:
            assert r["answer"] == str(r["truth"]) and r["correctness"] == 1.0
        assert r["reward"] < r["correctness"]  # every method pays for its tokens
    rows = evaluation.summarize(records)
    assert [(r["method"], r["length"]) for r in rows] == [(m, n) for m in evaluation.METHODS for n in (2000, 6000)]
    table = evaluation.format_table(rows)
    assert "rlm-depth1" in table and "direct" in table


def test_direct_says_when_the_context_was_cut():
    policy = ScriptedPolicy(lambda text: "x")
    small = asyncio.run(evaluation.direct_answer(Batcher(policy), "q?", "short context", context_window=2048))
    big = asyncio.run(evaluation.direct_answer(Batcher(policy), "q?", "word " * 5000, context_window=2048))
    assert not small.cut and big.cut
    assert len(policy.prompts[-1]) <= 2048 - 128  # the cut prompt fits the window with room to answer
    assert "Question: q?" in policy.decode(policy.prompts[-1])  # the question survives the cut


def test_no_answer_scores_zero_and_is_never_filled_in():
    suite = evaluation.held_out_suite(["niah"], [2000], n=1, start=3)
    policy = ScriptedPolicy(lambda text: repl_block("print('thinking')"))
    [record] = asyncio.run(evaluation.evaluate(Batcher(policy), suite, ["rlm"], {"max_turns": 1}, progress=False))
    assert record["answer"] is None and record["correctness"] == 0.0


def test_eval_script_runs_on_a_tiny_model(tmp_path, tiny_policy):
    model_dir = tmp_path / "model"
    tiny_policy.model.get_base_model().save_pretrained(model_dir)
    tiny_policy.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "--model", str(model_dir), "--tasks", "niah", "--lengths", "2000", "--n", "1",
         "--max-turns", "1", "--max-new-tokens", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^rlm-sync\s+rlm-sync\s+niah\s+seen\s+2,000\s+1\s", result.stdout, re.MULTILINE)
    assert "changed" in result.stdout and "degen" in result.stdout   # the table of mistakes is printed too
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["summary"]} == set(evaluation.METHODS)


def test_wilson_interval_matches_known_values_and_holds_its_rate():
    lo, hi = evaluation.wilson(15, 20)              # textbook value: 0.531-0.888
    assert abs(lo - 0.5313) < 1e-3 and abs(hi - 0.8881) < 1e-3
    assert evaluation.wilson(0, 10)[0] == 0.0 and evaluation.wilson(10, 10)[1] == 1.0
    assert evaluation.wilson(0, 0) == (0.0, 1.0)    # no data: no information
    for k, n in ((0, 5), (3, 7), (20, 20), (41, 100)):
        lo, hi = evaluation.wilson(k, n)
        assert lo <= k / n <= hi


def test_fisher_exact_matches_known_values():
    assert abs(evaluation.fisher_exact(8, 20, 15, 20) - 0.0537) < 1e-3   # 8/20 vs 15/20
    assert abs(evaluation.fisher_exact(1, 10, 9, 10) - 0.0011) < 1e-3
    assert evaluation.fisher_exact(5, 10, 5, 10) == 1.0


def test_every_row_carries_n_and_a_95_percent_interval():
    suite = evaluation.held_out_suite(["niah"], [2000], n=3)
    records = asyncio.run(evaluation.evaluate(Batcher(ScriptedPolicy(needle_solver)), suite, ["rlm", "direct"],
                                              {"max_new_tokens": 512}, progress=False))
    rows = {r["method"]: r for r in evaluation.summarize(records)}
    assert rows["rlm"]["n"] == 3 and rows["rlm"]["solved"] == 3 and rows["rlm"]["accuracy_ci"] == evaluation.wilson(3, 3)
    assert rows["direct"]["accuracy_ci"] == evaluation.wilson(0, 3)
    assert "0.44-1.00" in evaluation.format_table(list(rows.values()))   # Wilson(3, 3) = 0.438-1


def test_the_floor_of_cheap_answers_is_printed_and_near_zero():
    suite = evaluation.held_out_suite(["niah", "multihop", "aggregate"], [8000], n=20)
    rows = evaluation.floor_rows(suite)
    assert [(r["family"], r["n"]) for r in rows] == [("aggregate", 20), ("multihop", 20), ("niah", 20)]
    for r in rows:
        # The best constant is an oracle, picked knowing the 20 answers, so it is optimistic; a count
        # spread over about 0-45 (8,000 characters) still leaves it far from a solved task.
        bound = 0.35 if r["family"] == "aggregate" else 0.25
        assert r["whole context"] == 0.0 and r["first match"] <= 0.25 and r["best constant"] <= bound, r
    table = evaluation.format_floor(rows)
    assert "best constant" in table and "first match" in table


def test_best_constant_is_the_best_single_answer():
    from tasks import Task
    tasks = [Task("x", "q", "c", a, "exact", 0) for a in ("Oslo", "Oslo", "Lima")]
    assert evaluation.best_constant(tasks) == ("Oslo", 2 / 3)
    counts = [Task("x", "q", "c", a, "number", 0) for a in (4, 6)]
    answer, credit = evaluation.best_constant(counts)   # one of them exactly beats 5 (0.75 from both)
    assert answer in ("4", "6") and credit == (1 + 0.75 ** 2) / 2



# -----------------------------------------------------------------------------
# Seen and held-out wordings


def test_a_family_without_wordings_is_evaluated_once_in_the_seen_wording():
    assert not evaluation.worded("aggregate")
    seen = evaluation.held_out_suite(["aggregate"], [2000], n=2)
    both = evaluation.held_out_suite(["aggregate"], [2000], n=2, wordings=("seen", "held_out"))
    assert [t.seed for t in both[2000]] == [t.seed for t in seen[2000]]   # not twice, not relabelled
    assert {t.wording for t in both[2000]} == {"seen"}
    assert evaluation.held_out_suite(["aggregate"], [2000], n=2, wordings=("held_out",)) == {2000: []}


def test_a_worded_family_gets_both_wordings_and_every_row_says_which():
    assert evaluation.worded("niah") and not evaluation.worded("aggregate")
    suite = evaluation.held_out_suite(["niah", "aggregate"], [2000], n=2, wordings=("seen", "held_out"))
    assert sorted((t.family, t.wording) for t in suite[2000]) == sorted(
        [("niah", "seen")] * 2 + [("aggregate", "seen")] * 2 + [("niah", "held_out")] * 2)
    held = [t for t in suite[2000] if t.wording == "held_out"]
    held_questions = [q.split("{k}")[0] for q in tasks.NIAH_QUESTIONS["held_out"]]
    assert all(any(q in t.query for q in held_questions) for t in held)
    assert [t.seed for t in held] == [t.seed for t in suite[2000] if t.family == "niah" and t.wording == "seen"]

    # The solver reads any wording (a word of the query with a digit, then its line): rows per wording.
    niah_only = {2000: [t for t in suite[2000] if t.family == "niah"]}
    records = asyncio.run(evaluation.evaluate(Batcher(ScriptedPolicy(needle_solver)), niah_only, ["rlm"],
                                              {"max_new_tokens": 512, "max_turns": 1}, progress=False))
    assert sorted(r["wording"] for r in records) == ["held_out", "held_out", "seen", "seen"]
    rows = evaluation.summarize(records)
    assert [(r["wording"], r["n"], r["correctness"]) for r in rows] == [("seen", 2, 1.0), ("held_out", 2, 1.0)]
    table = evaluation.format_table(rows)
    assert re.search(r"rlm\s+niah\s+seen\s+2,000\s+2\s+1\.00", table.split("\n")[2])
    assert re.search(r"rlm\s+niah\s+held\s+2,000\s+2\s+1\.00", table.split("\n")[3])
    floor = evaluation.floor_rows(niah_only)
    assert [(r["wording"], r["n"]) for r in floor] == [("seen", 2), ("held_out", 2)]
    assert "held" in evaluation.format_floor(floor)


def test_the_wording_flag_refuses_what_it_cannot_do(tmp_path):
    out = ["--out", str(tmp_path / "o.json")]
    with pytest.raises(SystemExit, match="unknown --wording 'unseen'"):
        evaluation.plan(evaluation.parse_args(["--tasks", "niah", "--wording", "unseen", *out]))
    with pytest.raises(SystemExit, match="none of --tasks aggregate has held-out wordings"):
        evaluation.plan(evaluation.parse_args(["--tasks", "aggregate", "--wording", "seen,held_out", *out]))


def test_rows_from_before_wordings_still_print():
    row = {"policy": "p", "method": "rlm", "family": "niah", "length": 2000, "n": 1, "correctness": 1.0,
           "reward": 0.9, "prompt_tokens": 1, "generated_tokens": 1, "critical_path": 1, "turns": 1,
           "sub_calls": 0, "concurrent_share": 0.0, "depth": 0, "wall_seconds": 0.1}   # as train.py's eval.jsonl
    assert re.search(r"niah\s+seen\s+2,000", evaluation.format_table([row]))
    assert re.search(r"niah\s+seen\s+2,000\s+1\s+0\.00\s+-\s+-\s+0", evaluation.format_errors([row]))


# -----------------------------------------------------------------------------
# Errors, what follows them, and replies that repeat themselves


TEACHER_LIKE = ("```repl\n# plan: split in halves, child RLMs search both at once\n"
                "lines = context.splitlines()\nmid = len(lines) // 2\n"
                "parts = ['\\n'.join(lines[:mid]), '\\n'.join(lines[mid:])]\n"
                "sub = query + ' (it may not be in this part)'\n"
                "answers = await asyncio.gather(rlm_query_async(sub, parts[0]), rlm_query_async(sub, parts[1]))\n"
                "found = [a for a in answers if 'not found' not in a.lower()]\n"
                "FINAL(found[0] if found else 'not found')\n```")


def test_is_degenerate_catches_repetition_and_passes_sound_replies():
    assert not evaluation.is_degenerate(TEACHER_LIKE)
    assert not evaluation.is_degenerate("FINAL(7485352)") and not evaluation.is_degenerate("")
    assert not evaluation.is_degenerate("```repl\nx = 1\n```\n```repl\ny = 2\n```\n```repl\nz = 3\n```")  # short lines
    line = "print(context[:100])"
    assert not evaluation.is_degenerate(f"{line}\n{line}\n")                  # twice is not a loop
    assert evaluation.is_degenerate(f"```repl\n{line}\nx = 1\n{line}\n{line}\n```")   # the same line 3 times
    assert evaluation.is_degenerate("The answer is " + "re.search(key, context)" * 3)   # back to back, no newline
    assert not evaluation.is_degenerate("The answer is " + "re.search(key, cont" * 2)


def test_is_degenerate_is_fast_on_long_replies():
    rng = random.Random(0)
    noise = "".join(rng.choice(string.printable) for _ in range(2000))
    half = "".join(rng.choice(string.ascii_letters) for _ in range(1000))
    cases = {noise: False, half + half: False, (half[:50] * 40): True, ("x" * 19 + "y") * 100: True}
    start = time.perf_counter()
    for text, degenerate in cases.items():
        assert evaluation.is_degenerate(text) is degenerate
    assert time.perf_counter() - start < 2.0   # about 0.15 s here; a backtracking blow-up would take minutes


def test_cell_errors_reads_what_the_repl_shows():
    cells = {"x = (": 1, "1/0": 1, "import re\nre.search('(', context)": 1,   # re.error: not a name ending in Error
             "try:\n    1/0\nexcept Exception as e:\n    raise ValueError('bad') from e": 1,   # chained: one cell
             "raise AssertionError": 1, "print('Error: fine')": 0, "print(len(context))": 0}

    async def observe():
        async with REPL("some context", timeout=5.0) as repl:
            return [await repl.execute(code) for code in cells]

    for (code, failed), observation in zip(cells.items(), asyncio.run(observe())):
        assert evaluation.cell_errors(observation, 3) == failed, (code, observation)   # 3: no cap here
    two = "Traceback (most recent call last):\n  File...\nKeyError: 'a'\nTraceback (most recent call last):\nX"
    assert evaluation.cell_errors(two, 2) == 2 and evaluation.cell_errors(two, 1) == 1   # at most one a cell
    assert evaluation.cell_errors(None, 1) == 0


TRACEBACK = 'Traceback (most recent call last):\n  File "<repl>", line 1, in <module>\nNameError: name \'m\' is not defined'


def turn(code, observation, reply=None):
    return {"reply": reply if reply is not None else "".join(f"```repl\n{c}\n```" for c in code),
            "code": code, "observation": observation, "sub_calls": []}


def hand_built_rollout():
    """A root that resubmits a failing cell once (whitespace aside), then changes it; a child RLM that
    changes its failing cell at once; a plain sub-call whose reply loops."""
    root = Call(id=0, parent=None, kind="root", depth=0, query="q", turns=[
        turn(["print(m.group(1))"], TRACEBACK),
        turn(["\n  print(m.group(1))  \n\n"], TRACEBACK),                # the same cell again
        turn(["m = re.search('is (\\\\d+)', context)", "print(m.group(1))"], "7485352"),
        turn(["FINAL('7485352')"], None)])
    child = Call(id=1, parent=0, kind="rlm_query", depth=1, query="q1", turns=[
        turn(["x = context[10**9]"], "Traceback (most recent call last):\nIndexError: string index out of range"),
        turn(["FINAL(context[:5])"], None)])
    loop = "the number is the number is the number is "
    plain = Call(id=2, parent=0, kind="llm_query", depth=1, query="q2", turns=[turn([], None, reply=loop * 3)])
    return Rollout("q", "7485352", [root, child, plain], Cost(), 1000)


def test_strategy_profile_counts_errors_what_followed_them_and_looping_replies():
    profile = evaluation.strategy_profile(hand_built_rollout())
    assert profile["errors"] == 3
    assert profile["errors_followed"] == 3 and profile["errors_changed"] == 2   # the resubmission did not change
    assert profile["replies"] == 7 and profile["degenerate_replies"] == 1
    assert profile["turns"] == 4
    # A failing turn followed by a reply without code is not a retry.
    last = Call(id=0, parent=None, kind="root", depth=0, query="q",
                turns=[turn(["1/0"], TRACEBACK), turn([], None, reply="FINAL(3)")])
    profile = evaluation.strategy_profile(Rollout("q", "3", [last], Cost(), 1000))
    assert (profile["errors"], profile["errors_followed"]) == (1, 0)
    none = evaluation.strategy_profile(None)
    assert none["errors"] == none["errors_followed"] == none["replies"] == 0


def record(task, correct, **counts):
    profile = {**evaluation.strategy_profile(None), **counts}
    return evaluation.run_record(task, "rlm", 2000, task.answer if correct else "0", Cost(), profile, RewardConfig())


def test_summarize_pools_error_and_repetition_rates_with_their_n():
    task = tasks.make_task("niah", 2000, seed=1)
    records = [record(task, True, errors=2, errors_followed=3, errors_changed=2, replies=7, degenerate_replies=1),
               record(task, False, errors=1, errors_followed=1, errors_changed=1, replies=3),
               record(task, True, replies=2)]
    [row] = evaluation.summarize(records)
    assert row["errors"] == 1.0
    assert (row["changed_after_error"], row["errors_followed"]) == (3 / 4, 4)
    assert row["changed_after_error_ci"] == evaluation.wilson(3, 4)
    assert (row["recovered"], row["with_errors"]) == (1 / 2, 2)   # the clean correct run is no recovery
    assert row["recovered_ci"] == evaluation.wilson(1, 2)
    assert (row["degenerate"], row["replies"], row["degenerate_ci"]) == (1 / 12, 12, evaluation.wilson(1, 12))
    assert re.search(r"75%\s+0\.30-0\.95\s+4\s+50%\s+0\.09-0\.91\s+2\s+8%", evaluation.format_errors([row]))
    [clean] = evaluation.summarize([record(task, True, replies=1)])
    assert clean["changed_after_error"] is None and clean["recovered_ci"] is None   # nothing measured, no rate
    assert re.search(r"-\s+-\s+0\s+-\s+-\s+0\s+0%", evaluation.format_errors([clean]))


def test_a_run_that_resubmits_then_fixes_its_cell_is_counted_through_the_real_loop():
    suite = evaluation.held_out_suite(["niah"], [2000], n=1, start=5)
    broken = repl_block("FINAL(m.group(1))")   # m was never defined

    def script(text):
        if parse(text)["kind"] != "rlm":
            return "1234567"
        return broken if parse(text)["turn"] < 2 else SOLVER

    records = asyncio.run(evaluation.evaluate(Batcher(ScriptedPolicy(script)), suite, ["rlm", "direct"],
                                              {"max_new_tokens": 512, "max_turns": 4}, progress=False))
    rlm, direct = records
    assert rlm["correctness"] == 1.0 and rlm["turns"] == 3
    assert (rlm["errors"], rlm["errors_followed"], rlm["errors_changed"]) == (2, 2, 1)
    assert (rlm["replies"], rlm["degenerate_replies"]) == (3, 0)
    assert (direct["errors"], direct["replies"], direct["degenerate_replies"]) == (0, 1, 0)
    rows = {r["method"]: r for r in evaluation.summarize(records)}
    assert rows["rlm"]["recovered"] == 1.0 and rows["rlm"]["changed_after_error"] == 0.5
    assert rows["direct"]["with_errors"] == 0 and rows["direct"]["recovered"] is None
