"""realtext.py: real filler text of exact length, split seen/held-out by construction; the source
family's tasks are exact, deterministic, answerable from the context, and not earned by cheap
answers; the teacher's source strategies solve them through the real RLM loop."""

import ast
import asyncio
import random
import re
import time
from collections import Counter

import pytest

import realtext
import teacher
from realtext import (PARTS, QUESTIONS, TEMPLATES, documents, parse_source_query, read_signature,
                      real_filler_lines, source_cheap_answers, source_task)
from rlm import BUDGETS
from tasks import Task, normalize, score


def make(seed, length=8000, question=None, wording="seen"):
    query, context, answer, scoring = source_task(random.Random(seed), length, question, wording)
    return Task("source", query, context, answer, scoring, 0)


def function_of(task):
    """(file name, ast node) of the function the task asks about, from the real file."""
    name = parse_source_query(task.query)[1]
    at = task.context.index(f"def {name}(")
    file = re.findall(r"# ---- file: (\S+) ----", task.context[:at])[-1]
    tree = ast.parse(realtext.document_text("code", file))
    return file, next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.name == name), name


# ---------------------------------------------------------------- filler

@pytest.mark.parametrize("kind", realtext.KINDS)
@pytest.mark.parametrize("part", PARTS)
def test_filler_has_exact_length_and_is_deterministic(kind, part):
    for n in (0, 1, 500, 8000, 100_000):
        lines = real_filler_lines(random.Random(n), n, kind, part)
        assert len("\n".join(lines)) == n
        assert lines == real_filler_lines(random.Random(n), n, kind, part)
        assert not any(re.search(r"\d{5}", line) for line in lines)
    assert real_filler_lines(random.Random(1), 5000, kind, part) != real_filler_lines(random.Random(2), 5000, kind, part)


def test_filler_leaves_out_rejected_lines_and_is_fast_once_loaded():
    lines = real_filler_lines(random.Random(0), 50_000, "prose", reject=lambda line: "the" in line)
    assert not any("the" in line for line in lines[:-1])   # the last line may be a cut piece
    for kind in realtext.KINDS:
        real_filler_lines(random.Random(0), 512_000, kind)   # the first load reads the files
        start = time.perf_counter()
        assert len("\n".join(real_filler_lines(random.Random(1), 512_000, kind))) == 512_000
        assert time.perf_counter() - start < 0.5
    # A part smaller than the request is used again, reshuffled.
    assert len("\n".join(real_filler_lines(random.Random(0), 3_000_000, "prose", "held_out"))) == 3_000_000


def test_parts_split_every_document_once_by_its_name():
    for kind in realtext.KINDS:
        seen, held = set(documents(kind, "seen")), set(documents(kind, "held_out"))
        assert seen and held and not seen & held
        assert seen | held == set(realtext._all_names(kind))
        assert 0.15 < len(held) / (len(seen) + len(held)) < 0.35
    assert not any(re.search(r"(^|/)(tests?|idlelib|lib2to3|pydoc_data)/", n) for n in realtext._all_names("code"))


def test_held_out_filler_comes_from_held_out_documents_only():
    texts = {n: realtext.document_text("prose", n) for n in documents("prose", "seen")}
    lines = [line for line in real_filler_lines(random.Random(3), 30_000, "prose", "held_out")[:-1] if len(line) > 60]
    assert lines and not any(line in text for line in lines for text in texts.values())


# ---------------------------------------------------------------- source tasks

@pytest.mark.parametrize("length", [2000, 8000, 64_000, 1_000_000])
def test_source_context_is_exact_and_deterministic(length):
    a, b = make(5, length), make(5, length)
    assert len(a.context) == length and a == b
    assert a.context.startswith("# ---- file: ")
    assert make(6, length) != a


@pytest.mark.parametrize("question", QUESTIONS)
def test_answers_agree_with_ast_on_the_real_file_and_the_name_is_defined_once(question):
    for seed in range(12):
        task = make(seed, 8000 if seed % 2 else 64_000, question)
        file, node, name = function_of(task)
        assert task.context.count(f"def {name}(") == 1
        assert not re.search(rf"\bclass\s+{name}\b", task.context)
        a = node.args
        params = [p.arg for p in a.posonlyargs + a.args] + ([a.vararg.arg] if a.vararg else []) + \
            [p.arg for p in a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
        assert len(params) >= 2
        # A short program that finds `def NAME(` reads the same signature out of the context.
        read = read_signature(task.context[task.context.index(f"def {name}("):])
        assert [p for p, _ in read] == params
        if question == "first_param":
            assert task.answer == params[0] and task.scoring == "exact"
        elif question == "n_params":
            assert task.answer == len(params) and task.scoring == "exact"
        elif question == "params":
            assert task.answer == params and task.scoring == "f1"
        else:
            param = parse_source_query(task.query)[2]
            positional = a.posonlyargs + a.args
            defaults = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults):]], a.defaults))
            defaults.update((p.arg, d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)
            assert task.answer == ast.unparse(defaults[param])
            assert normalize(task.answer) not in ("none", "true", "false", "0")
            assert normalize(dict(read)[param]) == normalize(task.answer)
        assert score(task, repr(task.answer) if question == "params" else str(task.answer)) == 1.0


def test_held_out_wording_uses_held_out_files_and_templates_only():
    held = set(documents("code", "held_out"))
    for k, seen in TEMPLATES["seen"].items():
        held_out = TEMPLATES["held_out"][k]
        assert len(seen) >= 4 and len(held_out) >= 3 and not set(seen) & set(held_out)
    for seed in range(8):
        task = make(seed, 30_000, wording="held_out")
        assert set(re.findall(r"# ---- file: (\S+) ----", task.context)) <= held
        assert parse_source_query(task.query) is None
        assert any(re.fullmatch(realtext._template_pattern(t), task.query)
                   for ts in TEMPLATES["held_out"].values() for t in ts)
        seen_task = make(seed, 30_000)
        assert not set(re.findall(r"# ---- file: (\S+) ----", seen_task.context)) & held


def test_parse_source_query_reads_every_seen_template():
    for question, templates in TEMPLATES["seen"].items():
        for t in templates:
            assert parse_source_query(t.format(name="_decode_uXXXX", param="strict")) == \
                (question, "_decode_uXXXX", "strict" if question == "default" else None)


def test_cheap_answers_and_constants_earn_next_to_nothing():
    """Measured over 40 tasks per question (140 for counts) at 8,000 and at 64,000 characters."""
    cheap, best_constant = [], {}
    for question in QUESTIONS:
        for length in (8000, 64_000):
            n = 140 if question == "n_params" else 40   # 7 counts: 40 tasks leave too much room for chance
            tasks = [make(f"floor/{length}/{question}/{s}", length, question) for s in range(n)]
            for t in tasks:
                answers = source_cheap_answers(t.context)
                cheap.append([score(t, answers["first match"]), score(t, answers["every candidate"]),
                              score(t, t.context)])
            counts = Counter(normalize(t.answer) for t in tasks)
            best_constant[question, length] = max(counts.values()) / len(tasks)   # the oracle's best guess
    means = [sum(row[i] for row in cheap) / len(cheap) for i in range(3)]
    assert max(means) < 0.1, means
    for (question, length), share in best_constant.items():
        # A count is drawn uniformly from 2..8 first: 1/7 expected.
        assert share <= (0.22 if question == "n_params" else 0.15), (question, length, share)


def test_a_count_is_asked_uniformly_over_its_range():
    counts = Counter(make(f"count/{s}", 20_000, "n_params").answer for s in range(140))
    assert set(counts) == set(realtext.N_PARAMS_ASKED)
    assert max(counts.values()) / 140 < 0.22, counts


# ---------------------------------------------------------------- the teacher

@pytest.fixture(scope="module")
def chat_tokens():
    from lora import ChatTokens, load_tokenizer
    return ChatTokens(load_tokenizer())


@pytest.fixture()
def source_teacher(monkeypatch):
    """teacher.reply with the source family dispatched to teacher.source_turn (as tasks.py will register it)."""
    plain = teacher.reply

    def reply(messages, strategy, rng):
        system = next((c for r, c in messages if r == "system"), "")
        users = [c for r, c in messages if r == "user"]
        query = users[0].split("\n\n", 1)[0].removeprefix("Query: ")
        if system.startswith(teacher.RLM_SYSTEM_START) and parse_source_query(query):
            return teacher.source_turn(query, users[1:], strategy, rng)
        return plain(messages, strategy, rng)

    monkeypatch.setattr(teacher, "reply", reply)


@pytest.mark.parametrize("strategy", teacher.SOURCE_STRATEGIES)
def test_every_source_strategy_solves_seen_tasks_through_the_rlm_loop(chat_tokens, source_teacher, strategy):
    solved, turns = 0, Counter()
    for seed in range(20):
        task = make(f"teacher/{seed}", 8000, QUESTIONS[seed % 4])
        demo = asyncio.run(teacher.demonstrate(chat_tokens, task, strategy, BUDGETS["cpu"], seed))
        root = demo.rollout.calls[0]
        assert root.turns[0]["code"], "the first reply runs code"
        turns[len(root.turns)] += 1
        solved += demo.correctness == 1.0
        if strategy == "recover" and len(root.turns) > 1:   # it never runs the failed cell again
            assert root.turns[1]["code"] != root.turns[0]["code"]
    assert solved == 20, (strategy, solved, turns)
    if strategy == "look":
        assert turns == {2: 20}
    if strategy == "parse":
        assert turns == {1: 20}
