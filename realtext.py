"""
Real text that ships with every Python install, split in two by construction, and a task
family of questions about real Python source code.

Two kinds of documents, both read from the running Python's own files (no download):

  prose  the Python reference manual's topics (pydoc_data.topics: what `help("if")`
         prints), one document per topic name
  code   the standard library's *.py files (sysconfig.get_paths()["stdlib"]), one document
         per path relative to that folder, without test, tests, idlelib, site-packages,
         lib2to3 and pydoc_data (whose topics.py is the prose above) folders

Each document belongs to one part, "seen" or "held_out", by the SHA-256 of its name (one
in HELD_OUT_ONE_IN held out), so text used for held-out evaluation is never in training,
whatever the seeds. Documents share lines (manual topics repeat sentences, modules repeat
code), so held-out filler also leaves out every line of 30 or more characters that a seen
document holds. The text depends on the Python version installed (3.11 here): the same
seed gives the same text on the same install, not across versions.

  real_filler_lines(rng, n_chars, kind, part, reject)   distractor lines of real text
  source_task(rng, length, question, wording)           a "source" task (query, context,
                                                        answer, scoring)
  source_cheap_answers(context)                         its key-blind answers
  parse_source_query(query)                             what a seen-wording query asks
  read_signature(text)                                  parameters of the `def` text starts with

The source family: the context is stdlib files of one part, each under a header line
`# ---- file: json/decoder.py ----`; the query names one top-level function defined once
in the context, and asks its first parameter (exact), its number of parameters (exact),
its parameter names in order (f1; only when asked for, as listing every first parameter
in the context earns it F1 0.17-0.28) or the default value of one parameter (exact). Answers
come from `ast`, and only functions whose signature a short program (read_signature: find
`def NAME(`, split what follows at top-level commas) reads the same way are asked about.

A count of parameters is scored "exact", not "number": counts are small (2 to 5 mostly), so
0.75 ** |error| pays a constant guess of 3 about 0.6 on average. Within one context every
question picks an answer value uniformly among the values its functions have, then a
function with that value, so a frequent value ("name", 2, None) is not asked more often for
being frequent. What the cheap answers then earn is measured in tests/test_realtext.py.

    python realtext.py --length 8000 --seed 0          # print one source task's query and answer
"""

import ast
import functools
import hashlib
import os
import random
import re
import sysconfig
from collections import Counter

KINDS = ("prose", "code")
PARTS = ("seen", "held_out")
HELD_OUT_ONE_IN = 4   # one document in 4 is held out
SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "pydoc_data", "__pycache__"})
# Documents share lines (a third of the long lines of held-out manual topics are in seen ones too):
# held-out filler leaves out every line of at least this many characters that a seen document has.
SHARED_LINE_MIN_CHARS = 30
LONG_DIGITS = re.compile(r"\d{5}")   # a line with such a run could look like a 7-digit niah answer
# Characters str.splitlines() breaks at besides "\n": removed, so a line is a line for every reader.
_OTHER_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def part_of(name):
    """"seen" or "held_out", from a stable hash of a document's name."""
    return "held_out" if hashlib.sha256(name.encode("utf-8")).digest()[0] % HELD_OUT_ONE_IN == 0 else "seen"


def stdlib_root():
    return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=None)
def _all_names(kind):
    if kind == "prose":
        from pydoc_data.topics import topics
        return tuple(sorted(topics))
    if kind != "code":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root, found = stdlib_root(), []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        rel = os.path.relpath(folder, root)
        found += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if f.endswith(".py")]
    return tuple(sorted(found))


@functools.lru_cache(maxsize=None)
def documents(kind, part):
    """The names of the documents of one kind in one part, sorted."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return tuple(n for n in _all_names(kind) if part_of(n) == part)


@functools.lru_cache(maxsize=None)
def document_text(kind, name):
    """A document's text with "\\n" line ends only; "" for a file that is not UTF-8."""
    if kind == "prose":
        from pydoc_data.topics import topics
        text = topics[name]
    else:
        try:
            with open(os.path.join(stdlib_root(), name), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            return ""
    return _OTHER_BREAKS.sub("", text)


@functools.lru_cache(maxsize=None)
def _seen_lines(kind):
    return frozenset(line for name in documents(kind, "seen") for line in document_text(kind, name).split("\n")
                     if len(line.strip()) >= SHARED_LINE_MIN_CHARS)


@functools.lru_cache(maxsize=None)
def _filler_lines_of(kind, name):
    lines = [line for line in document_text(kind, name).split("\n") if not LONG_DIGITS.search(line)]
    if part_of(name) == "held_out":  # documents share sentences: held-out filler holds none of the seen ones
        seen = _seen_lines(kind)
        lines = [line for line in lines if len(line.strip()) < SHARED_LINE_MIN_CHARS or line not in seen]
    return tuple(lines)


def real_filler_lines(rng, n_chars, kind="prose", part="seen", reject=None):
    """Real text of exactly n_chars characters ("\\n".join of the result), as a list of lines.

    Documents of `part` come in an rng-random order (again, reshuffled, when all are used),
    the first from a random line, each line in order after that. Lines with a run of 5 or
    more digits are left out, and so are lines for which reject(line) is true."""
    names = documents(kind, part)
    out, total, first = [], -1, True   # total: len("\n".join(out))
    while total < n_chars:
        order, before = list(names), total
        rng.shuffle(order)
        for name in order:
            lines = _filler_lines_of(kind, name)
            if not lines:
                continue
            start = rng.randrange(len(lines)) if first else 0
            first = False
            for line in lines[start:]:
                if reject is None or not reject(line):
                    out.append(line)
                    total += len(line) + 1
                    if total >= n_chars:
                        break
            if total >= n_chars:
                break
        if total == before:
            raise ValueError(f"reject() refuses every line of the {part} {kind} documents")
    return "\n".join(out)[:n_chars].split("\n")


# ----------------------------------------------------------------------------------
# Reading a signature as a short program would: two regexes, no ast

# From "def NAME(" to the first ")" followed by ":" or "-> type:"; and a comma that no bracket
# encloses (one looking ahead at no closing bracket before an opening one).
SIGNATURE = re.compile(r"def \w+\((.*?)\)(?: ->[^:\n]*)?:", re.S)
TOP_LEVEL_COMMA = re.compile(r",(?![^(\[{]*[)\]}])")


def read_signature(text):
    """[(parameter name, default text or None), ...] of the first `def NAME(...):` in text, read as
    the REPL code of teacher.py's `parse` strategy reads it; [] if there is none. A bare * or / is
    no parameter. Commas inside strings or comments mislead it: source tasks ask only about
    signatures it reads as ast does."""
    m = SIGNATURE.search(text)
    out = []
    for piece in TOP_LEVEL_COMMA.split(m.group(1)) if m else []:
        if name := re.match(r"\W*(\w+)", piece):
            default = " ".join(piece.split("=", 1)[1].split()) if "=" in piece else None
            out.append((name.group(1), default))
    return out


# ----------------------------------------------------------------------------------
# The source family

QUESTIONS = ("first_param", "n_params", "params", "default")
# What question=None asks. "params" only when asked for: listing the first parameter of every
# function in the context earns it F1 0.17-0.28 (the asked one's first parameter is among them).
DEFAULT_QUESTIONS = ("first_param", "n_params", "default")
SCORING = {"first_param": "exact", "n_params": "exact", "params": "f1", "default": "exact"}
MAX_SIGNATURE_CHARS = 300  # from "def" to the body: a printed window of this size shows all of it
MAX_DEFAULT_CHARS = 40   # longer defaults (big tuples, long strings) are not asked about
HEADER = "# ---- file: {} ----"
MAX_DRAWS = 500           # contexts drawn for one task before giving up (short lengths need a few)
# What a count question asks: a count drawn uniformly from these first, then a function with it.
# Drawn from the functions instead, 2 would be the answer half the time.
N_PARAMS_ASKED = range(2, 9)
# Defaults never asked: None, False, 0 and True are three quarters of all defaults in the stdlib.
COMMON_DEFAULTS = frozenset({"none", "false", "true", "0"})

TEMPLATES = {
    "seen": {
        "first_param": (
            "What is the name of the first parameter of the function `{name}`? Answer with the name only.",
            "In the source code, the function {name} is defined once. What is its first parameter called?",
            "Which parameter comes first in the signature of def {name}(...)?",
            "Give the first argument name in the definition of `{name}`.",
        ),
        "n_params": (
            "How many parameters does the function `{name}` take? Count every parameter, including *args, "
            "**kwargs and keyword-only ones. Answer with a number.",
            "Count the parameters in the definition of `{name}` (every one, *args and **kwargs included).",
            "What is the number of parameters of def {name}(...), counting all of them?",
            "The function {name} is defined in the code. How many parameters does its signature list? "
            "Reply with a number.",
        ),
        "params": (
            "List the parameter names of the function `{name}`, in order. Answer with a Python list of strings.",
            "What are the parameters of def {name}(...)? Give their names in order.",
            "Which parameters does `{name}` take? List every name, in the order of the signature.",
            "Write down the names of all parameters in the definition of {name}, in order, as a list.",
        ),
        "default": (
            "What is the default value of the parameter `{param}` of the function `{name}`? Answer with the "
            "value as written in the code.",
            "In the definition of `{name}`, what default does `{param}` have?",
            "If `{name}` is called without `{param}`, which value does `{param}` take, as written in "
            "def {name}(...)?",
            "Give the default of parameter {param} in def {name}(...).",
        ),
    },
    "held_out": {
        "first_param": (
            "Name the parameter that {name} takes before all others. Reply with just the identifier.",
            "The definition of {name} opens its parameter list with which identifier?",
            "Find where `{name}` is defined; its argument list starts with what name?",
        ),
        "n_params": (
            "In total, how many arguments are declared in the signature of {name}, star arguments included? "
            "Give just the count.",
            "Find def {name}. Its parameter list has how many entries (counting *args, **kwargs and "
            "keyword-only ones, but not a bare * or /)?",
            "Tell me the parameter count of `{name}`, all kinds included.",
        ),
        "params": (
            "Enumerate, left to right, the argument names that {name} accepts. Reply with the names separated "
            "by commas.",
            "Find def {name} and tell me each of its parameters by name, from first to last.",
            "The signature of `{name}`: which identifiers does it declare as parameters, in sequence?",
        ),
        "default": (
            "When the caller omits {param}, what value does {name} fall back to? Quote it as the source "
            "writes it.",
            "Find def {name}: the argument {param} is given which value by default?",
            "Report the fallback value written for `{param}` in the signature of `{name}`.",
        ),
    },
}


def _template_pattern(template):
    pattern, seen = re.escape(template), set()
    for field in ("name", "param"):
        def group(_, field=field):
            first = field not in seen
            seen.add(field)
            return f"(?P<{field}>\\w+)" if first else f"(?P={field})"
        pattern = re.sub(re.escape(re.escape("{" + field + "}")), group, pattern)
    return re.compile(pattern)


_SEEN_PATTERNS = [(q, _template_pattern(t)) for q, ts in TEMPLATES["seen"].items() for t in ts]


def parse_source_query(query):
    """(question, function name, parameter name or None) of a query in a seen wording, else None."""
    for question, pattern in _SEEN_PATTERNS:
        if m := pattern.search(query):
            return question, m.group("name"), m.groupdict().get("param")
    return None


def _norm(text):  # as tasks.normalize compares exact answers (tasks.py imports this file, not back)
    s = str(text).strip().strip(" \t\r\n\"'`*.,;:!?")
    while len(s) >= 2 and s[0] + s[-1] in ("()", "[]", "{}"):
        s = s[1:-1].strip(" \t\r\n\"'`*.,;:!?")
    return " ".join(s.split()).lower()


@functools.lru_cache(maxsize=None)
def _functions(name):
    """Top-level functions of a stdlib file with 2+ parameters that read_signature reads as ast
    does: [(name, offset of "def NAME(" in the text, offset where the body starts, params,
    {param: default} for the defaults it reads the same way)]."""
    text = document_text("code", name)
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ()
    line_starts = [0]
    for line in text.split("\n"):
        line_starts.append(line_starts[-1] + len(line) + 1)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        params = [p.arg for p in a.posonlyargs + a.args] + ([a.vararg.arg] if a.vararg else []) + \
            [p.arg for p in a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
        if len(params) < 2:
            continue
        start = text.find(f"def {node.name}(", line_starts[node.lineno - 1])
        body = line_starts[node.body[0].lineno - 1] + node.body[0].col_offset
        if start < 0 or body - start > MAX_SIGNATURE_CHARS:
            continue
        read = read_signature(text[start:body])
        if [p for p, _ in read] != params:
            continue
        positional = a.posonlyargs + a.args
        pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults)) + \
            [(p, d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
        said, defaults = dict(read), {}
        for p, d in pairs:
            value = ast.unparse(d)
            if (d.lineno == d.end_lineno and len(value) <= MAX_DEFAULT_CHARS and _norm(value)
                    and _norm(value) == _norm(ast.get_source_segment(text, d)) == _norm(said.get(p.arg))):
                defaults[p.arg] = value
        out.append((node.name, start, body, tuple(params), defaults))
    return tuple(out)


def _source_context(rng, length, part):
    """Files of `part` under their headers, in random order, cut at exactly `length` characters;
    and [(file name, offset of its text in the context)]."""
    pieces, placed, total = [], [], 0
    while total < length:
        order = list(documents("code", part))
        rng.shuffle(order)
        for name in order:
            text = document_text("code", name)
            if not text:
                continue
            head = HEADER.format(name) + "\n"
            placed.append((name, total + len(head)))
            pieces.append(head + text + "\n")
            total += len(pieces[-1])
            if total >= length:
                break
    return "".join(pieces)[:length], placed


def _options(function, question):
    """[(answer, parameter asked about or None), ...] that a question could have about a function."""
    _, _, _, params, defaults = function
    if question == "first_param":
        return [(params[0], None)]
    if question == "n_params":
        return [(len(params), None)]
    if question == "params":
        return [(list(params), None)]
    return [(value, param) for param, value in defaults.items()]


def _asked(answer, question, first, target):
    """Whether an answer may be asked: never what a key-blind first match names (the first
    parameter of the context's first `def`), never a most common default, a count only when
    it is the target count."""
    if question == "first_param":
        return _norm(answer) != first
    if question == "params":
        return first not in map(_norm, answer)
    if question == "n_params":
        return answer == target
    return _norm(answer) not in COMMON_DEFAULTS


def source_task(rng, length, question=None, wording="seen"):
    """(query, context, answer, scoring) of a question about one function of real stdlib code;
    the context is exactly `length` characters of the files of the wording's part."""
    if wording not in PARTS:
        raise ValueError(f"wording must be one of {PARTS}, got {wording!r}")
    if question is not None and question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    if length < 2000:
        raise ValueError(f"length={length} is too short for a source task: use length >= 2000")
    asked = question or rng.choice(DEFAULT_QUESTIONS)
    target = rng.choice(N_PARAMS_ASKED) if asked == "n_params" else None
    for draw in range(MAX_DRAWS):  # a short context may hold no function to ask about: draw another
        if target is not None and draw % 50 == 49:
            target = rng.choice(N_PARAMS_ASKED)  # so rare a count that this length seldom has it
        context, placed = _source_context(rng, length, wording)
        defined = Counter(re.findall(r"def (\w+)\(", context))
        classes = set(re.findall(r"\bclass\s+(\w+)", context))
        functions = [f for name, offset in placed for f in _functions(name)
                     if offset + f[2] <= length and defined[f[0]] == 1 and f[0] not in classes]
        first = _norm(source_cheap_answers(context)["first match"])
        if asked == "default" and question is None and not any(_asked(a, "default", first, target)
                                                               for f in functions for a, _ in _options(f, "default")):
            asked = rng.choice(DEFAULT_QUESTIONS[:2])   # no default to ask about here: another question
            target = rng.choice(N_PARAMS_ASKED) if asked == "n_params" else None
            continue
        options = [(f[0], answer, param) for f in functions for answer, param in _options(f, asked)
                   if _asked(answer, asked, first, target)]
        if not options:
            continue
        # An answer value uniformly among those present, then a function with it: a frequent
        # value is not asked more often for being frequent.
        by_value = {}
        for option in options:
            by_value.setdefault(_norm(option[1]), []).append(option)
        function_name, answer, param = rng.choice(by_value[rng.choice(sorted(by_value))])
        template = rng.choice(TEMPLATES[wording][asked])
        query = template.format(name=function_name, param=param)
        return query, context, answer, SCORING[asked]
    raise ValueError(f"no function to ask about in {MAX_DRAWS} draws of {length} characters: use a longer length")


_FIRST_PARAMS = re.compile(r"\bdef \w+\(\s*\**(\w+)")


def source_cheap_answers(context):
    """Key-blind answers: the first parameter of the first `def` in the context, and the first
    parameters of every `def` at once."""
    found = list(dict.fromkeys(_FIRST_PARAMS.findall(context)))
    return {"first match": found[0] if found else "", "every candidate": ", ".join(found)}


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Print one source task.")
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question", choices=QUESTIONS)
    parser.add_argument("--wording", default="seen", choices=PARTS)
    args = parser.parse_args(argv)
    query, context, answer, scoring = source_task(random.Random(args.seed), args.length, args.question, args.wording)
    print(f"{context[:600]}\n...\nquery: {query}\nanswer: {answer!r} ({scoring})")


if __name__ == "__main__":
    main()
