"""Tasks are deterministic, the requested length, solvable by a short program, and scored as documented."""

import itertools
import json
import re
from collections import Counter, defaultdict

import pytest

import tasks
from tasks import (AGGREGATE_LABELS, AGGREGATE_TEXTS, FAMILIES, MAX_RECORD_CHARS, Task,
                   MAX_STATED_CHARS, SPLITS, cheap_answers, load_jsonl, make_suite, make_task, save_jsonl,
                   score, split_of, task_seed)

EXACT_LENGTH = ("niah", "multihop")  # record families stop at a whole record


def assert_length(task, length):
    if task.family in EXACT_LENGTH:
        assert len(task.context) == length
    else:
        assert length - MAX_RECORD_CHARS <= len(task.context) <= length


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_task_other_seed_other_task(family):
    a, b, c = (make_task(family, 20_000, s) for s in (7, 7, 8))
    assert a == b
    assert a.context != c.context


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [2_000, 5_001, 123_457, 1_000_000])
def test_requested_length(family, length):
    task = make_task(family, length, seed=length % 97)
    assert_length(task, length)
    assert task.family == family and task.scoring in tasks.SCORINGS


@pytest.mark.parametrize("family", FAMILIES)
def test_ten_million_characters(family):
    # Seconds are printed by `python tasks.py --length 10000000`; here only the size is checked.
    assert_length(make_task(family, 10_000_000, seed=0), 10_000_000)


def test_records_are_within_one_percent_from_16500_characters():
    assert MAX_RECORD_CHARS <= 165
    for family in ("aggregate", "pairs"):
        for seed in range(5):
            assert 16_500 - len(make_task(family, 16_500, seed).context) <= 165


def test_bad_requests_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="unknown family"):
        make_task("haystack", 10_000, 0)
    with pytest.raises(TypeError, match="variants are"):
        make_task("niah", 10_000, 0, needle=2)
    with pytest.raises(ValueError, match="too small"):
        make_task("aggregate", 500, 0)
    with pytest.raises(ValueError, match="too small"):
        make_task("niah", 1_000, 0, needles=40)
    with pytest.raises(ValueError, match="queried"):
        make_task("niah", 10_000, 0, needles=2, queried=3)


def test_suite_is_deterministic_and_complete():
    a = make_suite(["niah", "multihop"], [3_000, 6_000], n=3, split="eval")
    assert a == make_suite(["niah", "multihop"], [3_000, 6_000], n=3, split="eval")
    assert len(a) == 12
    assert Counter((t.family, len(t.context)) for t in a) == {
        (f, n): 3 for f in ("niah", "multihop") for n in (3_000, 6_000)}
    assert len({t.seed for t in a}) == 12
    assert a != make_suite(["niah", "multihop"], [3_000, 6_000], n=3, split="eval", start=3)
    b = make_suite(["niah"], [4_000], n=2, variants={"niah": {"needles": 3, "queried": 2}})
    assert all(t.scoring == "f1" and len(t.answer) == 2 for t in b)


def test_splits_own_disjoint_seed_spaces_by_construction():
    # The split is the seed's top bits, so no index, family or length can make two splits meet,
    # and a hand-picked seed (below 2**56) is in no split at all.
    for split in SPLITS:
        for index in (0, 1, 10**6, "run0/step3/1"):
            seed = task_seed(split, "niah", 8000, index)
            assert split_of(seed) == split
    assert all(split_of(s) is None for s in (0, 7, 10**6, 2**31, 2**56 - 1))
    suites = {split: make_suite(["niah", "multihop"], [2_000, 8_000], n=20, split=split)
              for split in ("train", "validation", "eval")}
    seeds = {split: {t.seed for t in suite} for split, suite in suites.items()}
    assert all(len(s) == 80 for s in seeds.values())
    assert not (seeds["train"] & seeds["eval"]) and not (seeds["validation"] & seeds["eval"])
    with pytest.raises(ValueError, match="unknown split"):
        task_seed("test", "niah", 8000, 0)


def test_each_length_asks_its_own_needle():
    # The same index at another length is another task: its own key and value, not the same
    # needle in a longer haystack.
    short, long = (make_suite(["niah"], [n], n=10)[0:10] for n in (8_000, 512_000))
    assert not {t.answer for t in short} & {t.answer for t in long}
    assert not {t.query for t in short} & {t.query for t in long}


@pytest.mark.parametrize("family, length, bound", [
    ("niah", 8_000, 0.15), ("niah", 32_000, 0.1), ("multihop", 8_000, 0.15), ("multihop", 32_000, 0.15),
    ("aggregate", 8_000, 0.2), ("aggregate", 32_000, 0.1), ("pairs", 8_000, 0.15), ("pairs", 32_000, 0.1)])
@pytest.mark.parametrize("wording", ["seen", "held_out"])
def test_answers_that_never_look_for_the_key_earn_next_to_nothing(family, length, bound, wording):
    # 40 evaluation tasks per cell. Handing back the context earns 0 everywhere; so does naming
    # every candidate of the answer's kind at once. A key-blind first match is right about as
    # often as chance allows (1 in 16 needles at 8,000 characters, 1 in 64 at 32,000).
    if wording == "held_out" and family not in ("niah", "multihop"):
        pytest.skip(f"{family} has one wording")
    suite = make_suite([family], [length], n=40, variants={f: {"wording": wording} for f in ("niah", "multihop")})
    credit = {}
    for task in suite:
        for name, answer in cheap_answers(task).items():
            credit.setdefault(name, []).append(score(task, answer))
    assert set(credit) == {"whole context", "first match", "every candidate"}
    assert sum(credit["whole context"]) == 0
    if family in ("niah", "multihop"):   # several values named: no credit
        assert sum(credit["every candidate"]) == 0
    for name, values in credit.items():
        assert sum(values) / len(values) <= bound, (name, sum(values) / len(values))


def test_a_long_restatement_states_nothing():
    task = make_task("niah", 8_000, 5, needles=1)   # one needle: no look-alike to give the dump away
    needle = next(line for line in task.context.split("\n") if task.answer in line)
    start = task.context.index(needle)
    assert score(task, needle) == 1.0                                   # a sentence that states it
    assert score(task, f"FINAL({needle})") == 1.0
    chunk = task.context[max(0, start - 400):start + len(needle) + 400]
    assert len(chunk) > MAX_STATED_CHARS and chunk.count(task.answer) == 1
    assert score(task, chunk) == 0.0                                    # a chunk handed back
    assert score(task, task.context) == 0.0 and score(task, f"FINAL({task.context})") == 0.0


# ---------------------------------------------------------------- pools

def test_topic_texts_never_name_a_topic_and_pools_are_disjoint():
    seen = {}
    for label, texts in AGGREGATE_TEXTS.items():
        assert len(texts) >= 100
        for text in texts:
            assert not any(word in text.lower() for word in AGGREGATE_LABELS), text
            assert "|" not in text and not re.search(r"\d", text)
            assert seen.setdefault(text, label) == label, f"{text!r} is in two pools"


def test_niah_key_words_never_end_with_another():
    words = tasks._KEY_FIRST + tasks._KEY_SECOND
    assert len(set(words)) == len(words)
    assert not [(a, b) for a in words for b in words if a != b and a.endswith(b)]


def test_filler_cannot_be_mistaken_for_a_fact():
    text = "\n".join(tasks._filler_lines(__import__("random").Random(0), 200_000))
    assert not re.search(r"\d|'|-|magic|handler|safehouse|Agent|contact|courier|informant", text)


# ---------------------------------------------------------------- reference solvers

NEEDLE = re.compile(r"^The special magic number for (\S+) is (\d{7})\.$", re.M)   # the "original" wording's frame


def frame_pattern(frame):
    """A needle frame of tasks.NIAH_FRAMES as a regex with groups (key, value), one needle a line."""
    body = re.escape(frame).replace(re.escape("{k}"), r"(?P<k>\S+?)").replace(re.escape("{v}"), r"(?P<v>\S+?)")
    return re.compile("^" + body + "$", re.M)


FRAMES = [frame_pattern(f) for w in ("seen", "held_out") for f in tasks.NIAH_FRAMES[w]]


def solve_niah(task):
    # The frame of the task is the one that matches most lines: every needle uses it.
    found = max(([(m["k"], m["v"]) for m in p.finditer(task.context)] for p in FRAMES), key=len)
    values = dict(found)
    assert len(values) == len(found), "a key appears in two needles"
    for key in values:  # every key, decoys included, occurs once and only in its needle
        assert task.context.count(key) == 1
    asked = sorted((k for k in values if k in task.query), key=task.query.index)
    answers = [values[k] for k in asked]
    return answers[0] if task.scoring == "exact" else answers


RECORD = re.compile(r"^Date: (2024-(\d\d)-\d\d) \|\| User: (\d+) \|\| Text: (.+)$")
LABEL_OF = {text: label for label, texts in AGGREGATE_TEXTS.items() for text in texts}


def parse_records(context):
    header, *lines = context.split("\n")
    assert "record" in header
    out = []
    for line in lines:
        m = RECORD.match(line)
        assert m, line
        out.append((m.group(2), int(m.group(3)), LABEL_OF[m.group(4)]))
    return out


def solve_aggregate(task):
    counts = Counter(label for _, _, label in parse_records(task.context))
    asked = re.search(r"How many records are about (\w+)\?", task.query)
    if asked:
        return counts[asked.group(1)]
    (top, n), (_, runner_up) = counts.most_common(2)
    assert n > runner_up, "the most common topic must be unique"
    return top


def solve_pairs(task):
    label = re.search(r"record about (\w+)", task.query).group(1)
    months = defaultdict(set)  # month -> users with a record about label that month
    for month, user, lab in parse_records(task.context):
        if lab == label:
            months[month if "same month" in task.query else "any"].add(user)
    return sorted({p for users in months.values() for p in itertools.combinations(sorted(users), 2)})


def fact_patterns():
    """Every multihop frame as a regex with groups (who, relation, what), one fact a line."""
    name = r"(?:Agent )?[A-Z][a-z]+ [A-Z][a-z]+"
    out = []
    for w in ("seen", "held_out"):
        for frame in tasks.MULTIHOP_HOPS[w]:
            body = re.escape(frame).replace(re.escape("{a}"), f"(?P<a>{name})").replace(
                re.escape("{r}"), r"(?P<r>\w+)").replace(re.escape("{b}"), f"(?P<b>{name})")
            out.append(re.compile("^" + body + "$", re.M))
        for frame in tasks.MULTIHOP_CITIES[w]:
            body = re.escape(frame).replace(re.escape("{a}"), f"(?P<a>{name})").replace(re.escape("{c}"), r"(?P<b>\w+)")
            out.append(re.compile("^" + body + "$", re.M))
    return out


FACTS = fact_patterns()


def solve_multihop(task):
    facts = {}
    for pattern in FACTS:
        for m in pattern.finditer(task.context):
            key = (m["a"], m.groupdict().get("r") or "safehouse")
            assert key not in facts, f"{key} is stated twice"
            facts[key] = m["b"]
    agent = re.search(r"(Agent [A-Z][a-z]+ [A-Z][a-z]+)'s handler", task.query).group(1)
    relations = ["handler"] + re.findall(r"the (\w+) of", task.query)[::-1]
    relations = [r for r in relations if r in ("handler", "contact", "courier", "informant")]
    person = agent
    for rel in relations:
        person = facts[person, rel]
    return facts[person, "safehouse"]


SOLVERS = {"niah": solve_niah, "aggregate": solve_aggregate, "pairs": solve_pairs,
           "multihop": solve_multihop}
CASES = [
    ("niah", {}), ("niah", {"decoys": 5}), ("niah", {"needles": 6, "queried": 1, "decoys": 2}),
    ("niah", {"wording": "held_out"}), ("niah", {"wording": "original", "decoys": 3}),
    ("niah", {"needles": 5, "queried": 3, "decoys": 3}), ("niah", {"depth": 0.5}),
    ("aggregate", {}), ("aggregate", {"question": "most_common"}),
    ("aggregate", {"label": "money"}),
    ("pairs", {}), ("pairs", {"condition": "same_month"}), ("pairs", {"users": 3, "label": "food"}),
    ("multihop", {}), ("multihop", {"hops": 3}), ("multihop", {"hops": 5, "distractors": 3}),
    ("multihop", {"wording": "held_out", "hops": 3}), ("multihop", {"wording": "original"}),
]


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("length", [2_000, 60_000])
def test_ground_truth_is_recoverable(family, variant, length):
    for seed in range(4):
        task = make_task(family, length, seed, **variant)
        answer = SOLVERS[family](task)
        if task.scoring == "f1" and family == "pairs":
            assert sorted(map(tuple, task.answer)) == answer
            assert 1 <= len(answer) <= 28
        else:
            assert answer == task.answer
        assert score(task, str(answer)) == 1.0


def test_niah_decoys_look_alike_but_differ():
    task = make_task("niah", 30_000, 3, needles=1, decoys=6, wording="original")   # no other keys: only the decoys look alike
    key = re.search(r"for (\S+) mentioned", task.query).group(1)
    a, b, _ = key.split("-")
    keys = [k for k, _ in NEEDLE.findall(task.context)]
    assert len(keys) == 7 and len(set(keys)) == 7
    for k in keys:
        assert k == key or (k != key and {a, b} == set(k.split("-")[:2]))


def test_niah_depth_places_the_needle():
    first = make_task("niah", 20_000, 1, depth=0.0, wording="original").context.split("\n")
    last = make_task("niah", 20_000, 1, depth=1.0, wording="original").context.split("\n")
    assert NEEDLE.match(first[0]) and NEEDLE.match(last[-1])


def test_multihop_wrong_hop_gives_a_wrong_city():
    task = make_task("multihop", 20_000, 2, hops=3)
    agent = re.search(r"(Agent [A-Z][a-z]+ [A-Z][a-z]+)'s", task.query).group(1)
    own = re.search(re.escape(agent) + r"'s safehouse is in (\w+)\.", task.context).group(1)
    assert own != task.answer


# ---------------------------------------------------------------- scoring

def T(answer, scoring):
    return Task("test", "q", "", answer, scoring, 0)


@pytest.mark.parametrize("prediction", [
    "Lisbon", "lisbon", "  LISBON \n", "Lisbon.", "'Lisbon'", '"Lisbon"', "**Lisbon**",
    "The answer is Lisbon.", "The answer is: Lisbon", "Answer: Lisbon", "FINAL(Lisbon)",
    "['Lisbon']", "I followed both hops, so the answer is Lisbon."])
def test_exact_match_is_lenient_about_form(prediction):
    assert score(T("Lisbon", "exact"), prediction) == 1.0


@pytest.mark.parametrize("prediction", ["Lisbon, Porto", "Porto", "Lisbo", "", "['Lisbon', 'Porto']"])
def test_exact_match_is_strict_about_content(prediction):
    assert score(T("Lisbon", "exact"), prediction) == 0.0


def test_none_scores_zero_in_every_mode():
    for task in (T("x", "exact"), T(3, "number"), T(["a"], "f1"), T([[1, 2]], "f1")):
        assert score(task, None) == 0.0


@pytest.mark.parametrize("prediction,credit", [
    ("12", 1.0), ("There are 12 records", 1.0), ("The answer is 12.", 1.0), ("12.0", 1.0),
    ("11", 0.75), ("14", 0.75 ** 2), ("Out of 340 records, 9 are about food", 0.75 ** 3),
    ("none", 0.0), ("1,212", 0.75 ** 1200)])
def test_numbers_get_partial_credit(prediction, credit):
    assert score(T(12, "number"), prediction) == pytest.approx(credit)


NIAH = Task("niah", "What is the special magic number for ebony-panda-82 mentioned in the context? "
            "Answer with the 7-digit number only.", "", "7485352", "exact", 0)
MULTIHOP = Task("multihop", "In which city is the safehouse of Agent Mara Quill's handler? "
                "Answer with the city only.", "", "Nicosia", "exact", 0)


def test_a_sentence_stating_one_magic_number_scores_like_that_number():
    for text in ["The special magic number for ebony-panda-82 is 7485352.",
                 "The 7-digit number for ebony-panda-82 is 7,485,352 (line 3 of the context)."]:
        assert score(NIAH, text) == 1.0, text
    for text in ["ebony-panda-82", "The special magic number for ebony-panda-82 is 7485353.",
                 "It is either 1234567 or 7485352.", "7485352, 1234567", "[7485352, 1234567]"]:
        assert score(NIAH, text) == 0.0, text


def test_a_sentence_stating_one_city_scores_like_that_city():
    for text in ["The safehouse is in Nicosia.", "The safehouse of Agent Mara Quill's handler is in Nicosia.",
                 "Agent Mara Quill's handler is Theo Vance, and Theo Vance's safehouse is in Nicosia."]:
        assert score(MULTIHOP, text) == 1.0, text
    for text in ["The safehouse is in Lisbon.", "Either Nicosia or Lisbon.", "Nicosia, Lisbon",
                 "Agent Mara Quill's own safehouse is in Lisbon; his handler's is in Nicosia.",
                 "Agent Mara Quill"]:
        assert score(MULTIHOP, text) == 0.0, text


def test_an_external_name_answer_is_read_from_a_sentence_naming_nothing_else():
    # Without a known set of answers, every capitalised name the query does not mention
    # is a candidate, so a chain of names is no longer one answer.
    task = Task("bench", MULTIHOP.query, "", "Nicosia", "exact", 0)
    assert score(task, "The safehouse of Agent Mara Quill's handler is in Nicosia.") == 1.0
    assert score(task, "Based on the context, it is Nicosia.") == 1.0
    for text in ["Nicosia or Lisbon", "Theo Vance's safehouse is in Nicosia."]:
        assert score(task, text) == 0.0, text


@pytest.mark.parametrize("family,variant", [
    ("niah", {"wording": "original"}), ("niah", {"needles": 4, "decoys": 3, "wording": "original"}),
    ("multihop", {"wording": "original"}), ("multihop", {"hops": 4, "wording": "original"}),
    ("aggregate", {"question": "most_common"})])
def test_echoing_the_question_never_adds_a_candidate(family, variant):
    for seed in range(4):
        task = make_task(family, 4_000, seed, **variant)
        echo = re.search(r"[^.?]*\?", task.query).group().strip()  # the question, key and names included
        rival = {"niah": "1234567" if task.answer != "1234567" else "7654321",
                 "multihop": "Lisbon" if task.answer != "Lisbon" else "Oslo",
                 "aggregate": "money" if task.answer != "money" else "food"}[family]
        assert score(task, f"{echo} It is {task.answer}.") == 1.0, echo
        assert score(task, f"{echo} It is {rival}.") == 0.0
        assert score(task, f"{echo} It is {task.answer} or {rival}.") == 0.0
        assert score(task, f"{echo} It is {rival}, not {task.answer}.") == 0.0


def test_a_count_is_the_number_stated_not_a_total_nor_the_query_s_digits():
    task = Task("bench", "How many records mention ebony-panda-82? Answer with a number.", "", 3, "number", 0)
    for text in ["There are 3 records about it (out of 25).", "3 records mention ebony-panda-82.",
                 "Of the 25 records, 3 mention ebony panda 82.", "3 of 25", "3/25", "FINAL(3) (out of 25)"]:
        assert score(task, text) == 1.0, text
    # Several counts get the credit of the worst, so naming a second never helps.
    assert score(task, "either 3 or 5") == pytest.approx(0.75 ** 2)
    assert score(task, "There are 3 records, or maybe 40.") == pytest.approx(0.75 ** 37)
    assert score(task, "ebony-panda-82") == 0.0
    assert tasks.parse_number("either 3 or 5") is None
    assert tasks.parse_number("There are 3 records about it (out of 25).") == 3


def test_final_written_as_text_ends_at_its_own_parenthesis():
    assert tasks._unwrap("FINAL(4182736) (see line 3)") == "4182736"
    assert tasks._unwrap("FINAL(sorted(set(x))) done") == "sorted(set(x))"
    assert score(T("4182736", "exact"), "FINAL(4182736) (see line 3)") == 1.0
    assert score(T("Lisbon", "exact"), "I followed the chain. FINAL('Lisbon') and stopped.") == 1.0
    assert score(T("Lisbon", "exact"), "FINAL(Lisbon") == 1.0  # cut off before it closed
    assert score(T(["1111111", "2222222"], "f1"), "FINAL(['1111111', '2222222']) (two lines)") == 1.0
    assert score(T("Lisbon", "exact"), "FINAL(Porto) (not Lisbon)") == 0.0


def test_f1_over_values():
    task = T(["1111111", "2222222", "3333333", "4444444"], "f1")
    assert score(task, "['1111111', '2222222', '3333333', '4444444']") == 1.0
    assert score(task, "4444444, 3333333, 2222222 and 1111111") == 1.0
    assert score(task, "[1111111, 2222222]") == pytest.approx(2 / 3)  # P=1, R=1/2
    assert score(task, "1111111\n2222222\n9999999") == pytest.approx(4 / 7)  # P=2/3, R=1/2
    assert score(task, "9999999") == 0.0


def test_f1_over_unordered_pairs():
    task = T([[1, 2], [3, 4], [5, 6]], "f1")
    for text in ["[(1, 2), (3, 4), (5, 6)]", "(2, 1), (4, 3), (6, 5)", "[[5, 6], [1, 2], [3, 4]]",
                 "(user 1, user 2)\n(user 3, user 4)\n(user 5, user 6)", "1-2, 3-4, 5-6",
                 "['1-2', '3-4', '5-6']", "The answer is: (1, 2), (3, 4), (5, 6)."]:
        assert score(task, text) == 1.0, text
    assert score(task, "(1, 2), (3, 4)") == pytest.approx(0.8)  # P=1, R=2/3
    assert score(task, "(1, 2), (1, 3)") == pytest.approx(0.4)  # P=1/2, R=1/3
    assert score(task, "(1, 2), (1, 2)") == pytest.approx(0.5)  # duplicates count once
    assert score(task, "(1, 2, 3)") == 0.0
    assert score(task, "[]") == 0.0
    assert score(T([], "f1"), "[]") == 1.0


# ---------------------------------------------------------------- external files

def test_jsonl_round_trip(tmp_path):
    original = [make_task(f, 3_000, seed=i) for i, f in enumerate(FAMILIES)]
    path = tmp_path / "tasks.jsonl"
    save_jsonl(original, path)
    assert load_jsonl(path) == original


def test_jsonl_infers_scoring(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"context": "c", "question": "how many?", "answer": 3},
            {"context": ["a", "b"], "query": "which?", "answer": ["x", "y"]},
            {"context": "c", "question": "who?", "answer": "Ada"},
            {"context": "c", "question": "count?", "answer": "7", "scoring": "number"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_jsonl(path)
    assert [t.scoring for t in loaded] == ["number", "f1", "exact", "number"]
    assert loaded[1].context == ["a", "b"] and loaded[1].query == "which?"
    assert loaded[0].family == "bench" and loaded[3].answer == 7
    assert score(loaded[3], "6") == 0.75


@pytest.mark.parametrize("bad_line,message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"context": "c", "answer": 1}', "line 2: missing question or query"),
    ('{"context": "c", "question": "q", "answer": {"a": 1}}', "line 2: answer must be"),
    ('{"context": "c", "question": "q", "answer": "x", "scoring": "bleu"}', "line 2: scoring must be"),
    ("[1, 2]", "line 2: expected a JSON object"),
])
def test_jsonl_bad_line_is_named(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q", "answer": "a"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


# ---------------------------------------------------------------- wording

def test_held_out_wording_is_for_evaluation_seeds_only():
    for split in ("train", "demo", "validation"):
        with pytest.raises(ValueError, match="held-out wording is for evaluation only"):
            make_task("niah", 4_000, task_seed(split, "niah", 4_000, 0), wording="held_out")
        with pytest.raises(ValueError, match="held-out wording is for evaluation only"):
            make_task("source", 4_000, task_seed(split, "source", 4_000, 0), wording="held_out")
    assert make_task("niah", 4_000, task_seed("eval", "niah", 4_000, 0), wording="held_out").wording == "held_out"
    with pytest.raises(ValueError, match="wording must be one of"):
        make_task("niah", 4_000, 0, wording="unseen")


@pytest.mark.parametrize("table", ["NIAH_FRAMES", "NIAH_QUESTIONS", "NIAH_LIST_QUESTIONS", "NIAH_INSTRUCTIONS",
                                   "NIAH_KEYS", "NIAH_VALUES"])
def test_seen_and_held_out_templates_share_nothing(table):
    seen, held = getattr(tasks, table)["seen"], getattr(tasks, table)["held_out"]
    assert seen and held
    if table == "NIAH_VALUES":   # a 7-digit number is a shape of both; the other shapes are not shared
        assert set(seen) & set(held) == {"number"}
    else:
        assert not set(seen) & set(held)


def test_a_seen_task_is_worded_with_seen_templates_and_a_held_out_one_with_held_out_ones():
    def frames_used(task):
        return {i for i, p in enumerate(FRAMES) if len(p.findall(task.context)) >= 2}

    n_seen = len(tasks.NIAH_FRAMES["seen"])
    for i in range(30):
        seen = make_task("niah", 8_000, task_seed("train", "niah", 8_000, i))
        held = make_task("niah", 8_000, task_seed("eval", "niah", 8_000, i), wording="held_out")
        assert frames_used(seen) and frames_used(seen) <= set(range(n_seen))
        assert frames_used(held) and not frames_used(held) & set(range(n_seen))
        assert any(q.split("{k}")[0] in seen.query for q in tasks.NIAH_QUESTIONS["seen"])
        assert any(q.split("{k}")[0] in held.query for q in tasks.NIAH_QUESTIONS["held_out"])


@pytest.mark.parametrize("filler", ["generated", "prose", "code"])
@pytest.mark.parametrize("wording", ["seen", "held_out"])
def test_real_text_haystacks_hold_one_value_per_needle_and_no_look_alike(filler, wording):
    for seed in range(5):
        task = make_task("niah", 20_000, seed, wording=wording, filler=filler)
        assert len(task.context) == 20_000
        assert solve_niah(task) == task.answer
        found = cheap_answers(task)["every candidate"].split(", ")
        assert len(found) == tasks.default_needles(20_000)   # every value-shaped word is a needle's value
