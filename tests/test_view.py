"""view.py on a real rollout of the scripted policy: depth 2, concurrent sub-calls, a failed
sub-call, a traceback, a REPL restart, and hostile model output."""

import asyncio
import dataclasses
import json
import random
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

import eval as evaluation
import view
from rlm import RLM, Batcher
from scripted import EOS, NEEDLE_SOLVER, ScriptedPolicy, ScriptedSample, parse, repl_block
from trace import Call, Cost, Rollout, critical_calls, heaviest_chain, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]   # the scripts run from here, whatever the working directory

HOSTILE = "</script><script>alert(1)</script><img src=x onerror=alert(2)>"
LONG_LINE = "L" * 30_000
ROOT_TURNS = [
    repl_block("a = llm_query('first')\n"
               "b, c = await asyncio.gather(rlm_query_async('child one', context[:40]),\n"
               "                            rlm_query_async('child two', context[40:]))\n"
               "print(a, b, c)"),
    repl_block("try:\n    llm_query('bad')\nexcept Exception as e:\n    print('caught:', e)\n1 / 0"),
    repl_block("import random\nrandom._os._exit(3)"),
    f"Done. {HOSTILE} bytes: \udcff\udcfe\n{LONG_LINE}\n" + repl_block("print(llm_query('hostile'))\nFINAL('done')"),
]
REPLIES = {"child one": repl_block("FINAL(rlm_query('grandchild', context[:10]))"),
           "child two": repl_block("r = await asyncio.gather(llm_query_async('leaf a'), llm_query_async('leaf b'))\n"
                                   "FINAL(len(r[0]) + len(r[1]))"),
           "grandchild": repl_block("FINAL(context[:3])"),
           "first": "one", "leaf a": "x" * 300, "leaf b": "y", "hostile": HOSTILE}


def script(text):
    p = parse(text)
    if p["query"] == "bad":
        raise ValueError("the model broke on this prompt")
    return ROOT_TURNS[p["turn"]] if p["query"] == "root" else REPLIES[p["query"]]


# Gathered pairs. Whether two gathered calls overlap in time depends on whether the second is asked
# before the first is served, that is on thread timing, unless the policy makes it so (below).
TWINS = {"child one": "child two", "child two": "child one", "leaf a": "leaf b", "leaf b": "leaf a"}


class AskingBatcher(Batcher):
    """A Batcher that notes the query of every request, as it arrives (before any batching)."""

    def __init__(self, policy, **kwargs):
        super().__init__(policy, **kwargs)
        self.asked = set()
        policy.batcher = self

    async def sample(self, prompt_ids, max_new_tokens, seed=None):
        self.asked.add(parse(self.policy.decode(prompt_ids))["query"])
        return await super().sample(prompt_ids, max_new_tokens, seed)


class RawBytesPolicy(ScriptedPolicy):
    """Replies may hold bytes that are not UTF-8, as a real tokenizer's pieces can: '\\udcff' is byte 0xff.

    A call of a gathered pair is served only once its twin has been asked (the model runs in a worker
    thread, so the twin's request still arrives meanwhile), and then 20 ms later: each of the two
    started before the other ended, on the logical clock and by at least 20 ms of wall time (time.sleep
    never returns early), on any machine. A waiting limit of 60 s makes a broken run fail, not hang."""

    batcher = None

    def sample(self, prompts, max_new_tokens=256, **_):
        self.batch_sizes.append(len(prompts))
        twins = {TWINS[q] for q in (parse(self.decode(p))["query"] for p in prompts) if q in TWINS}
        if twins and self.batcher is not None:
            deadline = time.monotonic() + 60
            while not twins <= self.batcher.asked and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.02)
        samples = []
        for p in prompts:
            ids = ([b + 1 for b in self.script(self.decode(p)).encode("utf-8", "surrogateescape")] + [EOS])[:max_new_tokens]
            samples.append(ScriptedSample(ids, [-0.5] * len(ids), "stop"))
        return samples


@pytest.fixture(scope="module")
def rollout():
    rlm = RLM(AskingBatcher(RawBytesPolicy(script), gather_window=0.005), max_depth=2, max_turns=6,
              max_new_tokens=100_000, max_generated_tokens=1_000_000, max_call_tokens=1_000_000)
    return asyncio.run(rlm.run("root", "abcdefghij" * 10))


class Page(HTMLParser):
    """Every element with its attributes, the scripts, and each piece of text with the elements around it."""

    VOID = {"meta", "br", "img", "input", "hr", "link"}

    def __init__(self, text):
        super().__init__()
        self.elements, self.scripts, self.texts, self.stack = [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.stack and self.stack[-1][0] == "script":
            self.scripts.append(data)
        self.texts.append((data, list(self.stack)))

    def text(self):
        return "".join(t for t, _ in self.texts)

    def ids(self):
        return {a["id"] for _, a in self.elements if "id" in a}

    def bars(self, clock="logical"):
        """call id -> (left, right) in percent of the track, as drawn, from the timeline of that clock."""
        bars, inside = {}, False
        for tag, a in self.elements:
            if tag == "div" and a.get("class") == "timeline":
                inside = a["data-clock"] == clock
            if inside and tag == "a" and "bar" in a.get("class", ""):
                left, width = map(float, re.findall(r"[\d.]+", a["style"]))
                bars[int(a["data-call"])] = (left, left + width, "crit" in a["class"])
        return bars


def overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]


def test_the_scripted_rollout_has_what_the_page_must_show(rollout):
    queries = [c.query for c in rollout.calls]
    assert rollout.answer == "done" and rollout.cost.depth == 2
    assert {"child one", "child two", "grandchild", "leaf a", "leaf b", "bad", "hostile"} <= set(queries)
    observations = " ".join(t["observation"] or "" for t in rollout.calls[0].turns)
    assert "caught:" in observations and "ZeroDivisionError" in observations and "restarted" in observations


def test_every_call_turn_and_sub_call_is_on_the_page(rollout):
    page = Page(view.render_page([rollout]))
    ids, text = page.ids(), page.text()
    links = {a["href"] for tag, a in page.elements if tag == "a" and "href" in a}
    for call in rollout.calls:
        assert f"r0c{call.id}" in ids and f"#r0c{call.id}" in links
        assert call.query in text
        if call.kind != "llm_query":
            for i, turn in enumerate(call.turns):
                assert f"r0c{call.id}t{i}" in ids
                assert (turn["observation"] or "") in text
    for needle in ("caught: llm_query failed: ValueError: the model broke on this prompt", "ZeroDivisionError", "exit code 3", "restarted",
                   "failed: no answer returned", "llm_query('first')"):
        assert needle in text
    # code blocks are highlighted as code: the API names and keywords get their own spans
    assert any(tag == "span" and a.get("class") == "a" for tag, a in page.elements)
    assert sum(tag == "pre" and a.get("class") == "code" for tag, a in page.elements) >= 4


def test_concurrent_calls_overlap_in_the_timeline_and_sequential_ones_do_not(rollout):
    by_query = {c.query: c.id for c in rollout.calls}
    # What the code did, whatever the timing: the gathered pairs did not wait for each other, and both
    # children waited for `a = llm_query('first')`.
    records = {s["call"]: s for c in rollout.calls for t in c.turns for s in t["sub_calls"]}
    assert records[by_query["child one"]]["after"] == records[by_query["child two"]]["after"] == [by_query["first"]]
    assert records[by_query["leaf a"]]["after"] == records[by_query["leaf b"]]["after"] == []
    for clock in ("logical", "wall"):
        bars = Page(view.render_page([rollout])).bars(clock)
        first, one, two = bars[by_query["first"]], bars[by_query["child one"]], bars[by_query["child two"]]
        leaf_a, leaf_b = bars[by_query["leaf a"]], bars[by_query["leaf b"]]
        # gathered, and (RawBytesPolicy sees to it) each asked before the other was served: drawn overlapping
        assert overlap(one, two) and overlap(leaf_a, leaf_b)
        if clock == "logical":  # wall time on a busy machine may round two events to the same instant
            assert not overlap(first, one) and not overlap(first, two)  # `a = llm_query(...)` ended before
            assert two[0] <= leaf_a[0] and leaf_a[1] <= two[1]  # a child's calls lie within its bar
    assert by_query["bad"] not in Page(view.render_page([rollout])).bars()  # failed: no clock record, no bar


def test_the_critical_path_is_marked_and_adds_up_to_the_rollouts_latency(rollout):
    critical = critical_calls(rollout)
    own = {c.id: sum(c.sampled_mask) for c in rollout.calls}
    assert sum(own[i] for i in critical) == rollout.cost.critical_path_tokens
    by_query = {c.query: c.id for c in rollout.calls}
    assert {by_query[q] for q in ("root", "first", "child two", "leaf a")} <= critical
    assert not {by_query[q] for q in ("child one", "leaf b", "grandchild")} & critical
    bars = Page(view.render_page([rollout])).bars()
    assert {i for i, (_, _, crit) in bars.items() if crit} == critical


def test_the_heaviest_chain_is_a_chain_and_no_chain_is_heavier():
    def chains(after, i):  # every chain that ends with call i, by brute force
        return [[i]] + [c + [i] for j in after[i] for c in chains(after, j)]

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 8)
        weights = [rng.randint(1, 9) for _ in range(n)]
        after = [sorted(rng.sample(range(i), rng.randint(0, i))) for i in range(n)]
        chain = heaviest_chain(weights, after)
        assert all(a in after[b] for a, b in zip(chain, chain[1:]))  # each waited for the one before
        heaviest = max((sum(weights[k] for k in c) for i in range(n) for c in chains(after, i)), default=0)
        assert sum(weights[i] for i in chain) == heaviest


def two_gathered_calls_whose_bars_do_not_overlap(with_after):
    """A trace by hand: the root gathered #1 and #2, and #1 happened to end before #2 started."""
    def call(i, parent, kind, generated, sub_calls=()):
        return Call(id=i, parent=parent, kind=kind, depth=int(i > 0), query=f"q{i}", token_ids=[5] * generated,
                    sampled_mask=[1] * generated, turns=[{"reply": "r", "code": [], "observation": None,
                                                          "sub_calls": list(sub_calls)}],
                    cost=Cost(generated_tokens=generated, critical_path_tokens=generated))
    subs = [{"fn": "llm_query", "call": 1, "start": 1, "end": 2}, {"fn": "llm_query", "call": 2, "start": 3, "end": 4}]
    if with_after:
        subs = [{**s, "after": []} for s in subs]
    calls = [call(0, None, "root", 10, subs), call(1, 0, "llm_query", 3), call(2, 0, "llm_query", 7)]
    return Rollout("q0", "a", calls, Cost(), 100)


def test_the_critical_path_follows_what_waited_for_what_not_the_clock(tmp_path):
    rollout = two_gathered_calls_whose_bars_do_not_overlap(with_after=True)
    assert critical_calls(rollout) == {0, 2}  # gathered: only the heavier one
    bars = Page(view.render_page([rollout])).bars()
    assert bars[1][1] <= bars[2][0]  # though on the clock one ended before the other started
    assert {i for i, (_, _, crit) in bars.items() if crit} == {0, 2}
    # A trace written before "after" existed: the clock is all there is, and it makes a chain.
    write_jsonl([two_gathered_calls_whose_bars_do_not_overlap(with_after=False)], tmp_path / "old.jsonl")
    [old] = read_jsonl(tmp_path / "old.jsonl")
    assert critical_calls(old) == {0, 1, 2}
    assert "waited for" not in Page(view.render_page([old])).text()


def test_the_page_says_which_sub_calls_each_one_waited_for(rollout):
    by_query = {c.query: c.id for c in rollout.calls}
    text = Page(view.render_page([rollout])).text()
    # `a = llm_query('first')` came back before the two children were asked for
    assert len(re.findall(rf"waited for #{by_query['first']}(?!\d)", text)) == 2


def test_hostile_model_output_shows_as_text_and_never_as_markup(rollout):
    source = view.render_page([rollout])
    page = Page(source)
    assert page.scripts == [view.SCRIPT]  # the page's own script, nothing from the model
    assert [tag for tag, _ in page.elements].count("script") == 1
    assert not any(tag == "img" for tag, _ in page.elements)
    assert not [(tag, k) for tag, a in page.elements for k in a if k.lower().startswith("on")]
    assert f"script-src 'sha256-{view.SCRIPT_HASH}'" in source  # and the browser would refuse any other
    text = page.text()
    assert HOSTILE in text and "\ufffd\ufffd" in text  # shown as written; bytes that are not UTF-8 as U+FFFD
    long_pieces = [(t, stack) for t, stack in page.texts if LONG_LINE in t]
    assert long_pieces  # kept whole
    for _, stack in long_pieces:  # and folded: inside a closed <details>
        assert any(tag == "details" and a.get("class") == "fold" and "open" not in a for tag, a in stack)


def test_any_string_in_a_trace_is_written_as_valid_utf8_and_shown(rollout, tmp_path):
    d = dataclasses.asdict(rollout)
    d["calls"][0]["turns"][0]["reply"] = "lone \udcff surrogate, NUL \x00, escape \x1b[31m, override \u202e"
    path = view.write_html([d], str(tmp_path / "page.html"))
    text = Page(open(path, "rb").read().decode("utf-8")).text()  # strict: raises if not UTF-8
    assert "lone \\udcff surrogate, NUL \\x00, escape \\x1b[31m, override \\u202e" in text


def test_index_of_eval_records_and_the_command_line(rollout, tmp_path):
    suite = evaluation.held_out_suite(["niah"], [2000], n=1, start=7)
    solver = NEEDLE_SOLVER
    policy = ScriptedPolicy(lambda text: solver if parse(text)["kind"] == "rlm" else "1234567")
    records = asyncio.run(evaluation.evaluate(Batcher(policy), suite, ["rlm", "direct"], {"max_new_tokens": 512},
                                              progress=False, keep_traces=True))
    assert [r["trace"] is not None for r in records] == [True, False]  # direct has no call tree
    path = tmp_path / "eval_traces.jsonl"
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "trace": r["trace"] and dataclasses.asdict(r["trace"])}) + "\n")
    samples = tmp_path / "samples.jsonl"
    write_jsonl([rollout], samples)
    out = tmp_path / "page.html"
    result = subprocess.run([sys.executable, str(ROOT / "view.py"), str(path), str(samples), "-o", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    page = Page(out.read_text())
    text = page.text()
    truth = str(records[0]["truth"])
    assert f"method rlm · family niah · length 2,000 · seed {records[0]['seed']}" in text
    assert text.count(truth) >= 2 and "1.00" in text and "0.00" in text  # truth; right and wrong
    assert f"{records[0]['reward']:.3f}" in text
    assert "(no trace)" in text  # the direct record is listed, without a tree
    assert {"r0", "r2"} <= page.ids() and "r1" not in page.ids()  # sections for the traced items only
    assert "—" in text  # the samples.jsonl rollout has no truth, correctness or reward


def test_rlm_script_writes_a_page_with_html(tmp_path, tiny_policy):
    model_dir = tmp_path / "model"
    tiny_policy.model.get_base_model().save_pretrained(model_dir)
    tiny_policy.tokenizer.save_pretrained(model_dir)
    (tmp_path / "notes.txt").write_text("The key is 42. " * 200)
    out = tmp_path / "trace.html"
    result = subprocess.run(
        [sys.executable, str(ROOT / "rlm.py"), "--model", str(model_dir), "--query", "What is the key?", "--context",
         str(tmp_path / "notes.txt"), "--max-turns", "1", "--max-new-tokens", "16", "--html", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    page = Page(out.read_text())
    assert "r0c0" in page.ids() and "What is the key?" in page.text()
