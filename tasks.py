"""
Seeded, verifiable long-context tasks of any length, and their scorers.

Six families, most modelled on a benchmark that RLMs are measured on:

  niah       one or more needles ("The special magic number for amber-falcon-42 is
             3141592.") hidden in distractor text, optionally with near-identical decoy
             keys (RULER's needle-in-a-haystack tasks).
  aggregate  one record per line (date, user id, short text); count the records about a
             topic, or name the most frequent topic. The topic is never written in the
             text, it has to be judged from its meaning, so every line must be read
             (OOLONG). Sub-calls on chunks are the natural strategy.
  pairs      the same records; list every pair of users that satisfy a condition, scored
             by F1 over unordered pairs (OOLONG-Pairs, a quadratic variant).
  multihop   chained facts ("Agent X's handler is Y." ... "Y's safehouse is in Z.")
             scattered through distractor text, among other chains of the same shape.
  source     a question about one function of real Python source code (its first parameter,
             how many parameters it takes, a default value): the context is files of the
             standard library of the Python that runs this (realtext.py).
  tally      one short note per line; count the notes about a topic. The topic is judged from
             the meaning (no code can), and under rlm.RLM's per-call limits (a few sub-calls
             per call, a few notes per llm_query) one level of calls covers about 24 notes, so
             longer inputs need a child RLM per part: the family where recursion is necessary,
             and depth has a reason (recurse.py). Scored exactly.

Wording (niah and source so far): sentence frames, questions, answer instructions and key and
value shapes come from one of two disjoint template sets, and real text from one of two
disjoint sets of documents. "seen" is what training, demonstrations and validation draw from;
"held_out" is for evaluation only: make_task refuses it for a seed of another split, so a
wording a model is scored on as held out never reached its training by construction. The
variant wording="original" is niah's one wording from before (the classic frame below).

A task is a plain record (query, context, answer, how to score it). The same
(family, length, seed, variant) always gives the same task: every generator draws from
its own random.Random(seed). Length is in characters: niah and multihop contexts are
exactly `length` long; aggregate and pairs contexts end at a whole record, so
length - MAX_RECORD_CHARS <= len(context) <= length (a record is at most 165 characters,
so within 1% from 16,500 characters on).
Text is joined from pools drawn once per task, so 10,000,000 characters take well under
a second.

Variants (keyword arguments of make_task, default in brackets):
  niah       wording ["seen"], "held_out" or "original"; filler [random: generated sentences
             half the time, else "prose" (Python's reference manual) or "code" (its
             standard library), from the wording's part of realtext.py's documents];
             needles [default_needles(length): 8 at 2,000 characters, 16 at 8,000, 250
             from 125,000 on] in all, the ones not asked being look-alikes with other keys;
             queried [1] of them asked (more than one: answer is a list, scored by F1);
             decoys [0] look-alike keys per asked key (same words, another suffix, then the
             words swapped); depth [random] of the first asked needle, from 0 (first line)
             to 1 (last line)
  aggregate  question ["count"] or "most_common"; label [random] to count. For "count" the
             label's share of the records is drawn from [0, 0.75], so the count is spread
             over a wide range and no constant guess earns much
  pairs      condition ["both"] or "same_month"; users [4 to 8, fewer when short] who
             write about the label, so at most users*(users-1)/2 true pairs; label [random].
             Many other users write the other records (one per 250 characters, at least
             20), so listing every pair of every user is far from the answer
  multihop   hops [2] facts to chain, 2 to 5; distractors [length/2000, 7 to 30, fewer when
             short] other chains of the same shape
  source     question [random among "first_param", "n_params", "default"; "params", the list
             of parameter names, only when asked for]; wording ["seen"] or "held_out"
  tally      label [random] to count, whose share of the notes is drawn from [0, 0.6];
             wording ["seen"] or "held_out" (the question's phrasing)

Scoring (score(task, prediction) -> [0, 1]) is lenient about form, strict about content,
and reads a sentence as it reads a bare value, so a baseline that answers in words is
scored as fairly as an RLM that answers FINAL(value). What a text states is what its
FINAL(...) holds (up to the matching parenthesis), then what follows "the answer is".
  exact   normalised string match (case, whitespace, quotes, surrounding punctuation,
          "The answer is X", FINAL(X), a one-element list); else the answers of the task's
          kind that the text names: 7-digit numbers (niah), cities (multihop), topics
          (aggregate), else numbers or capitalised names. What the query names (the key
          "ebony-panda-82", "Agent Mara Quill") is left out. Credit only when one distinct
          answer is named and it is right: "The special magic number for ebony-panda-82 is
          7485352." states 7485352; "either 1234567 or 7485352" states nothing. A kind holds
          every answer its tasks can have, so listing guesses never pays. A text of more
          than MAX_STATED_CHARS (300) characters once unwrapped states nothing: handing
          back the context, or a chunk of it, earns 0 however few values it names.
  number  0.75 ** |error| (OOLONG's partial credit for counts) of the number stated,
          leaving out numbers in keys or dates, the query's numbers and reference totals
          ("out of 25", "3 of 25", "of the 25"): "There are 3 records about it (out of 25)"
          states 3. Several numbers get the credit of the worst ("3 or 5" scores as 5).
  f1      F1 over the set of items; items of a pair are unordered; lists are read from
          Python/JSON literals or text such as "a, b" or "(u1, u2), (u3, u4)"

Usage:
  python tasks.py --family niah --length 100000 --seed 0
  python tasks.py --family niah --length 32000 --seed 1 --variant wording=held_out --variant filler=code
  python tasks.py --family source --length 64000 --seed 2 --variant question=default
  python tasks.py --family pairs --length 10000000 --seed 3 --variant condition=same_month

  from tasks import make_task, make_suite, score, load_jsonl
  task = make_task("multihop", 50_000, seed=1, hops=3)
  score(task, "Lisbon")
  suite = make_suite(["niah", "aggregate"], [8_000, 64_000], n=4, seed=0)
  tasks = load_jsonl("oolong.jsonl")   # {"context", "question" or "query", "answer"} per line
"""

import ast
import hashlib
import inspect
import itertools
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from realtext import real_filler_lines, source_cheap_answers, source_task

FAMILIES = ("niah", "aggregate", "pairs", "multihop", "source", "tally")
SCORINGS = ("exact", "number", "f1")
# Where tasks are used. Each split owns its own seed space (see task_seed), so held-out data is
# held out by construction, not by the luck of two random draws never meeting.
SPLITS = ("train", "demo", "validation", "eval")
_SPLIT_SHIFT = 56   # a split's seeds are (split number << 56) + 56 bits of a hash


@dataclass
class Task:
    family: str
    query: str
    context: str | list | dict
    answer: str | int | float | list
    scoring: str  # "exact", "number" or "f1"
    seed: int
    wording: str = "seen"  # the template set it was worded from: "seen", "held_out" or "original"

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")


# ----------------------------------------------------------------------------------
# Word pools. Filler has no digits, apostrophes, hyphens or fact words, so no filler
# sentence can be mistaken for a needle or a multihop fact.

_ADJS = ("quiet bright narrow ancient gentle heavy hollow silver patient distant crooked "
         "sudden careful restless humble wooden frozen tired curious open busy empty "
         "crowded soft steep pale").split()
_NOUNS = ("river garden window mountain village lantern harbor orchard meadow bridge "
          "forest library market kitchen valley tower island road field cottage station "
          "castle canyon desert lake ship wagon painter farmer sailor teacher merchant "
          "baker child traveler poet").split()
_VERBS = ("crossed watched followed carried painted visited remembered passed circled "
          "guarded described admired reached opened closed left found").split()
_PREPS = "near beyond under behind across along beside toward above".split()
_FILLER_TEMPLATES = (
    "The {a} {n} {v} the {b} {m}.",
    "One {a} {n} stood {p} the {m} all afternoon.",
    "Nobody {v} the {n} {p} the {b} {m} that year.",
    "In the morning the {n} was {a} and the {m} was {b}.",
    "She {v} the {a} {n} and then walked {p} the {m}.",
    "They said the {n} {p} the {m} had always been {a}.",
)


def _filler_sentence(rng):
    return rng.choice(_FILLER_TEMPLATES).format(
        a=rng.choice(_ADJS), b=rng.choice(_ADJS), n=rng.choice(_NOUNS),
        m=rng.choice(_NOUNS), v=rng.choice(_VERBS), p=rng.choice(_PREPS))


def _filler_lines(rng, n_chars):
    """Distractor text of exactly n_chars characters, as a list of lines."""
    pool = [_filler_sentence(rng) for _ in range(2048)]
    mean_len = sum(map(len, pool)) / len(pool) + 1
    pieces, total = [], 0
    while total < n_chars:  # sentences end in a space or (one time in four) a newline
        k = int((n_chars - total) / mean_len) + 64
        seps = rng.choices((" ", "\n"), weights=(3, 1), k=k)
        chunk = "".join([s + sep for s, sep in zip(rng.choices(pool, k=k), seps)])
        pieces.append(chunk)
        total += len(chunk)
    return "".join(pieces)[:n_chars].split("\n")


def _scatter(lines, facts, rng, fixed=None):
    """Insert each fact as its own line at a random line boundary (fixed: {index: 0..1})."""
    fixed = fixed or {}
    # Facts that land on the same line boundary go in random order: ordered by index, the
    # asked needle or chain (index 0) would come first among them, which a key-blind
    # "first match" could exploit.
    slots = [(round(fixed[i] * len(lines)) if i in fixed else rng.randrange(len(lines) + 1), rng.random(), i)
             for i in range(len(facts))]
    out, prev = [], 0
    for pos, _, i in sorted(slots):
        out.extend(lines[prev:pos])
        out.append(facts[i])
        prev = pos
    out.extend(lines[prev:])
    return "\n".join(out)


FILLERS = ("generated", "prose", "code")
# A real-text line that holds a look-alike of a value (a grouped number) is left out of a haystack.
_VALUE_LIKE = re.compile(r"\d,\d{3},\d{3}|[A-Z]{2}-\d{4}-[A-Z]{2}")


def _haystack(rng, length, facts, fixed=None, filler=None, wording="seen"):
    """Filler plus one line per fact, exactly `length` characters. filler: generated sentences,
    or real text that ships with Python (realtext.py): "prose" (its reference manual) or "code"
    (its standard library's source), from the documents of the wording's part ("held_out" for a
    held-out wording, else "seen"). None: the generated sentences of old for wording "original",
    otherwise any of the three, real text half the time."""
    if filler is None:
        filler = "generated" if wording == "original" else rng.choice(("generated", "generated", "prose", "code"))
    part = "held_out" if wording == "held_out" else "seen"
    budget = length - sum(len(f) + 1 for f in facts)
    if budget < 200:
        need = length - budget + 200
        raise ValueError(f"length={length} is too small for {len(facts)} facts; "
                         f"use length >= {need} or fewer needles/distractors")
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    if filler == "generated":
        lines = _filler_lines(rng, budget)
    else:
        lines = real_filler_lines(rng, budget, filler, part, reject=_VALUE_LIKE.search)
    return _scatter(lines, facts, rng, fixed)


# ----------------------------------------------------------------------------------
# niah

# No word here ends with another one, so no key is a substring of a different key.
_KEY_FIRST = ("amber azure cobalt coral crimson ebony indigo ivory jade lilac maroon olive "
              "onyx pearl ruby russet sable scarlet teal topaz umber violet").split()
_KEY_SECOND = ("falcon otter heron badger lynx marten raven weasel bison cobra gecko ibis "
               "jackal koala lemur newt orca panda quail robin shrew tapir walrus zebra").split()


# Wording. Every niah and multihop task draws its sentence frames, question, answer instruction
# and key and value shapes from one of two disjoint template sets: "seen" (training, demonstrations,
# validation, and the seen column of evaluations) and "held_out" (evaluation only; make_task refuses
# it for a seed of another split). "original" is the first seen template of each kind: the one
# wording this project's tasks had before wording was a dimension, kept for tests and comparisons.
WORDINGS = ("seen", "held_out", "original")
# A needle frame holds {k} (the key) and {v} (the value); one frame per task, for every needle.
NIAH_FRAMES = {
    "seen": ("The special magic number for {k} is {v}.",
             "The access code of {k} is {v}.",
             "Remember this: {k} was assigned the number {v}.",
             "{v} is the passcode that belongs to {k}.",
             "Entry {k} -> {v}",
             "For {k}, the registry lists {v}.",
             "[{k}] value={v}",
             "Note that the vault of {k} opens with {v}."),
    "held_out": ("Among the records kept, {k} is linked to the figure {v}.",
                 "{k} :: {v}",
                 "The clerk wrote {v} next to the name {k}.",
                 "Whoever asks about {k} should be told {v}.",
                 "Filed under {k}: reference {v}, no further notes."),
}
NIAH_QUESTIONS = {
    "seen": ("What is the special magic number for {k} mentioned in the context?",
             "Which value does the context give for {k}?",
             "Find the value recorded for {k} in the text.",
             "Look up {k}: what is its value?",
             "What value is associated with {k}?"),
    "held_out": ("According to the document, what figure is tied to {k}?",
                 "{k} appears somewhere in the context. Report the value given for it.",
                 "Tell me what is listed for {k}."),
}
NIAH_LIST_QUESTIONS = {
    "seen": ("What are the values given for {k} in the context?",
             "Find the values recorded for {k}."),
    "held_out": ("Report what the document lists for each of {k}.",),
}
NIAH_INSTRUCTIONS = {
    "seen": (" Answer with the {what} only.", " Reply with just the value.", ""),
    "held_out": (" Give nothing but the value, exactly as written.", " Respond with the value alone."),
}
# Key shapes from two words and a number; value shapes. None is a substring of another of its task.
NIAH_KEYS = {"seen": ("{a}-{b}-{n}", "{a}_{b}_{n}", "{A}{B}{n}"),
             "held_out": ("{A}-{B}-{n}", "{a}.{b}.{n}")}
NIAH_VALUES = {"seen": ("number", "code"), "held_out": ("number", "grouped")}
_VALUE_WHAT = {"number": "7-digit number", "code": "code", "grouped": "number"}
_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def _templates(table, wording):
    """The templates of a wording: "original" is the first seen one."""
    return table["seen"][:1] if wording == "original" else table[wording]


def _niah_value(rng, shape, number):
    """A value of the given shape from a distinct 7-digit number: 3141592, KX-3141-QM, 3,141,592."""
    if shape == "code":
        return f"{rng.choice(_CODE_LETTERS)}{rng.choice(_CODE_LETTERS)}-{number % 10_000:04d}-" \
               f"{rng.choice(_CODE_LETTERS)}{rng.choice(_CODE_LETTERS)}"
    if shape == "grouped":
        return f"{number:,}"
    return str(number)


def _needle(key, value, frame=None):
    return (frame or NIAH_FRAMES["seen"][0]).format(k=key, v=value)


def _join_names(names):
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def default_needles(length):
    """How many needles a niah context holds unless told: one per 500 characters, at least 8
    and at most 250, and never more than leave most of a short context to filler. The others
    are look-alikes with other keys, so only reading for the asked key finds its value: the
    first 7-digit number, or every one of them, is almost never the answer."""
    return max(1, min(250, max(8, length // 500), (length - 400) // 120))


def _niah(rng, length, needles=None, queried=1, decoys=0, depth=None, wording="seen", filler=None):
    needles = default_needles(length) if needles is None else needles
    if not 1 <= queried <= needles:
        raise ValueError(f"niah needs 1 <= queried <= needles, got queried={queried}, needles={needles}")
    if not 0 <= decoys <= 40:
        raise ValueError(f"niah decoys must be in [0, 40], got {decoys}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"niah depth is a fraction of the context in [0, 1], got {depth}")
    frame = rng.choice(_templates(NIAH_FRAMES, wording))
    key_shape = rng.choice(_templates(NIAH_KEYS, wording))
    value_shape = rng.choice(_templates(NIAH_VALUES, wording))

    def shaped(a, b, n):
        return key_shape.format(a=a, b=b, A=a.capitalize(), B=b.capitalize(), n=n)

    keys = set()
    words = rng.sample([(a, b) for a in _KEY_FIRST for b in _KEY_SECOND], needles)
    targets = []
    for a, b in words:
        key = (a, b, rng.randrange(10, 100))
        targets.append(key)
        keys.add(key)
    decoy_keys = []
    for a, b, _ in targets[:queried]:
        # Same words with another suffix first, then the words swapped: keys a reader
        # (or a sloppy regex) could confuse with the real one.
        candidates = [(a, b, s) for s in rng.sample(range(10, 100), 90)]
        candidates += [(b, a, s) for s in rng.sample(range(10, 100), 90)]
        picked = [c for c in candidates if c not in keys][:decoys]
        keys.update(picked)
        decoy_keys += picked
    all_keys = [shaped(*k) for k in targets + decoy_keys]
    values = [_niah_value(rng, value_shape, v) for v in rng.sample(range(1_000_000, 10_000_000), len(all_keys))]
    facts = [_needle(k, v, frame) for k, v in zip(all_keys, values)]
    context = _haystack(rng, length, facts, None if depth is None else {0: depth}, filler, wording)
    asked = all_keys[:queried]
    instruction = rng.choice(_templates(NIAH_INSTRUCTIONS, wording)).format(what=_VALUE_WHAT[value_shape])
    if queried == 1:
        return rng.choice(_templates(NIAH_QUESTIONS, wording)).format(k=asked[0]) + instruction, \
            context, values[0], "exact"
    query = rng.choice(_templates(NIAH_LIST_QUESTIONS, wording)).format(k=_join_names(asked))
    return query + " Answer with the list of values.", context, values[:queried], "f1"


# ----------------------------------------------------------------------------------
# aggregate and pairs: records whose topic must be judged from meaning

_TOPIC_SPECS = {
    "food": (
        ("Tried {s} today and {r}.", "Had {s} for dinner; {r}.", "Ordered {s} again and {r}."),
        ("the ramen at the place on the corner", "a spicy tofu curry", "my aunt's lasagna",
         "a bowl of mushroom risotto", "the tacos from the truck by the station",
         "warm sourdough with salted butter", "the pork dumplings at the night market",
         "grilled salmon with lemon rice"),
        ("the broth was rich and savory", "I went back for a second helping",
         "the sauce was a little too salty", "it tasted even better than last time",
         "the dessert afterwards was the highlight")),
    "travel": (
        ("Just landed in {s} and {r}.", "Spent the week in {s}; {r}.", "Booked a trip to {s} and {r}."),
        ("Lisbon", "Kyoto", "the Scottish highlands", "a small island off Greece", "Buenos Aires",
         "the Norwegian fjords", "Marrakech", "the coast of Vietnam"),
        ("the flight got delayed for hours", "the hostel has a view of the harbor",
         "the train ride through the hills was stunning", "I lost my passport for an hour",
         "the jet lag is brutal")),
    "sports": (
        ("Watched {s} last night and {r}.", "Cannot believe {s}; {r}.", "Went to see {s} and {r}."),
        ("the derby match", "the marathon downtown", "the tennis final",
         "our local team's playoff game", "the cycling race through the mountains",
         "the basketball game in overtime", "the swimming relay", "the boxing rematch"),
        ("the underdog won it on the final play", "the referee made a terrible call",
         "the crowd was on its feet the whole time", "the coach should be fired after that",
         "the favourite collapsed in the last minute")),
    "music": (
        ("Listened to {s} on repeat and {r}.", "Saw {s} live and {r}.", "Cannot get over {s}; {r}."),
        ("the new jazz album", "that indie band from Glasgow", "the symphony orchestra",
         "an old vinyl record of soul classics", "the piano concerto", "the folk trio at the pub",
         "the new hip hop single", "a string quartet"),
        ("the guitar solo gave me chills", "the drummer stole the show", "the lyrics hit hard",
         "the bass line is stuck in my head", "the encore went on for half an hour")),
    "weather": (
        ("Woke up to {s} and {r}.", "Another day of {s}; {r}.", "The forecast promised {s} and {r}."),
        ("heavy rain", "a thick fog over the river", "freezing wind", "a heat wave",
         "hail the size of marbles", "the first snow of the year", "a thunderstorm",
         "clear skies after a week of drizzle"),
        ("my umbrella gave up on the way to the bus", "the streets flooded by noon",
         "I had to scrape ice off the car", "everyone stayed indoors",
         "the power went out for an hour")),
    "money": (
        ("Checked my bank account after {s} and {r}.", "Finally dealt with {s}; {r}.",
         "Still thinking about {s}, and {r}."),
        ("the rent increase", "paying off the credit card", "the tax refund",
         "the new savings plan", "a surprise bonus at the end of the quarter",
         "the mortgage payment", "the stock market dip", "splitting the utility bills"),
        ("the budget for this month is tight", "I moved some cash into an index fund",
         "the interest rates are eating me alive", "the accountant says I owe less than I feared",
         "I cancelled two subscriptions to save a little")),
}
AGGREGATE_LABELS = tuple(_TOPIC_SPECS)
# {label: [texts]}: disjoint pools, no text contains a label word. Exposed so that a
# reference program can recover a record's label by lookup.
AGGREGATE_TEXTS = {label: [t.format(s=s, r=r) for t, s, r in itertools.product(*spec)]
                   for label, spec in _TOPIC_SPECS.items()}
TOPIC_OF = {text: label for label, texts in AGGREGATE_TEXTS.items() for text in texts}  # each text's one topic

_HEADER = "Each line below is one record: a date, a user id and a short text."
_DATES = [f"2024-{m:02d}-{d:02d}" for m in range(1, 13)
          for d in range(1, (29 if m == 2 else 30 if m in (4, 6, 9, 11) else 31) + 1)]
_MONTHS = ("January February March April May June July August September October "
           "November December").split()


def _record(date, user, text):
    return f"Date: {date} || User: {user} || Text: {text}"


MAX_RECORD_CHARS = max(len(_record(_DATES[0], 99999, t)) for ts in AGGREGATE_TEXTS.values() for t in ts)


def _topics_clause():
    return ("Each record's text is about exactly one of these topics: "
            + ", ".join(AGGREGATE_LABELS) + ". The topic is not named in the text; judge it "
            "from the meaning.")


def _fill_records(rng, budget, users, weights, labels=AGGREGATE_LABELS):
    """Records (text lines, their labels, their users) filling at most `budget` chars,
    one newline each."""
    lines, line_labels, line_users, total = [], [], [], 0
    cum_weights = list(itertools.accumulate(weights))
    while True:
        label = rng.choices(labels, cum_weights=cum_weights)[0]
        user = rng.choice(users)
        line = _record(rng.choice(_DATES), user, rng.choice(AGGREGATE_TEXTS[label]))
        if total + len(line) + 1 > budget:
            return lines, line_labels, line_users
        lines.append(line)
        line_labels.append(label)
        line_users.append(user)
        total += len(line) + 1


def _check_record_length(length, family):
    need = len(_HEADER) + 8 * (MAX_RECORD_CHARS + 1)
    if length < need:
        raise ValueError(f"length={length} is too small for {family}; use length >= {need}")


def _aggregate(rng, length, question="count", label=None):
    if question not in ("count", "most_common"):
        raise ValueError(f"aggregate question must be 'count' or 'most_common', got {question!r}")
    if label is not None and label not in AGGREGATE_LABELS:
        raise ValueError(f"aggregate label must be one of {AGGREGATE_LABELS}, got {label!r}")
    _check_record_length(length, "aggregate")
    budget = length - len(_HEADER)
    if question == "count":
        label = label or rng.choice(AGGREGATE_LABELS)
        share = rng.uniform(0.0, 0.75)   # the counted label's expected share: a wide spread of counts
    for _ in range(1000):  # redraw until the most common label is unique (small contexts tie)
        weights = [rng.uniform(0.5, 1.5) for _ in AGGREGATE_LABELS]
        if question == "count":
            i = AGGREGATE_LABELS.index(label)
            weights[i] = share / (1 - share) * (sum(weights) - weights[i])
        users = rng.sample(range(10_000, 100_000), max(5, min(5_000, budget // 2_000)))
        lines, labels, _ = _fill_records(rng, budget, users, weights)
        counts = {lab: labels.count(lab) for lab in AGGREGATE_LABELS}
        ranked = sorted(counts.values(), reverse=True)
        if question == "count" or ranked[0] > ranked[1]:
            break
    context = _HEADER + "".join("\n" + line for line in lines)
    if question == "count":
        query = (f"{_topics_clause()} How many records are about {label}? Answer with a number.")
        return query, context, counts[label], "number"
    query = (f"{_topics_clause()} Which topic do the most records have? Answer with the topic only.")
    return query, context, max(counts, key=counts.get), "exact"


def _pairs(rng, length, condition="both", users=None, label=None):
    if condition not in ("both", "same_month"):
        raise ValueError(f"pairs condition must be 'both' or 'same_month', got {condition!r}")
    if label is not None and label not in AGGREGATE_LABELS:
        raise ValueError(f"pairs label must be one of {AGGREGATE_LABELS}, got {label!r}")
    _check_record_length(length, "pairs")
    label = label or rng.choice(AGGREGATE_LABELS)
    budget = length - len(_HEADER)
    room = budget // (MAX_RECORD_CHARS + 1)  # records that surely fit
    k = users if users is not None else min(rng.randint(4, 8), max(2, room // 3))
    if not 2 <= k <= max(2, room // 2):
        raise ValueError(f"pairs users={k} must be in [2, {max(2, room // 2)}] at length={length}; "
                         "use fewer users or a longer context")
    # Only the k chosen users ever write about `label`, which keeps the true pairs few
    # (at most k*(k-1)/2) however long the context is.
    ids = rng.sample(range(10_000, 100_000), k + max(20, min(5_000, budget // 250)))
    chosen, per_user = ids[:k], (1 if room < 12 * k else 3)
    for _ in range(1000):
        rare = [(u, rng.choice(_DATES)) for u in chosen for _ in range(rng.randint(1, per_user))]
        by_month = {}
        for u, date in rare:
            by_month.setdefault(date[5:7], set()).add(u)
        if condition == "both":
            pairs = set(itertools.combinations(sorted(chosen), 2))
        else:
            pairs = {p for us in by_month.values() for p in itertools.combinations(sorted(us), 2)}
        if pairs:
            break
    rare_lines = [_record(date, u, rng.choice(AGGREGATE_TEXTS[label])) for u, date in rare]
    others = [lab for lab in AGGREGATE_LABELS if lab != label]
    lines, _, _ = _fill_records(rng, budget - sum(len(r) + 1 for r in rare_lines), ids,
                                [1.0] * len(others), others)
    lines += rare_lines
    rng.shuffle(lines)
    context = _HEADER + "".join("\n" + line for line in lines)
    if condition == "both":
        cond = f"both users have at least one record about {label}"
    else:
        cond = (f"both users have a record about {label} in the same month "
                "(the same calendar month of 2024)")
    query = (f"{_topics_clause()} List every pair of user ids such that {cond}. "
             "Give each pair once, as (smaller id, larger id).")
    return query, context, [list(p) for p in sorted(pairs)], "f1"


# ----------------------------------------------------------------------------------
# tally: count the notes about a topic, where no code can judge a topic and one call may
# read only a few notes (rlm.RLM's per-call limits), so recursion is necessary

TALLY_HEADER = "Each line below is one note."
TALLY_QUESTIONS = {
    "seen": ("How many notes are about {label}?", "Count the notes about {label}."),
    "held_out": ("What is the number of notes on the topic {label}?", "Of all the notes, how many concern {label}?"),
}
MAX_NOTE_CHARS = max(len(t) for ts in AGGREGATE_TEXTS.values() for t in ts)


def _tally(rng, length, label=None, wording="seen"):
    if label is not None and label not in AGGREGATE_LABELS:
        raise ValueError(f"tally label must be one of {AGGREGATE_LABELS}, got {label!r}")
    if length < len(TALLY_HEADER) + 6 * (MAX_NOTE_CHARS + 1):
        raise ValueError(f"length={length} is too small for tally; use length >= "
                         f"{len(TALLY_HEADER) + 6 * (MAX_NOTE_CHARS + 1)}")
    label = label or rng.choice(AGGREGATE_LABELS)
    share = rng.uniform(0.0, 0.6)  # the label's expected share: counts spread, so no constant earns much
    weights = [1.0] * len(AGGREGATE_LABELS)
    i = AGGREGATE_LABELS.index(label)
    weights[i] = share / (1 - share) * (sum(weights) - weights[i])
    notes, budget = [], length - len(TALLY_HEADER)
    while True:
        note = rng.choice(AGGREGATE_TEXTS[rng.choices(AGGREGATE_LABELS, weights)[0]])
        if budget < len(note) + 1:
            break
        notes.append(note)
        budget -= len(note) + 1
    count = sum(TOPIC_OF[n] == label for n in notes)
    topics = (f"Each note is about exactly one of these topics: {', '.join(AGGREGATE_LABELS)}. The topic is "
              "not named in the note; judge it from the meaning.")
    question = rng.choice(_templates(TALLY_QUESTIONS, wording)).format(label=label)
    return f"{topics} {question} Answer with a number.", TALLY_HEADER + "".join("\n" + n for n in notes), count, "exact"


# ----------------------------------------------------------------------------------
# multihop

_FIRST = ("Mara Theo Ines Oskar Lena Felix Nadia Hugo Clara Emil Vera Jonas Ada Milo Rosa "
          "Anton Iris Leon Zora Pavel Greta Tomas Elif Ruben Sana Viktor Noor Lukas Alma "
          "Dario Freya Kasper Lior Maren Otto Petra Silas Tilda Yuri Wren").split()
_LAST = ("Quill Vance Morrow Hale Brandt Sorel Kade Lind Novak Pryce Okafor Reyes Thorne "
         "Varga Wilde Castel Duarte Falk Grau Holm Ives Jarvis Kern Lowe Maddox Nash Orr "
         "Pike Rook Strand Tamm Ulrich Voss Wray Yates Zeller Abbot Blum Crane Drake").split()
_CITIES = ("Lisbon Kyoto Oslo Cairo Lima Quito Dakar Hanoi Riga Tunis Porto Bergen Zagreb "
           "Tbilisi Valletta Bruges Malaga Gdansk Tallinn Split Lyon Turin Seville Krakow "
           "Ghent Basel Graz Brno Plovdiv Izmir Nantes Bilbao Bologna Aarhus Tromso Odessa "
           "Salzburg Cork Galway Leipzig Dresden Rotterdam Antwerp Marseille Naples Palermo "
           "Granada Bordeaux Geneva Lausanne Uppsala Tartu Vilnius Ljubljana Sarajevo Skopje "
           "Tirana Nicosia Beirut Amman Muscat Doha Baku Yerevan Almaty Tashkent Kathmandu "
           "Colombo Manila Jakarta Busan Osaka Sapporo Perth Hobart Auckland").split()
_RELATIONS = ("handler", "contact", "courier", "informant")  # hop i uses _RELATIONS[i]


# A hop frame holds {a} (who is asked about), {r} (the relation) and {b} (the answer); a city
# frame {a} and {c}. Each line of a chain holds its relation word ("safehouse" for the city), and
# no frame word is a capitalised pair or a city, so "the line with the name and the relation,
# then the other name in it" reads every frame.
MULTIHOP_HOPS = {
    "seen": ("{a}'s {r} is {b}.", "The {r} of {a} is {b}.", "{b} serves as {a}'s {r}.",
             "{a} relies on {b} as {r}."),
    "held_out": ("{a} has {b} as their {r}.", "It was {b} who acted as {r} for {a}."),
}
MULTIHOP_CITIES = {
    "seen": ("{a}'s safehouse is in {c}.", "{a} keeps a safehouse in {c}.", "The safehouse of {a} is located in {c}."),
    "held_out": ("{c} is where {a} hides, in a safehouse nobody knows.", "{a} shelters in a safehouse in {c}."),
}
MULTIHOP_QUESTIONS = {
    "seen": ("In which city is the safehouse of {path}?", "Where is the safehouse of {path}?",
             "Name the city of the safehouse of {path}."),
    "held_out": ("Which city hides the safehouse of {path}?",
                 "Follow the chain: the safehouse of {path} lies in which city?"),
}
MULTIHOP_INSTRUCTIONS = {
    "seen": (" Answer with the city only.", " Reply with the city name.", ""),
    "held_out": (" Just the city, please.",),
}


def _multihop(rng, length, hops=2, distractors=None, wording="seen", filler=None):
    if not 2 <= hops <= len(_RELATIONS) + 1:
        raise ValueError(f"multihop hops must be in [2, {len(_RELATIONS) + 1}], got {hops}")
    # Enough other chains that the first city in the text, or any one city, is rarely the answer;
    # fewer when a short context would be mostly facts.
    fit = max(2, (length - 400) // (hops * 2 * 45 + 60))
    n_chains = 1 + (distractors if distractors is not None else min(max(7, min(30, length // 2_000)), fit))
    if n_chains * hops > len(_FIRST) * len(_LAST):
        raise ValueError(f"multihop distractors={distractors} needs more names than there are")
    hop_frame = rng.choice(_templates(MULTIHOP_HOPS, wording))
    city_frame = rng.choice(_templates(MULTIHOP_CITIES, wording))
    people = rng.sample([f"{a} {b}" for a in _FIRST for b in _LAST], n_chains * hops)
    facts, answer = [], None
    for c in range(n_chains):
        chain = people[c * hops:(c + 1) * hops]
        names = [f"Agent {chain[0]}"] + chain[1:]
        for i in range(hops - 1):
            facts.append(hop_frame.format(a=names[i], r=_RELATIONS[i], b=names[i + 1]))
        # Everyone in a chain has a safehouse, in distinct cities, so stopping a hop too
        # early (or going one too far) gives a wrong city, never the right one by luck.
        cities = rng.sample(_CITIES, hops)
        facts += [city_frame.format(a=name, c=city) for name, city in zip(names, cities)]
        if c == 0:
            agent, answer = names[0], cities[-1]
    path = f"{agent}'s handler"
    for rel in _RELATIONS[1:hops - 1]:
        path = f"the {rel} of {path}"
    context = _haystack(rng, length, facts, None, filler, wording)
    query = rng.choice(_templates(MULTIHOP_QUESTIONS, wording)).format(path=path) \
        + rng.choice(_templates(MULTIHOP_INSTRUCTIONS, wording))
    return query, context, answer, "exact"


# ----------------------------------------------------------------------------------
# Making tasks

def task_seed(split, family, length, index):
    """The seed of the index-th task of (split, family, length).

    The split is the seed's top bits and the rest is a hash of (family, length, index), so:
    two splits can never share a seed (training can never draw an evaluation task), every
    (length, index) is its own task (an 8,000- and a 512,000-character cell ask different
    needles), and seeds below 2**56, which a user passes by hand, belong to no split.
    index: anything with a str(), e.g. 7 or "run0/step3/1"."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    digest = hashlib.sha256(f"{family}/{length}/{index}".encode()).digest()
    return (SPLITS.index(split) + 1) << _SPLIT_SHIFT | int.from_bytes(digest[:7], "big")


def split_of(seed):
    """The split a seed was made for by task_seed, or None for a hand-picked seed."""
    k = int(seed) >> _SPLIT_SHIFT
    return SPLITS[k - 1] if 1 <= k <= len(SPLITS) else None


_GENERATORS = {"niah": _niah, "aggregate": _aggregate, "pairs": _pairs, "multihop": _multihop,
               "source": source_task, "tally": _tally}


def make_task(family, length, seed, **variant):
    """A task of `family` whose context is `length` characters, fully determined by seed."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    gen = _GENERATORS[family]
    allowed = list(inspect.signature(gen).parameters)[2:]
    unknown = sorted(set(variant) - set(allowed))
    if unknown:
        raise TypeError(f"{family} has no variant {unknown}; its variants are {allowed}")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length is a positive number of characters, got {length!r}")
    wording = variant.get("wording", "seen")
    if "wording" in allowed and wording not in WORDINGS:
        raise ValueError(f"wording must be one of {WORDINGS}, got {wording!r}")
    if wording == "held_out" and split_of(seed) not in (None, "eval"):
        # Held-out templates are held out by construction: no training, demonstration or
        # validation seed can be worded with them.
        raise ValueError(f"held-out wording is for evaluation only; seed {seed} belongs to the "
                         f"{split_of(seed)!r} split")
    query, context, answer, scoring = gen(random.Random(seed), length, **variant)
    return Task(family, query, context, answer, scoring, seed, wording if "wording" in allowed else "seen")


def make_suite(families, lengths, n, split="eval", start=0, variants=None):
    """n tasks per (length, family) of one split, indices start..start+n-1: the same call,
    the same list. variants: optional {family: {variant: value}} applied to every task of
    that family."""
    variants = variants or {}
    return [make_task(f, length, task_seed(split, f, length, start + i), **variants.get(f, {}))
            for length in lengths for f in families for i in range(n)]


# ----------------------------------------------------------------------------------
# Scoring

# A stated answer is at most this long (after FINAL(...) and "the answer is" are unwrapped): a
# sentence or two. Longer text, such as a chunk of the context handed back, states nothing, even
# when it happens to name one value of the answer's kind.
MAX_STATED_CHARS = 300
_ANSWER_MARK = re.compile(r"\banswer\s*(?:is\b|:|=)\s*", re.I)
_FINAL_OPEN = re.compile(r"\bfinal(?:_var)?\s*\(", re.I)
_STRIP = " \t\r\n\"'`*.,;:!?"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A number on its own, so neither the 82 of the key "ebony-panda-82" nor a part of a date.
_STANDALONE_NUMBER = re.compile(r"(?<![\w.-])" + _NUMBER.pattern + r"(?![\w-]|\.\d)")
# Words after which a number is a reference total, not a count: "out of 25", "3 of 25",
# "Of the 25 records", "among all 25", "3/25". ("A total of 12" is a count.)
_TOTAL_BEFORE = re.compile(r"(?:\b(?:out\s+of|among)(?:\s+(?:the|all))?|\bof\s+(?:the|all)|\d\s+of|\d\s*/)\s*$",
                           re.I)
_NIAH_CODE = re.compile(r"(?<![\w-])[A-Z]{2}-\d{4}-[A-Z]{2}(?![\w-])")  # a niah value of the "code" shape
_CITY_WORDS = re.compile(r"\b(?:" + "|".join(_CITIES) + r")\b")
_LABEL_WORDS = re.compile(r"\b(?:" + "|".join(AGGREGATE_LABELS) + r")\b", re.I)
_CAPITALISED = re.compile(r"\b[A-Z][\w'’-]*(?:[ \t]+[A-Z][\w'’-]*)*")
# Capitalised only because they open a sentence or a name like "The Hague": never an answer.
_OPENERS = frozenset("a an the this that these those there here it its i we you he she they his "
                     "her their in on at of for from to by with and or but so as if is are was "
                     "were be based according answer final yes no note therefore thus however "
                     "which what who where when city".split())


def _final_argument(text):
    """What the first FINAL(...) in text holds, up to its matching parenthesis (a greedy
    match reads "FINAL(4182736) (see line 3)" as "4182736) (see line 3"), or None."""
    m = _FINAL_OPEN.search(text)
    if m is None:
        return None
    depth = 1
    for i in range(m.end(), len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[m.end():i]
    return text[m.end():]  # cut off before it closed: the rest is all it said


def _unwrap(text):
    """The part of a text that states its answer: what FINAL(...) holds, then what follows
    the last 'the answer is' or 'answer:', without quotes, bold or end punctuation."""
    s = str(text).strip()
    inner = _final_argument(s)
    if inner is not None:
        s = inner
    marks = list(_ANSWER_MARK.finditer(s))
    if marks:
        s = s[marks[-1].end():]
    return s.strip().strip(_STRIP)


def normalize(text):
    """Lower case, single spaces, no surrounding quotes or punctuation."""
    s = _unwrap(text)
    while len(s) >= 2 and s[0] + s[-1] in ("()", "[]", "{}"):
        s = s[1:-1].strip(_STRIP)
    return " ".join(s.split()).lower()


def _literal(text):
    """A Python or JSON literal if text is one (e.g. the str() of a FINAL value), else None."""
    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return None


def _value(number):
    return float(number.replace(",", ""))


def _numbers(text, loose=False):
    """Values of the numbers a text states, in order, leaving out numbers inside keys or
    dates and reference totals ("out of 25"). loose: every digit run, for reading a query,
    whose key digits must never count as an answer however a reply writes them."""
    if loose:
        return [_value(x.lstrip("+-")) for x in _NUMBER.findall(text)]
    return [_value(m.group()) for m in _STANDALONE_NUMBER.finditer(text)
            if not _TOTAL_BEFORE.search(text[max(0, m.start() - 30):m.start()])]


def _capitalised_phrases(text):
    """Runs of capitalised words ("Buenos Aires"), without a possessive 's or an opener."""
    out = []
    for m in _CAPITALISED.finditer(text):
        words = re.sub(r"['’]s$", "", m.group()).split()
        while words and words[0].lower() in _OPENERS:
            words.pop(0)
        if words:
            out.append(" ".join(words).lower())
    return out


def _kind(task):
    """How to read the task's answer from a sentence: (find: text -> the answers of the
    task's kind it names, in comparable form; named: is a value named by the query; the
    gold answer in that form), or None for an answer of no known kind. A kind holds every
    answer its tasks can have, so that whatever could earn credit is a candidate."""
    gold = str(task.answer).strip()
    query = " ".join(str(task.query).split())
    words = query.lower()

    def named(value):
        return re.search(r"(?<!\w)" + re.escape(str(value)) + r"(?!\w)", words) is not None

    if task.scoring == "number" or _NUMBER.fullmatch(gold):
        query_numbers = set(_numbers(query, loose=True))
        if task.family == "niah" and re.fullmatch(r"\d{7}|\d,\d{3},\d{3}", gold):
            # A niah answer is a 7-digit number, so a line number beside it is no rival.
            def find(text):
                return [x for x in _numbers(text) if 10**6 <= x < 10**7 and x == int(x)]
        else:
            find = _numbers
        return find, query_numbers.__contains__, _value(gold)
    if task.family == "niah" and _NIAH_CODE.fullmatch(gold):
        return _NIAH_CODE.findall, named, gold
    if task.family == "multihop" and gold in _CITIES:
        return (lambda text: [c.lower() for c in _CITY_WORDS.findall(text)]), named, gold.lower()
    if task.family == "aggregate" and gold in AGGREGATE_LABELS:
        return (lambda text: [w.lower() for w in _LABEL_WORDS.findall(text)]), named, gold
    if _CAPITALISED.fullmatch(gold):
        return _capitalised_phrases, named, " ".join(gold.split()).lower()
    return None


def _stated_answers(task, stated):
    """(distinct answers of the task's kind that the stated part of a text names, the gold
    answer in the same form), or None when the kind is unknown. What the query names (the
    key "ebony-panda-82", "Agent Mara Quill") restates the question rather than answering
    it, unless the answer is among those names (aggregate's list of topics)."""
    kind = _kind(task)
    if kind is None:
        return None
    find, named, gold = kind
    found = find(stated)
    if not named(gold):
        found = [x for x in found if not named(x)]
    return list(dict.fromkeys(found)), gold


def parse_number(text, query=""):
    """The one number a text states, or None when it states none or several: a plain
    number, else the numbers left once keys, dates, totals ("out of 25") and the query's
    own numbers are set aside ("There are 3 records about it (out of 25)" states 3)."""
    stated = _unwrap(text)
    plain = normalize(stated)
    if _NUMBER.fullmatch(plain):
        return _value(plain)
    found = set(_numbers(stated)) - set(_numbers(query, loose=True))
    return found.pop() if len(found) == 1 else None


def _canon_id(x, numeric):
    s = normalize(x)
    if numeric:  # "user 4821", "'4821'" and 4821 are the same id
        m = re.search(r"\d+", s)
        return str(int(m.group())) if m else s
    return s


def parse_list(text, pairs=False, numeric_ids=False):
    """Items of a list written as a literal, "a, b", "a and b", one per line, or for pairs
    "(u1, u2), (u3, u4)". Pairs come back as frozensets (order inside a pair is free)."""
    s = _unwrap(text)
    value = _literal(s)
    if isinstance(value, (list, tuple, set)):
        items = list(value)
        if pairs and len(items) == 2 and not any(isinstance(x, (list, tuple, set)) for x in items):
            items = [items]  # a single pair written bare: (u1, u2)
    elif pairs:
        groups = re.findall(r"[(\[{]([^()\[\]{}]*)[)\]}]", s)
        if groups:
            items = [re.split(r"\s*(?:,|&|;|\band\b)\s*", g.strip()) for g in groups]
        elif numeric_ids:  # "4821 5930\n1234 5678": consecutive ids make a pair
            ids = re.findall(r"\d+", s)
            items = [ids[i:i + 2] for i in range(0, len(ids) - 1, 2)]
        else:
            items = [re.split(r"\s*(?:,|&|\band\b|-)\s*", line.strip())
                     for line in re.split(r"[;\n]", s) if line.strip()]
    else:
        items = [x for x in re.split(r"\s*(?:[,;\n]|\band\b)\s*", s) if x.strip()]
    if not pairs:
        return [normalize(x) for x in items if normalize(x)]
    out = []
    for item in items:
        if isinstance(item, str):  # "4821-5930" inside a literal list
            item = (re.findall(r"\d+", item) if numeric_ids
                    else re.split(r"\s*(?:,|&|\band\b|-)\s*", item.strip()))
        if isinstance(item, (list, tuple, set)) and len(item) == 2:
            out.append(frozenset(_canon_id(x, numeric_ids) for x in item))
        else:
            out.append(("not a pair", str(item)))  # counts against precision
    return out


def f1(predicted, gold):
    """F1 between two collections treated as sets; two empty sets agree perfectly."""
    p, g = set(predicted), set(gold)
    if not p and not g:
        return 1.0
    hit = len(p & g)
    return 0.0 if hit == 0 else 2 * hit / (len(p) + len(g))


def score(task, prediction):
    """Credit in [0, 1] for a prediction (a string, usually the RLM's FINAL value)."""
    if prediction is None:
        return 0.0
    text = str(prediction)
    if task.scoring in ("exact", "number"):
        # A sentence that names one answer scores like that answer; one that names several
        # gets the credit of the worst, so listing guesses never pays.
        stated = _unwrap(text)
        value = _literal(stated)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            stated = str(value[0])
        plain = normalize(stated)
        if task.scoring == "exact" and plain == normalize(task.answer):
            return 1.0
        if task.scoring == "number" and _NUMBER.fullmatch(plain):
            return 0.75 ** abs(_value(plain) - float(task.answer))
        if len(stated) > MAX_STATED_CHARS:
            return 0.0   # restates (part of) the context rather than stating an answer
        found, gold = _stated_answers(task, stated) or ([], None)
        if task.scoring == "exact":
            return float(found == [gold])
        return min((0.75 ** abs(x - gold) for x in found), default=0.0)
    gold = task.answer if isinstance(task.answer, list) else [task.answer]
    is_pairs = bool(gold) and all(isinstance(x, (list, tuple)) for x in gold)
    if is_pairs:
        numeric = all(re.fullmatch(r"\s*\d+\s*", str(x)) for pair in gold for x in pair)
        gold_set = [frozenset(_canon_id(x, numeric) for x in pair) for pair in gold]
        return f1(parse_list(text, pairs=True, numeric_ids=numeric), gold_set)
    return f1(parse_list(text), [normalize(x) for x in gold])


def cheap_answers(task):
    """Answers that never read for what the query asks: {name: prediction}. Each must earn
    (next to) nothing, or the family can be solved without doing the task; eval.py prints
    what they earn beside the policies, and the tests hold them to it.

      whole context    the context handed back (FINAL(context))
      first match      the first value of the answer's kind in the context, key-blind
      every candidate  every value of the answer's kind in the context at once
    """
    text = task.context if isinstance(task.context, str) else json.dumps(task.context)
    out = {"whole context": text}
    if task.family == "niah":   # values of any niah shape: 3141592, KX-3141-QM, 3,141,592
        found = re.findall(r"(?<![\w,])(?:\d{7}|[A-Z]{2}-\d{4}-[A-Z]{2}|\d,\d{3},\d{3})(?![\w,])", text)
    elif task.family == "multihop":   # the cities of the context, key-blind
        found = _CITY_WORDS.findall(text)
    elif task.family == "aggregate":
        n_records = text.count("\n")
        if task.scoring == "number":   # key-blind: an even share of the records per topic
            found = [str(round(n_records / len(AGGREGATE_LABELS)))] + [str(i) for i in range(n_records + 1)]
        else:
            found = list(AGGREGATE_LABELS)
    elif task.family == "tally":   # key-blind counts: an even share of the notes, and every count
        n_notes = text.count("\n")
        found = [str(round(n_notes / len(AGGREGATE_LABELS)))] + [str(i) for i in range(n_notes + 1)]
    elif task.family == "pairs":
        users = sorted(set(re.findall(r"User: (\d+)", text)))
        found = [json.dumps([list(map(int, p)) for p in itertools.combinations(users, 2)])]
    elif task.family == "source":
        return {**out, **source_cheap_answers(text)}
    else:
        found = []
    found = list(dict.fromkeys(found))
    if found:
        out["first match"] = found[0]
        out["every candidate"] = found[0] if task.family == "pairs" else ", ".join(found)
    return out


# ----------------------------------------------------------------------------------
# External files

def _infer_scoring(answer):
    if isinstance(answer, list):
        return "f1"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return "number"
    return "exact"


def load_jsonl(path):
    """Tasks from a JSONL file, one {"context", "question" or "query", "answer"} object per
    line (optional "scoring", "family", "seed"). Scoring, when absent: a list is scored by
    F1, a JSON number by 0.75**|error|, anything else by exact match. The context is what the
    REPL can hold: a str, or a list or dict of str. A leading byte-order mark is allowed."""
    path = Path(path)
    tasks = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}). Each line must be one "
                                 'object like {"context": ..., "question": ..., "answer": ...}') from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            query = rec.get("query", rec.get("question"))
            missing = [k for k, v in (("context", rec.get("context")), ("question or query", query),
                                      ("answer", rec.get("answer"))) if v is None]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)} (keys present: {sorted(rec)})")
            context = rec["context"]
            if not (isinstance(context, str) or isinstance(context, list) and all(isinstance(v, str) for v in context)
                    or isinstance(context, dict) and all(isinstance(v, str) for v in context.values())):
                raise ValueError(f"{where}: context must be a string, or a list or object of strings, "
                                 f"got {type(context).__name__}")
            family = rec.get("family", path.stem)
            if not isinstance(family, (str, int, float)) or isinstance(family, bool):
                raise ValueError(f"{where}: family must be a string, got {type(family).__name__}")
            seed = rec.get("seed", lineno)
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError(f"{where}: seed must be an integer, got {seed!r}")
            answer = rec["answer"]
            if not isinstance(answer, (str, int, float, list)):
                raise ValueError(f"{where}: answer must be a string, number or list, "
                                 f"got {type(answer).__name__}")
            scoring = rec.get("scoring") or _infer_scoring(answer)
            if scoring not in SCORINGS:
                raise ValueError(f"{where}: scoring must be one of {SCORINGS}, got {scoring!r}")
            if scoring == "number" and parse_number(answer) is None:
                raise ValueError(f"{where}: scoring is 'number' but answer {answer!r} states no single number")
            if scoring == "number" and isinstance(answer, str):
                answer = parse_number(answer)
            tasks.append(Task(str(family), str(query), context, answer, scoring, seed))
    return tasks


def save_jsonl(tasks, path):
    """Write tasks in the format load_jsonl reads."""
    with open(path, "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(asdict(task)) + "\n")


if __name__ == "__main__":
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(description="Generate one task and print its summary.")
    parser.add_argument("--family", choices=FAMILIES, default="niah")
    parser.add_argument("--length", type=int, default=100_000,
                        help="characters, at least the family's minimum (about 500 to 1,400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=[],
                        help="name=value, e.g. needles=4 (repeatable)")
    parser.add_argument("--show", type=int, default=300, help="characters of context to print, at least 0")
    args = parser.parse_args()
    variant = {}
    for item in args.variant:
        name, _, value = item.partition("=")
        try:
            variant[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            variant[name] = value
    if args.show < 0:
        sys.exit(f"tasks.py: --show must be at least 0 (got {args.show})")
    t0 = time.perf_counter()
    try:
        task = make_task(args.family, args.length, args.seed, **variant)
    except (ValueError, TypeError) as e:  # a length too small, an unknown or bad --variant
        sys.exit(f"tasks.py: {e}")
    seconds = time.perf_counter() - t0
    print(f"query:   {task.query}")
    print(f"answer:  {task.answer!r}  (scoring: {task.scoring})")
    print(f"context: {len(task.context):,} chars, {task.context.count(chr(10)) + 1:,} lines, "
          f"generated in {seconds:.2f} s")
    print(f"start:   {task.context[:args.show]!r}")
    print(f"self-check score of the answer: {score(task, json.dumps(task.answer))}")
