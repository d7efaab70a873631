"""eval.py end to end: a scripted policy that really solves needle tasks, and a tiny model."""

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import eval as evaluation
from rlm import Batcher
from scripted import ScriptedPolicy, parse, repl_block

ROOT = Path(__file__).resolve().parents[1]   # eval.py runs from here, whatever the working directory

SOLVER = repl_block(
    "import re\n"
    "key = re.search(r'number for (\\S+) mentioned', query).group(1)\n"
    "FINAL(re.search(re.escape(key) + r' is (\\d+)', context).group(1))")


def needle_solver(text):
    """RLM calls search the context with code; a direct prompt gets a confident wrong guess."""
    return SOLVER if parse(text)["kind"] == "rlm" else "1234567"


def test_evaluate_scores_what_the_model_produced_for_every_method_and_length():
    suite = evaluation.held_out_suite(["niah"], [2000, 6000], n=2)
    policy = ScriptedPolicy(needle_solver)
    settings = {"max_new_tokens": 256}  # the solver's code is longer than the CPU default reply
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
    assert re.search(r"^rlm-sync\s+rlm-sync\s+niah\s+2,000\s+1\s", result.stdout, re.MULTILINE)
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
                                              {"max_new_tokens": 256}, progress=False))
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
