"""
A scripted teacher: hand-written RLM strategies that play the policy's part in the real
RLM loop, to make token-exact demonstrations for the warm start.

A 135M model does not discover REPL use from reinforcement alone (its first rollouts
write prose, so every reward is 0), and no larger model is available offline to show it
how. So the first lesson comes from a program. `TeacherPolicy` has the policy's
interface (chat_ids, followup_ids, decode, sample); its `sample` reads the conversation
it is given, and writes the next reply. It reads the conversation from its structure, the
messages it keeps beside the ids that its chat_ids and followup_ids made, not from the text
of one chat template, so it works with any model's template. Run through the real
`rlm.RLM`, with the real model's tokenizer and chat template, every demonstration is a
trace like any rollout: exact token ids, real REPL observations, real sub-calls, whose
replies the teacher also writes (it plays every role: root, child RLM, plain sub-call).

What the teacher may know is what a model could know: the system prompt, the query, the
context's description and the observations. It reads the key from the query at run time
and lets the REPL find the answer; the task's ground truth never reaches it.

Strategies differ on purpose in cost and latency, so that RL has something to choose:

  niah      regex        the line with the key, its value read in code; one turn (cheapest)
            look         print the lines with the key; answer from them in a second turn
            guess        the classic frame's regex; when it fails, look instead (recovery)
            window       find the key, llm_query a window around it
            split_async  split in halves, rlm_query both concurrently (asyncio.gather)
            split_sync   the same halves, one rlm_query after the other     (slowest)
  multihop  regex        the agent and relations read from query, the chain followed in code (cheapest)
            look         print the lines about each name, one turn per hop
            llm_chain    llm_query each hop on the lines about the current name
            rlm_chain    rlm_query each hop on the whole context             (dearest)
            slip         regex's program with one slip in it, then, after its error, the chain
                         again with the names copied from the question (recovery; the slipped
                         reply is not learned: forget_first_reply)
  aggregate halves       two halves of the records, llm_query both at once  (fewest calls)
  and pairs chunks_async four chunks of records, llm_query all four at once
            chunks_sync  the same four chunks, one llm_query after the other
            rlm_halves   two halves, a child RLM on each, both at once       (dearest)
  tally     sync         label pieces of 6 notes by llm_query one after another; past one
                         level (24 notes), a child RLM per part of 24, one after another
            async        the same, all at once (llm_query_batched, asyncio.gather)
  source    look, parse, recover, slip (see the source section at the end)

HABITS is the warm start of the recursion experiment (recurse.py): per family, the original
RLM's habit (sync sub-calls; recursion where code suffices) as 80% of the demonstrations and
the efficient strategy as 20% (habit_counts).

Children of split_* and rlm_chain are RLMs that the teacher answers with `regex`; children
of rlm_halves pass their half to one llm_query. The records strategies read the question
from the query: a chunk is asked how many records are about the topic (aggregate count),
their count per topic as JSON (most_common), or who wrote about the topic, and when
(pairs); code adds the counts up or makes the pairs, and FINALs the result. A chunk is
every n-th record (`lines[i::n]`): the same size each, and where a record sits does not
matter to these questions. The teacher also answers those llm_query calls: it reads each
record from the prompt and judges its topic as a sub-model would, by its meaning (here
with the text pools tasks.py draws records from).

A first reply opens with a one-line plan (`# plan: ...`, two wordings per strategy), so
the strategy is chosen in its first tokens. Other surface details (variable names, window
sizes, print style, FINAL in code or as text) vary with the sampling seed, so the student
learns the idea rather than one string.

    python teacher.py --family niah --length 8000 --strategy split_async   # one demonstration, printed

    from teacher import make_demonstrations
    demos = make_demonstrations(policy, ["niah", "multihop", "aggregate", "pairs"], [2000, 8000],
                                per_strategy=8, seed=0)
"""

import ast
import asyncio
import json
import random
import re
import zlib
from dataclasses import dataclass

from realtext import parse_source_query
from rlm import BUDGETS, RLM, Batcher, default_budgets, system_prompt
from tasks import (AGGREGATE_TEXTS, MULTIHOP_QUESTIONS, NIAH_QUESTIONS, TALLY_QUESTIONS, TOPIC_OF, make_task, score,
                   task_seed)

RECORD_STRATEGIES = ("halves", "chunks_async", "chunks_sync", "rlm_halves")
STRATEGIES = {"niah": ("regex", "look", "guess", "window", "split_async", "split_sync"),
              "multihop": ("regex", "look", "llm_chain", "rlm_chain", "slip"),
              "aggregate": RECORD_STRATEGIES,
              "pairs": RECORD_STRATEGIES}
NOT_FOUND = "not found"
SLIP_STRATEGIES = ("slip",)  # their first reply is a slip that demonstrate() keeps out of training
PART_NOTE = " It may not be in this part: then answer 'not found'."  # added to a child's query by split_*
RLM_SYSTEM_START = system_prompt(False, False).split(".")[0]  # how every RLM call's system prompt begins

# What the teacher reads from a query: a niah key, or a multihop chain (agent, relations).
# The teacher reads a niah question as a reader who knows the seen phrasings would: each seen
# question template, with its key as a group. (It never needs the held-out ones: demonstrations
# come from the demo split, which make_task words with seen templates only.)
NIAH_QUERY = re.compile("|".join("^" + re.escape(q).replace(re.escape("{k}"), r"([\w.-]+)")
                                 for q in NIAH_QUESTIONS["seen"]))
CHAIN_QUERY = re.compile("|".join("^" + re.escape(q).replace(re.escape("{path}"), "(.+?)")
                                  for q in MULTIHOP_QUESTIONS["seen"]))
HOP_QUERY = re.compile(r"Who is (.+?)'s (\w+)\?")
CITY_QUERY = re.compile(r"In which city is (.+?)'s safehouse\?")
# Records (aggregate, pairs): what the query asks, and the topics it lists.
COUNT_QUERY = re.compile(r"How many records are about (\w+)\?")
MOST_QUERY = re.compile(r"Which topic do the most records have\?")
PAIRS_QUERY = re.compile(r"List every pair of user ids such that both users have (?:at least one record|a record) "
                         r"about (\w+)( in the same month)?")
TOPICS_QUERY = re.compile(r"one of these topics: ([\w, ]+)\.")

# The question the records strategies ask about one piece of the records (an llm_query on a
# chunk, or a child RLM on a half), by what the root combines: its first line, before the records.
PIECE_ASKS = {
    "count": "How many of these records are about {}? Answer with a number.",
    "tally": "Count these records by topic ({}), as JSON.",
    "users": "Who wrote these records about {}? Answer with the user ids, or none.",
    "months": "Who wrote these records about {}, and when? Answer with lines 'user YYYY-MM', or none.",
}
PIECE_QUERIES = {kind: re.compile(re.escape(ask).replace(re.escape("{}"), r"([\w, ]+)"))
                 for kind, ask in PIECE_ASKS.items()}
RECORD = re.compile(r"Date: (\d{4}-\d\d)-\d\d \|\| User: (\d+) \|\| Text: (.+)")
# Judging a record's topic from its meaning is what a sub-model does; the teacher does it with
# the pools tasks.py draws the texts from (disjoint, so a text has one topic), as a language
# model knows that "the tacos from the truck" are food. It reads the text from the prompt.


@dataclass
class TeacherSample:  # what Policy.sample returns, field for field
    token_ids: list
    logprobs: list
    finish_reason: str


class TeacherPolicy:
    """rlm.SamplingPolicy with scripted replies; tokenizer and template from `policy`.

    The ids of a prompt are the template's business; the teacher keeps each conversation's
    messages beside them: chat_ids records the messages of the ids it makes, sample the reply it
    appended, followup_ids the user turn of the ids it makes. A prompt is then a recorded
    conversation, or a recorded reply followed by recorded followup ids (as rlm.py builds them)."""

    def __init__(self, policy, strategy):
        self.policy, self.strategy = policy, strategy
        self.eos_token_ids = policy.eos_token_ids  # [0]: the end-of-turn id the template writes after a reply
        self.decode = policy.decode
        self._messages = {}   # tuple(prompt ids) -> [(role, content), ...]
        self._replied = {}    # tuple(prompt ids + reply ids) -> the messages with that reply appended
        self._followups = {}  # tuple(followup ids) -> the user turn they hold

    def chat_ids(self, messages):
        ids = self.policy.chat_ids(messages)
        self._messages[tuple(ids)] = [(m["role"], m["content"]) for m in messages]
        return ids

    def followup_ids(self, user_text, ended_with_eos):
        ids = self.policy.followup_ids(user_text, ended_with_eos)
        self._followups[tuple(ids)] = user_text
        return ids

    def messages(self, prompt):
        """The conversation of a prompt made by this teacher's chat_ids, or by a reply of its own + followup_ids."""
        key = tuple(prompt)
        if key not in self._messages:
            for before in sorted(self._replied, key=len, reverse=True):
                if key[:len(before)] == before and key[len(before):] in self._followups:
                    self._messages[key] = self._replied[before] + [("user", self._followups[key[len(before):]])]
                    break
            else:
                raise ValueError("the teacher was given a prompt it did not build: make prompts with its chat_ids "
                                 "and continue them with its replies and its followup_ids, as rlm.RLM does")
        return self._messages[key]

    def sample(self, prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_strings=None, seeds=None):
        samples = []
        for i, prompt in enumerate(prompts):
            seed = seeds[i] if seeds and seeds[i] is not None else zlib.crc32(bytes(str(prompt[-64:]), "utf-8"))
            messages = self.messages(prompt)
            text = reply(messages, self.strategy, random.Random(seed))
            ids = (self.policy.encode(text) + [self.eos_token_ids[0]])[:max_new_tokens]
            finish = "stop" if ids[-1] in self.eos_token_ids else "length"
            said = self.policy.decode([t for t in ids if t not in self.eos_token_ids])
            self._replied[tuple(prompt) + tuple(ids)] = messages + [("assistant", said)]
            samples.append(TeacherSample(ids, [0.0] * len(ids), finish))  # log-probs are unused in cloning
        return samples


def reply(messages, strategy, rng):
    """The next reply for a conversation [(role, content), ...] ending with a user turn."""
    system = next((c for r, c in messages if r == "system"), "")
    users = [c for r, c in messages if r == "user"]
    if not system.startswith(RLM_SYSTEM_START):  # a plain llm_query: read the text and answer
        return read_answer(users[0])
    query = users[0].split("\n\n", 1)[0].removeprefix("Query: ")
    observations = users[1:]
    part = PART_NOTE.strip() in query
    if part:  # a child searching one part: the cheapest way
        strategy = "regex"
    if m := NIAH_QUERY.search(query):
        return niah_turn(first_group(m), observations, strategy, rng, part)
    if parse_source_query(query):
        return source_turn(query, observations, strategy, rng)
    if m := TALLY_QUERY.search(query):
        return tally_turn(first_group(m), observations, strategy, rng)
    if m := CHAIN_QUERY.search(query):
        return chain_turn(*parse_chain(first_group(m)), observations, strategy, rng)
    if m := HOP_QUERY.search(query):  # a child asked for one hop: one search does it
        return code(rng, hop_code(repr(m.group(1)), repr(m.group(2)), rng) + "\nFINAL(name)")
    if m := CITY_QUERY.search(query):
        return code(rng, city_code(repr(m.group(1)), rng))
    if any(p.search(query) for p in PIECE_QUERIES.values()):  # a child asked about one piece of records
        return code(rng, rng.choice(["FINAL(llm_query(query + '\\n' + context))",
                                     "answer = llm_query(query + '\\n' + context)\nFINAL(answer)"]))
    if job := records_job(query):
        return records_turn(*job, observations, strategy, rng)
    return final_reply(NOT_FOUND, rng)  # a query of a form the teacher has no strategy for


def read_answer(prompt):
    """The plain sub-call: the answer to the question on the prompt's first line, from its text."""
    question, _, text = prompt.partition("\n")
    if question == TALLY_ASK.strip():
        return "\n".join(TOPIC_OF.get(note.strip(), "unknown") for note in text.splitlines() if note.strip())
    for kind, pattern in PIECE_QUERIES.items():
        if m := pattern.search(question):
            return read_records(kind, m.group(1), text)
    if m := NIAH_QUERY.search(question):
        return value_near(text, first_group(m)) or NOT_FOUND
    if m := HOP_QUERY.search(question):
        return next_name(text, m.group(1), m.group(2)) or NOT_FOUND
    if m := CITY_QUERY.search(question):
        return city_of(text, m.group(1)) or NOT_FOUND
    return NOT_FOUND


def read_records(kind, topic, text):
    """A sub-model's answer about the records in `text` (one per line): it judges each one's topic."""
    records = [(m.group(1), m.group(2), TOPIC_OF.get(m.group(3).strip())) for m in RECORD.finditer(text)]
    if kind == "count":
        return str(sum(t == topic for _, _, t in records))
    if kind == "tally":
        topics = [t.strip() for t in topic.split(",")]
        return json.dumps({t: n for t in topics if (n := sum(r == t for _, _, r in records))})
    if kind == "users":
        users = list(dict.fromkeys(u for _, u, t in records if t == topic))
        return ", ".join(users) if users else "none"
    seen = list(dict.fromkeys(f"{u} {month}" for month, u, t in records if t == topic))
    return "\n".join(seen) if seen else "none"


def parse_chain(path):
    """"the contact of Agent X's handler" -> ("Agent X", ["handler", "contact"])."""
    outer = []
    while m := re.match(r"the (\w+) of (.+)", path):
        outer.append(m.group(1))
        path = m.group(2)
    agent, first = re.match(r"(.+)'s (\w+)$", path).groups()
    return agent, [first] + outer[::-1]


# -----------------------------------------------------------------------------
# Writing replies, with surface that varies by seed


# A first reply opens with its plan, in one of two wordings: the strategy is chosen at the
# first few tokens and the rest of the reply follows from it, which makes the strategies
# easy to clone apart (no reply that starts as one and ends as another) and gives RL one
# clear decision to reinforce.
PLANS = {
    ("niah", "regex"): ("find the key's line and read its value in code", "one search for the key's line"),
    ("niah", "look"): ("print the lines with the key, then answer", "look at the matching lines first"),
    ("niah", "guess"): ("try the usual pattern, read the lines if it fails", "guess the frame, then look if needed"),
    ("niah", "window"): ("ask a sub-model about the text around the key", "llm_query on a window around the key"),
    ("niah", "split_async"): ("split in halves, child RLMs search both at once",
                              "two child RLMs in parallel, one per half"),
    ("niah", "split_sync"): ("split in halves, child RLMs search one after the other",
                             "two child RLMs in turn, one per half"),
    ("multihop", "regex"): ("follow the chain in code", "one search per hop, all in one go"),
    ("multihop", "look"): ("print the lines about each name, hop by hop", "look at the lines of each hop first"),
    ("multihop", "llm_chain"): ("one llm_query per hop, on the lines about the name",
                                "a sub-model answers each hop from its lines"),
    ("multihop", "rlm_chain"): ("one child RLM per hop", "a child RLM answers each hop"),
    ("aggregate", "halves"): ("count both halves with llm_query at once",
                              "two halves, one llm_query each, concurrently"),
    ("aggregate", "chunks_async"): ("count four chunks with llm_query at once",
                                    "four chunks, one llm_query each, concurrently"),
    ("aggregate", "chunks_sync"): ("count four chunks with llm_query in turn",
                                   "four chunks, one llm_query after another"),
    ("aggregate", "rlm_halves"): ("count both halves with child RLMs at once",
                                  "two child RLMs in parallel, one per half"),
    ("pairs", "halves"): ("users of both halves by llm_query at once",
                          "two halves, one llm_query each, concurrently"),
    ("pairs", "chunks_async"): ("users of four chunks by llm_query at once",
                                "four chunks, one llm_query each, concurrently"),
    ("pairs", "chunks_sync"): ("users of four chunks by llm_query in turn",
                               "four chunks, one llm_query after another"),
    ("pairs", "rlm_halves"): ("users of both halves by child RLMs at once",
                              "two child RLMs in parallel, one per half"),
}


def code(rng, body, plan=None):
    lines = ([f"# plan: {rng.choice(PLANS[plan])}"] if plan else []) + [body]
    return f"```repl\n{chr(10).join(lines)}\n```"


def final_reply(value, rng):
    if rng.random() < 0.5:
        return f"FINAL({value})"
    return code(rng, f"FINAL({value!r})")


def print_lines_code(needle, rng):
    line = rng.choice(["line", "row", "ln"])
    if rng.random() < 0.5:
        return f"for {line} in context.splitlines():\n    if {needle!r} in {line}:\n        print({line})"
    return f"print([{line} for {line} in context.splitlines() if {needle!r} in {line}])"


def pick_found(var, rng):
    """Code that FINALs the first sub-call answer that is not 'not found'."""
    good = rng.choice(["found", "hits", "good"])
    return (f"{good} = [a for a in {var} if {NOT_FOUND!r} not in a.lower()]\n"
            f"FINAL({good}[0] if {good} else {NOT_FOUND!r})")


def first_group(match):
    """The group that matched, of a pattern that ORs several templates (one group each)."""
    return next(g for g in match.groups() if g is not None)


VALUE_WORD = r"[\w,-]*\d[\w,-]*"  # a word with a digit in it: 3141592, KX-3141-QM, 3,141,592


def value_near(text, key):
    """What a reader takes as the key's value from text it printed: on the first line that holds
    the key, the longest word with a digit in it, the key left out. It reads any frame: "The
    code of k is 3141592.", "[k] value=KX-3141-QM", "3,141,592 is the passcode of k". None when
    no line holds the key."""
    line = next((ln for ln in text.splitlines() if key in ln), None)
    words = re.findall(VALUE_WORD, line.replace(key, " ")) if line is not None else []
    return max(words, key=len).strip(",-") if words else None


KEY_WORD = r"\w[\w.-]*\d\w*"  # a key: a word with a digit in it (amber-falcon-42, AmberFalcon42, amber.falcon.42)


def value_code(rng, may_be_absent):
    """value_near as REPL code, the key included: the query's longest word with a digit in it (code
    reads it from `query`, so no key is copied by hand: the student's copies of keys of unfamiliar
    shapes were its commonest mistake), its first line in the context, and on that line the longest
    word with a digit in it, the key left out."""
    line, words = rng.choice(["line", "hit", "row"]), rng.choice(["words", "found", "vals"])
    find = (f"key = max(re.findall(r'{KEY_WORD}', query), key=len)\n"
            f"{line} = next((l for l in context.splitlines() if key in l), '')\n")
    pick = f"{words} = re.findall(r'{VALUE_WORD}', {line}.replace(key, ' '))\n"
    if may_be_absent:
        return find + pick + f"FINAL(max({words}, key=len).strip(',-') if {words} else {NOT_FOUND!r})"
    return find + pick + f"FINAL(max({words}, key=len).strip(',-'))"


def failed(observation):
    """Did a cell's output show an error, or come back empty / None (a search that found nothing)?"""
    text = (observation or "").strip()
    return not text or text in ("None", "[]", "''") or "Error" in text.splitlines()[-1]


def niah_turn(key, observations, strategy, rng, part=False):
    if strategy == "regex" or strategy not in STRATEGIES["niah"]:
        if not observations or part:
            return code(rng, value_code(rng, may_be_absent=part), ("niah", "regex"))
        strategy = "look"  # the one cell failed (no line held the key as written): read instead, never resubmit
    if strategy == "guess" and len(observations) == 1 and not failed(observations[0]):
        return final_reply(observations[0].strip(), rng)  # the usual frame it was: the cell printed the value
    if strategy in ("look", "guess") and observations:
        # Reading what was printed: the value is copied from the observation, not from a frame
        # fixed in advance. After a failed cell, something different: print the key's lines.
        if failed(observations[-1]):
            if len(observations) >= 2 and not failed(observations[-2]):
                return final_reply(NOT_FOUND, rng)
            return code(rng, print_lines_code(key, rng))
        value = value_near(observations[-1], key)
        return final_reply(value, rng) if value else code(rng, print_lines_code(key, rng))
    if strategy == "look":
        return code(rng, print_lines_code(key, rng), ("niah", "look"))
    if strategy == "guess":
        # The habit of a model trained on one wording: the regex of the classic frame. It works
        # when the frame is that one; otherwise the cell fails and the next turn reads instead.
        return code(rng, f"print(re.search(r\"for {key} is (\\d+)\", context).group(1))", ("niah", "guess"))
    if strategy == "window":
        pos, snip, width = rng.choice(["pos", "i", "at"]), rng.choice(["window", "snippet", "text"]), \
            rng.choice([200, 300, 400])
        return code(rng, f"{pos} = context.find({key!r})\n"
                         f"{snip} = context[max(0, {pos} - {width}):{pos} + {width}]\n"
                         f"answer = llm_query(query + '\\n' + {snip})\n"
                         f"FINAL(answer)", ("niah", "window"))
    parts = rng.choice(["parts", "halves", "pieces"])
    split = (f"lines = context.splitlines()\nmid = len(lines) // 2\n"
             f"{parts} = ['\\n'.join(lines[:mid]), '\\n'.join(lines[mid:])]\n")
    # The children get the query with a note that the answer may be absent: a child can tell
    # from its query that it searches one part, and search it the cheapest way.
    split += f"sub = query + {PART_NOTE!r}\n"
    if strategy == "split_async":
        ask = f"answers = await asyncio.gather(*[rlm_query_async(sub, p) for p in {parts}])\n"
        plan = ("niah", "split_async")
    else:
        ask = f"answers = [rlm_query(sub, p) for p in {parts}]\n"
        plan = ("niah", "split_sync")
    return code(rng, split + ask + pick_found("answers", rng), plan)


PERSON = r"[A-Z]\w+ [A-Z]\w+"   # a capitalised pair: every name of a chain; no frame word is one
# A printed list (print([...])) puts several lines on one: a reader takes its items apart.
ITEM_BREAK = re.compile(r"\n|['\"], ['\"]")


def next_name(text, name, relation):
    """A reader's next hop: on the first line with the name and the relation word, the other
    person named (the name itself left out). Reads any frame: "X's handler is Y.", "Y serves as
    X's handler.", "It was Y who acted as handler for X." None when no line has both."""
    line = next((ln for ln in ITEM_BREAK.split(text) if name in ln and relation in ln), None)
    people = re.findall(PERSON, line.replace(name, " ")) if line is not None else []
    return people[0] if people else None


def city_of(text, name):
    """A reader's last hop: on the first line with the name and "safehouse", the last capitalised
    word (the name left out): "The safehouse of X is located in Quito.", "Quito is where X hides"."""
    line = next((ln for ln in ITEM_BREAK.split(text) if name in ln and "safehouse" in ln), None)
    words = re.findall(r"[A-Z]\w+", line.replace(name, " ")) if line is not None else []
    return words[-1] if words else None


def hop_code(name, relation, rng):
    """next_name as REPL code: `name` becomes the next person (name and relation are expressions)."""
    line = rng.choice(["line", "row", "hit"])
    return (f"{line} = next(l for l in context.splitlines() if {name} in l and {relation} in l)\n"
            f"name = re.findall(r'{PERSON}', {line}.replace({name}, ' '))[0]")


def city_code(name, rng, lines="context.splitlines()", line=None):
    """city_of as REPL code, FINAL included: in `lines` (an expression), the line with the name and
    "safehouse", into the variable `line` (a random name unless given)."""
    line = line or rng.choice(["line", "row", "hit"])
    return (f"{line} = next(l for l in {lines} if {name} in l and 'safehouse' in l)\n"
            f"FINAL(re.findall(r'[A-Z]\\w+', {line}.replace({name}, ' '))[-1])")


AGENT = r"Agent \w+ \w+"  # the chain's first name, as every multihop question gives it
# The relations a question names: a word before " of " or after "'s " ("the contact of Agent X's
# handler"), less the words that name the last hop ("the city of the safehouse of ...").
RELATION_WORDS = r"\w+(?= of )|(?<='s )\w+"
LAST_HOP_WORDS = ("city", "safehouse")


def chain_code(rng):
    """The regex strategy's program. The agent and the relations are read from `query` in code (the
    student's copies of names and relations by hand were its commonest mistake); then the chain is
    followed in the context, one hop per relation: the line with the current name and one of the
    relations, taken out of `lines` so that the next hop cannot walk back, and the other person on
    it. Order-free, so it reads a question that names the hops outside in ("the contact of X's
    handler") or inside out ("X's handler's contact"). About 210 tokens."""
    row, rels = rng.choice(["line", "row", "hit"]), rng.choice(["rels", "relations", "asked"])
    return (f"lines = context.splitlines()\n"
            f"name = re.search(r'{AGENT}', query)[0]\n"
            f"{rels} = [w for w in re.findall(r\"{RELATION_WORDS}\", query) if w not in {LAST_HOP_WORDS!r}]\n"
            f"for _ in {rels}:\n"
            f"    {row} = next(l for l in lines if name in l and any(r in l for r in {rels}))\n"
            f"    lines.remove({row})\n"
            f"    name = re.findall(r'{PERSON}', {row}.replace(name, ' '))[0]\n"
            + city_code("name", rng, lines="lines", line=row))


def copied_chain_code(agent, relations, rng):
    """A second way to follow the chain, for after chain_code failed: the agent and the relations
    copied from the question, in the chain's order, one hop per relation (it may walk back where a
    relation word repeats; the first program may not, but it has just failed)."""
    hop = hop_code("name", "rel", rng).replace("\n", "\n    ")
    return f"name = {agent!r}\nfor rel in {relations!r}:\n    {hop}\n" + city_code("name", rng)


def slipped(program, rng):
    """program with one mistake of the kind a sampled student makes, certain to raise: a bracket
    lost at the end of a line (SyntaxError), or a variable of the last line misspelt (NameError).
    The slip strategies open with one, to show what comes after a failed cell."""
    lines = program.split("\n")
    names = [v for v in dict.fromkeys(re.findall(r"^(\w+) = ", program, re.M))
             if re.search(rf"\b{v}\b", lines[-1]) and len(v) > 2]
    if names and rng.random() < 0.5:
        name = rng.choice(names)
        typo = name[0] + name[2] + name[1] + name[3:] if name[1] != name[2] else name[:-1]
        if not re.search(rf"\b{typo}\b", program):
            lines[-1] = re.sub(rf"\b{name}\b", typo, lines[-1], count=1)
            return "\n".join(lines)
    closing = [i for i, line in enumerate(lines) if line.endswith(")")]
    i = rng.choice(closing)
    lines[i] = lines[i][:-1]
    return "\n".join(lines)


def forget_first_reply(rollout):
    """Mark the root's first reply as not sampled, so that training on the demonstration does not
    teach it (the slip), only what follows it; the trace keeps its tokens as context."""
    mask = rollout.calls[0].sampled_mask
    start = mask.index(1)
    end = next((i for i in range(start, len(mask)) if not mask[i]), len(mask))
    mask[start:end] = [0] * (end - start)


def chain_turn(agent, relations, observations, strategy, rng):
    rels = repr(relations)
    if strategy not in STRATEGIES["multihop"]:
        strategy = "regex"
    if strategy in ("regex", "slip"):
        if not observations:
            program = chain_code(rng)
            return code(rng, slipped(program, rng) if strategy == "slip" else program, ("multihop", "regex"))
        if len(observations) == 1:  # the program failed: the chain again, another way; never resubmit
            return code(rng, copied_chain_code(agent, relations, rng))
        strategy = "look"  # that failed too: read the lines
    if strategy == "look":  # one hop per turn, reading each answer from what was printed
        name, seen = agent, "\n".join(observations)
        for rel in relations:
            found = next_name(seen, name, rel)
            if not found:
                return code(rng, print_lines_code(name, rng), None if observations else ("multihop", "look"))
            name = found
        city = city_of(seen, name)
        if city:
            return final_reply(city, rng)
        return code(rng, print_lines_code(name, rng))
    name = rng.choice(["name", "person", "who"])
    if strategy == "llm_chain":
        about = rng.choice(["about", "lines_about", "mentions"])
        return code(rng, f"def {about}(n):\n    return '\\n'.join(l for l in context.splitlines() if n in l)\n"
                         f"{name} = {agent!r}\n"
                         f"for rel in {rels}:\n"
                         f"    {name} = llm_query(f\"Who is {{{name}}}'s {{rel}}? Answer with the name only.\\n\" "
                         f"+ {about}({name}))\n"
                         f"city = llm_query(f\"In which city is {{{name}}}'s safehouse? Answer with the city only.\\n\" "
                         f"+ {about}({name}))\nFINAL(city)", ("multihop", "llm_chain"))
    if strategy == "rlm_chain":
        return code(rng, f"{name} = {agent!r}\n"
                         f"for rel in {rels}:\n"
                         f"    {name} = rlm_query(f\"Who is {{{name}}}'s {{rel}}? Answer with the name only.\", context)\n"
                         f"city = rlm_query(f\"In which city is {{{name}}}'s safehouse? Answer with the city only.\", "
                         f"context)\nFINAL(city)", ("multihop", "rlm_chain"))
    raise AssertionError(strategy)  # every strategy of multihop is handled above


def records_job(query):
    """What a query over records asks, read from its text: (family, what a piece is asked,
    the topic or topics it names), or None for a query of another form."""
    if m := COUNT_QUERY.search(query):
        return "aggregate", "count", m.group(1)
    if MOST_QUERY.search(query) and (m := TOPICS_QUERY.search(query)):
        return "aggregate", "tally", m.group(1)
    if m := PAIRS_QUERY.search(query):
        return "pairs", "months" if m.group(2) else "users", m.group(1)
    return None


def combine_code(kind, replies, rng):
    """Code that combines the pieces' replies (the list `replies`) into the answer, and FINALs it."""
    if kind == "count":
        return f"FINAL(sum(int(re.search(r'\\d+', r).group()) for r in {replies}))"
    if kind == "tally":
        total = rng.choice(["total", "counts", "tally"])
        return (f"{total} = {{}}\n"
                f"for r in {replies}:\n"
                f"    for t, k in json.loads(r).items():\n"
                f"        {total}[t] = {total}.get(t, 0) + k\n"
                f"FINAL(max({total}, key={total}.get))")
    users = rng.choice(["users", "ids", "who"])
    if kind == "users":
        return (f"{users} = sorted({{int(u) for r in {replies} for u in re.findall(r'\\d+', r)}})\n"
                f"FINAL([(a, b) for a in {users} for b in {users} if a < b])")
    return (f"{users} = re.findall(r'(\\d+) (\\S+)', '\\n'.join({replies}))\n"
            f"FINAL(sorted({{(a, b) for a, m in {users} for b, n in {users} if m == n and a < b}}))")


def records_turn(family, kind, topic, observations, strategy, rng):
    """Cut the records into n chunks (four, or two halves: every n-th record), ask each chunk the
    piece question (llm_query one after another or all at once, or a child RLM per half), and
    combine the replies in code."""
    if observations:  # the first turn always FINALs; a second one means it failed
        return final_reply(NOT_FOUND, rng)
    if strategy not in RECORD_STRATEGIES:
        strategy = "halves"
    n = 4 if strategy.startswith("chunks") else 2
    lines, replies = rng.choice(["lines", "records", "rows"]), rng.choice(["replies", "answers", "results"])
    # Every n-th record: n chunks of the same size, and where a record sits does not matter here.
    chunk, loop = f"'\\n'.join({lines}[i::{n}])", f"for i in range({n})"
    head = f"{lines} = context.splitlines()[1:]\n"
    if strategy == "rlm_halves":  # each child RLM is asked the piece question about its half
        head += f"ask = {PIECE_ASKS[kind].format(topic)!r}\n"
        asking = f"{replies} = await asyncio.gather(*[rlm_query_async(ask, {chunk}) {loop}])\n"
    else:  # a prompt is the question, a newline and the chunk's records
        head += f"ask = {PIECE_ASKS[kind].format(topic) + chr(10)!r}\n"
        if strategy == "chunks_sync" and rng.random() < 0.5:
            asking = f"{replies} = [llm_query(ask + {chunk}) {loop}]\n"
        elif strategy == "chunks_sync":
            asking = f"{replies} = []\n{loop}:\n    {replies}.append(llm_query(ask + {chunk}))\n"
        elif rng.random() < 0.5:
            asking = f"{replies} = llm_query_batched([ask + {chunk} {loop}])\n"
        else:
            asking = f"{replies} = await asyncio.gather(*[llm_query_async(ask + {chunk}) {loop}])\n"
    return code(rng, head + asking + combine_code(kind, replies, rng), (family, strategy))


# -----------------------------------------------------------------------------
# Demonstrations through the real RLM loop


@dataclass
class Demonstration:
    family: str
    length: int
    seed: int
    strategy: str
    correctness: float
    rollout: object  # trace.Rollout


async def demonstrate(policy, task, strategy, rlm_settings, seed):
    """One rollout of `task` with the teacher in the policy's place."""
    rlm = RLM(Batcher(TeacherPolicy(policy, strategy), gather_window=0.0), **rlm_settings)
    rollout = await rlm.run(task.query, task.context, seed=seed)
    correctness = score(task, rollout.answer)
    if strategy in SLIP_STRATEGIES:  # only the recovery is learned, and only after a cell that failed
        root = rollout.calls[0]
        correctness *= len(root.turns) > 1 and failed(root.turns[0]["observation"])
        forget_first_reply(rollout)
    return Demonstration(task.family, len(task.context), task.seed, strategy, correctness, rollout)


async def _demonstrate_all(policy, jobs, rlm_settings, max_concurrent):
    limit = asyncio.Semaphore(max_concurrent)  # each rollout holds REPL processes while it runs

    async def one(task, strategy, seed):
        async with limit:
            return await demonstrate(policy, task, strategy, rlm_settings, seed)

    return await asyncio.gather(*[one(*job) for job in jobs])


def make_demonstrations(policy, families, lengths, per_strategy, seed=0, rlm_settings=None, max_concurrent=8,
                        only=None, counts=None):
    """per_strategy correct demonstrations of every strategy of every family, each on its own task
    (from the "demo" split of tasks.task_seed, which no evaluation draws from). Balanced: a strategy whose
    rollout fails on a task is retried on the next task, so each gets the same count.
    only: the (family, strategy) pairs to make, the others skipped (what a rank makes under torchrun).
    counts: {(family, strategy): n} instead of per_strategy for each (habit_counts); pairs absent: none."""
    rlm_settings = rlm_settings or BUDGETS["cpu"]
    demos = []
    for family in families:
        for s_index, strategy in enumerate(STRATEGIES[family]):
            if only is not None and (family, strategy) not in only:
                continue
            per_strategy_here = per_strategy if counts is None else counts.get((family, strategy), 0)
            kept, attempt = [], 0
            while len(kept) < per_strategy_here and attempt < 3 * per_strategy_here:
                need = per_strategy_here - len(kept)
                jobs = []
                for k in range(attempt, attempt + need):
                    length = lengths[k % len(lengths)]
                    task = make_task(family, length, seed=task_seed("demo", family, length, f"{seed}/{s_index}/{k}"))
                    jobs.append((task, strategy, task.seed))
                attempt += need
                results = asyncio.run(_demonstrate_all(policy, jobs, rlm_settings, max_concurrent))
                kept += [d for d in results if d.correctness == 1.0]
            if len(kept) < per_strategy_here:
                raise RuntimeError(f"the teacher's {family}/{strategy} strategy solved only {len(kept)} of "
                                   f"{attempt} tasks; raise the rollout budgets (max_new_tokens, "
                                   f"max_generated_tokens, max_sub_calls) so the strategy fits")
            demos += kept
    return demos


def main(argv=None):
    import argparse
    import sys

    from lora import ChatTokens, load_tokenizer
    from trace import format_rollout

    parser = argparse.ArgumentParser(description="Print one teacher demonstration.")
    parser.add_argument("--family", default="niah", choices=list(STRATEGIES))
    parser.add_argument("--strategy", default="regex",
                        help="; ".join(f"{family}: {', '.join(names)}" for family, names in STRATEGIES.items()))
    parser.add_argument("--length", type=int, default=8000,
                        help="context length in characters (each family has a minimum, about 500 to 1,400)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.strategy not in STRATEGIES[args.family]:
        sys.exit(f"teacher.py: {args.family} has no strategy {args.strategy!r}; choose from "
                 f"{', '.join(STRATEGIES[args.family])}")
    try:
        task = make_task(args.family, args.length, seed=args.seed)
    except ValueError as e:
        sys.exit(f"teacher.py: --length: {e}")
    policy = ChatTokens(load_tokenizer())  # the teacher writes every reply: no model runs, none loads
    settings = default_budgets()
    if args.family == "tally":  # its strategies plan around per-call limits: recurse.py's rollouts
        from recurse import ROLLOUTS

        settings.update(ROLLOUTS)
    demo = asyncio.run(demonstrate(policy, task, args.strategy, settings, args.seed))
    print(format_rollout(demo.rollout, max_chars=2000))
    print(f"correctness: {demo.correctness}")



# -----------------------------------------------------------------------------
# The source family (realtext.py): questions about one function of real stdlib code
#
#   look     print the function's signature; answer from it in a second turn
#   parse    cut the signature at top-level commas in the REPL, FINAL in one turn   (cheapest)
#   recover  a narrow one-line regex first; after its error, print the 400 characters from
#            `def NAME(` and answer from them, as look does (never the failed cell again)
#   slip     parse's program with one slip in it (slipped), then, after its error, parse's own
#            fallback: print from `def NAME(` and answer from what was printed. The slipped reply
#            is context, not taught (forget_first_reply): the student learns the recovery
#
# The REPL may not import ast, so `parse` reads the signature with regexes, as
# realtext.read_signature does (source tasks only ask about signatures these read as ast does);
# the teacher itself reads printed signatures with ast, as a model reads code.

SOURCE_STRATEGIES = ("look", "parse", "recover", "slip")
PLANS.update({
    ("source", "look"): ("print the signature, then answer", "look at the def line first"),
    ("source", "parse"): ("split the signature at top-level commas", "parse the def line in code"),
    ("source", "recover"): ("a one-line regex, and look if it fails", "try a simple regex on the def line first"),
})


def source_turn(query, observations, strategy, rng):
    """The next reply of the root of a source task, from its query and the observations so far."""
    asked = parse_source_query(query)
    if asked is None:
        return final_reply(NOT_FOUND, rng)
    kind, name, param = asked
    if strategy in ("parse", "slip") or strategy not in SOURCE_STRATEGIES:
        if not observations:
            program = signature_parse_code(kind, rng)
            return code(rng, slipped(program, rng) if strategy == "slip" else program, ("source", "parse"))
        strategy = "recover"  # its one cell failed: print the def line and answer from it, never resubmit
    if strategy == "look":
        if not observations:
            return code(rng, print_signature_code(name, rng), ("source", "look"))
        return answer_from_signature(kind, name, param, observations[-1], rng)
    if not observations:  # recover: a narrow attempt that FINALs when it matches
        return code(rng, narrow_code(kind, name, param), ("source", "recover"))
    if len(observations) == 1:  # it failed (a success would have ended the rollout): look around
        at, width = rng.choice(["i", "at", "start"]), 400
        return code(rng, f"{at} = context.find('def {name}(')\nprint(context[{at}:{at} + {width}])")
    return answer_from_signature(kind, name, param, observations[-1], rng)


def print_signature_code(name, rng):
    at = rng.choice(["i", "at", "start"])
    if rng.random() < 0.5:  # up to the end of the signature
        return (f"{at} = context.find('def {name}(')\n"
                f"ends = [k for k in (context.find('):', {at}), context.find(') ->', {at})) if k > {at}]\n"
                f"print(context[{at}:min(ends + [{at} + 400]) + 2])")
    return f"{at} = context.find('def {name}(')\nprint(context[{at}:{at} + {rng.choice([320, 400])}])"


def signature_parse_code(kind, rng):
    """Code that reads the function's name from `query` rather than a copy by hand: the first word of
    the question that the context defines once, at the top level, as every source question's
    function is (the question's own words, "name" or "value", are defined in long contexts too,
    mostly as methods or more than once: this rule picks the asked function in 238 of 240 tasks
    of 128,000-512,000 characters, the first word defined anywhere in 223), then its signature with two regexes (up
    to the first ")" then ":" or "-> type:"), cut at the commas that no bracket encloses. A default
    question's parameter is read from `query` too: its first word that names a parameter with a
    default."""
    sig, ps = rng.choice(["sig", "signature", "s"]), rng.choice(["ps", "parts", "pieces"])
    names = rng.choice(["names", "params"])
    walk = ("name = next(w for w in re.findall(r'\\w+', query)\n"
            "            if context.count(f'def {w}(') == 1 and re.search(rf'^(async )?def {w}\\(', context, re.M))\n"
            f"{sig} = re.search(r\"\\((.*?)\\)(?: ->[^:\\n]*)?:\", context[context.find(f'def {{name}}('):], re.S)[1]\n"
            f"{ps} = [x for x in re.split(r\",(?![^(\\[{{]*[)\\]}}])\", {sig}) if re.search(r'\\w', x)]\n"
            f"{names} = [re.match(r'\\W*(\\w+)', x)[1] for x in {ps}]\n")
    if kind == "default":
        return walk + (f"defaults = {{n: x.split('=', 1)[1].strip() for n, x in zip({names}, {ps}) if '=' in x}}\n"
                       f"FINAL(next(defaults[w] for w in re.findall(r'\\w+', query) if w in defaults))")
    return walk + {"first_param": f"FINAL({names}[0])", "n_params": f"FINAL(len({names}))",
                   "params": f"FINAL({names})"}[kind]


def narrow_code(kind, name, param):
    """One regex that assumes a one-line signature of plain names: it fails (an error) otherwise."""
    if kind == "first_param":
        return f'FINAL(re.search(r"def {name}\\((\\w+)[,)]", context).group(1))'
    plain = f're.findall(r"\\w+", re.search(r"def {name}\\(([\\w, ]*)\\)", context).group(1))'
    if kind == "n_params":
        return f"FINAL(len({plain}))"
    if kind == "params":
        return f"FINAL({plain})"
    return (f"FINAL(re.search(r\"def {name}\\([^)\\n]*?\\b{param}=(\\w+|'[^'\\n]*'|\\\"[^\\\"\\n]*\\\")[,)]\", "
            f"context).group(1))")


def read_printed_signature(name, text):
    """(ast.FunctionDef, its source) of `def NAME(...)` as printed in text, or None: cut at the
    first ")" that makes it parse."""
    start = text.find(f"def {name}(")
    if start < 0:
        return None
    for end in (i for i, c in enumerate(text) if c == ")" and i > start):
        source = text[start:end + 1] + ": pass"
        try:
            return ast.parse(source).body[0], source
        except SyntaxError:
            continue
    return None


def answer_from_signature(kind, name, param, observation, rng):
    found = read_printed_signature(name, observation)
    if found is None:
        return final_reply(NOT_FOUND, rng)
    node, source = found
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args] + ([a.vararg.arg] if a.vararg else []) + \
        [p.arg for p in a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
    if kind == "first_param":
        return final_reply(names[0], rng)
    if kind == "n_params":
        return final_reply(len(names), rng)
    if kind == "params":
        return final_reply(names, rng)
    positional = a.posonlyargs + a.args
    defaults = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults):]], a.defaults))
    defaults.update((p.arg, d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)
    if param not in defaults:
        return final_reply(NOT_FOUND, rng)
    value = ast.get_source_segment(source, defaults[param])
    if "(" in value or ")" in value:  # FINAL(...) in text ends at its matching ")": pass it in code
        return code(rng, f"FINAL({value!r})")
    return final_reply(value, rng)


STRATEGIES["source"] = SOURCE_STRATEGIES



# -----------------------------------------------------------------------------
# The tally family: count the notes about a topic under per-call limits (rlm.RLM's
# max_call_sub_calls, max_prompt_chars, stated in the system prompt), where recursion is necessary
#
#   sync   sub-calls one after another, the original RLM's habit             (slowest)
#   async  the same sub-calls all at once (llm_query_batched, asyncio.gather)
#
# Both read the context's size from the prompt. When one level can cover the notes (at most
# TALLY_PIECES pieces of TALLY_NOTES notes), the call labels each piece with one llm_query and
# counts the labels in code; when it cannot, it hands parts of TALLY_PIECES * TALLY_NOTES notes to
# child RLMs (a list of notes each), which do the same on their part, and adds their counts up.

TALLY_STRATEGIES = ("sync", "async")
TALLY_QUERY = re.compile("|".join(re.escape(q).replace(re.escape("{label}"), r"(\w+)")
                                  for q in TALLY_QUESTIONS["seen"]))
TALLY_ASK = "Give the topic of each note, one per line.\n"  # a piece's llm_query: this line, then its notes
TALLY_NOTES = 6        # notes per llm_query: 6 of the longest note and TALLY_ASK fit in 800 characters
TALLY_PIECES = 4       # sub-calls per call (the experiment's max_call_sub_calls)
TALLY_PROMPT_CHARS = 800  # characters per llm_query prompt (the experiment's max_prompt_chars)
TALLY_LIMITS = dict(max_call_sub_calls=TALLY_PIECES, max_prompt_chars=TALLY_PROMPT_CHARS)  # rlm.RLM's per-call limits
TALLY_ONE_LEVEL = 1600  # characters of a str context below which one level surely covers it (24 notes): drills' sizes


def tally_turn(label, observations, strategy, rng):
    """The first (and only) reply of a tally call. One program at every size and level: the code
    reads how many notes it holds, labels them in pieces of TALLY_NOTES when one level of sub-calls
    covers them, and otherwise hands parts of TALLY_NOTES * TALLY_PIECES notes to child RLMs (which
    run the same program on their part). Depth is thus chosen by code that reads the input, not by
    the model guessing from the size its prompt states; sync and async differ in the two lines that ask."""
    if observations:  # the first reply always FINALs; a second turn means it failed
        return final_reply(NOT_FOUND, rng)
    sync = (strategy if strategy in TALLY_STRATEGIES else "sync") == "sync"
    cover = TALLY_NOTES * TALLY_PIECES  # notes one level of sub-calls covers
    # One line per step, and the strategies part at the first token after `replies =` (twice): a
    # warm start that saw the minority strategy samples it at about its share there, which RL can move.
    lines = ["notes = context if isinstance(context, list) else context.splitlines()[1:]",
             f"if len(notes) <= {cover}:",
             f"    ask = {TALLY_ASK!r}",
             f"    prompts = [ask + '\\n'.join(notes[i:i + {TALLY_NOTES}]) for i in range(0, len(notes), {TALLY_NOTES})]",
             "    replies = [llm_query(p) for p in prompts]" if sync else "    replies = llm_query_batched(prompts)",
             f"    FINAL(sum(r.split().count({label!r}) for r in replies))",
             f"parts = [notes[i:i + {cover}] for i in range(0, len(notes), {cover})]",
             "replies = [rlm_query(query, p) for p in parts]" if sync
             else "replies = await asyncio.gather(*[rlm_query_async(query, p) for p in parts])",
             "FINAL(sum(int(re.search(r'\\d+', r).group()) for r in replies))"]
    return code(rng, "\n".join(lines))


STRATEGIES["tally"] = TALLY_STRATEGIES

# The original RLM's habits as the majority of a warm start (HABITS), the efficient strategies a
# minority (share EFFICIENT_SHARE): sub-calls one after another, recursion where code suffices (child
# RLMs on halves of a niah context, an llm_query per multihop hop). RL from it has slower and
# cheaper ways to choose between, each of which the warm-started policy samples.
EFFICIENT_SHARE = 0.2
HABITS = {"tally": ("sync", "async"), "niah": ("split_sync", "regex"), "multihop": ("llm_chain", "regex")}


def habit_counts(families, demos_per_family):
    """{(family, strategy): demonstrations} of the habit mix: per family, round(EFFICIENT_SHARE * n)
    (at least 1, when n is) of the efficient strategy, the rest of the habit."""
    counts = {}
    for family in families:
        habit, efficient = HABITS[family]
        k = min(demos_per_family, max(1, round(EFFICIENT_SHARE * demos_per_family)))
        counts[(family, habit)], counts[(family, efficient)] = demos_per_family - k, k
    return counts


def label_drills(policy, n, seed=0):
    """n demonstrations of the tally sub-model's job alone: a plain completion whose prompt is
    TALLY_ASK and 1 to TALLY_NOTES notes (drawn from "demo" tasks), and whose reply is their topics,
    one per line. Each is a one-call rollout (kind llm_query), token-exact like any other: the
    prompt's ids from the chat template, the reply's ids sampled by the teacher. Labelling is the
    skill every tally rollout rests on, and its rows are short (about 150 tokens), so drilling it
    costs far less than more whole demonstrations, whose RLM calls carry the system prompt."""
    from trace import Call, Cost, Rollout

    drills = []
    for i in range(n):
        rng = random.Random(f"{seed}/drill/{i}")
        task = make_task("tally", 3000, seed=task_seed("demo", "tally", 3000, f"drill/{seed}/{i}"))
        notes = task.context.splitlines()[1:]
        start = rng.randrange(len(notes))
        prompt = TALLY_ASK + "\n".join(notes[start:start + rng.randint(1, TALLY_NOTES)])
        answer = read_answer(prompt)
        reply_ids = policy.encode(answer) + [policy.eos_token_ids[0]]
        call = Call(id=0, parent=None, kind="llm_query", depth=1, query=prompt, answer=answer)
        call.append(policy.chat_ids([{"role": "user", "content": prompt}]), False)
        call.append(reply_ids, True)
        call.cost = Cost(prompt_tokens=len(call.token_ids) - len(reply_ids), generated_tokens=len(reply_ids),
                         depth=1, critical_path_tokens=len(reply_ids))
        drills.append(Demonstration("tally", len(task.context), task.seed, "label", 1.0,
                                    Rollout(prompt, answer, [call], call.cost, len(reply_ids))))
    return drills


def root_drills(policy, n, max_length, seed=0, rlm_settings=None):
    """n demonstrations of a tally root's one reply alone: the teacher's whole rollout is made (its
    sub-model labels every note right) and only the root call is kept, token-exact. The root's code
    holds both choices: how deep (its `if len(notes) <= ...` reads the input; the drills' lengths
    alternate between the two sides of TALLY_ONE_LEVEL, uniform on each up to max_length, so both
    branches run) and whether the sub-calls run one after another or at once (the habit mix: every
    1/EFFICIENT_SHARE-th drill async). A root row is about a tenth of a whole
    demonstration's tokens (no child or sub-model rows). Made from the "demo" split alone."""
    from trace import Rollout

    rlm_settings = rlm_settings or {**BUDGETS["cpu"], **TALLY_LIMITS}
    every = round(1 / EFFICIENT_SHARE)
    jobs = []
    for i in range(n):
        rng = random.Random(f"{seed}/root/{i}")
        length = rng.randint(1000, TALLY_ONE_LEVEL) if i % 2 == 0 else rng.randint(TALLY_ONE_LEVEL + 1, max_length)
        task = make_task("tally", length, seed=task_seed("demo", "tally", length, f"root/{seed}/{i}"))
        jobs.append((task, "async" if i % every == every - 1 else "sync", task.seed))
    demos = asyncio.run(_demonstrate_all(policy, jobs, rlm_settings, max_concurrent=8))
    drills = []
    for d in demos:
        root = d.rollout.calls[0]
        drills.append(Demonstration("tally", d.length, d.seed, d.strategy, d.correctness,
                                    Rollout(d.rollout.query, root.answer, [root], root.cost,
                                            d.rollout.max_generated_tokens)))
    return drills


if __name__ == "__main__":  # after every family is registered, tally included
    main()
