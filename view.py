"""
A page of rollouts: one self-contained HTML file that shows what a Recursive Language
Model did, call by call, turn by turn, and when.

    python view.py out/train/samples.jsonl                  # -> out/train/samples.html
    python view.py trace.jsonl -o trace.html                # `python rlm.py ... --trace trace.jsonl`
    python view.py out/eval_traces.jsonl --last 20          # `python eval.py --traces out/eval_traces.jsonl`
    python rlm.py --query "..." --context notes.txt --html trace.html

    from view import write_html
    write_html(records, "out/train/eval_step5.html")        # rollouts, their dicts, or eval records with "trace"

For each rollout the page has a timeline (one bar per call, on the logical clock that
orders sub-call starts and ends as they happened: overlapping bars ran at once; wall
seconds in a second, folded timeline), the critical path marked in red (the chain of
calls whose generated tokens make the rollout's latency, as trace.py's heaviest_chain
counts it: it follows which sub-calls the code made wait for which, not the clock, so a
gathered call that happened to end before its twin started is still no link of a chain),
and the call tree: each call's kind, depth, query, answer and costs, then each turn's
reply (code highlighted), REPL observation and links to the sub-calls it made, with those
each one waited for. An index of all rollouts comes first,
with the task, answer, truth, correctness and reward when the records carry them.

Model output is untrusted: every piece of it is escaped text, folded with <details>
when long, never markup. The page embeds no data in script; its one small script (open
the folds around a linked call, expand or collapse all) is allowed by hash in the page's
Content-Security-Policy, which forbids every other script and any load from outside.
"""

import argparse
import base64
import hashlib
import html
import json
import keyword
import os
import re
import sys

from checks import InputError, input_file, json_lines, read_text, writable
from trace import critical_calls, rollout_from_dict

FOLD_CHARS, FOLD_LINES = 1500, 30  # longer text starts folded, whole, behind a one-line preview
FENCE = re.compile(r"```([A-Za-z]*)[ \t]*\n(.*?)```", re.DOTALL)  # the fences rlm.py runs, and any other
RUNS = {"repl", "python", "py"}  # languages rlm.py's CODE_BLOCK executes
API = ("FINAL", "FINAL_VAR", "llm_query", "llm_query_async", "llm_query_batched", "rlm_query", "rlm_query_async")
PY_TOKEN = re.compile(
    r"(?P<c>#[^\n]*)"
    r"|(?P<s>[rbfuRBFU]{0,2}(?:'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"))"
    rf"|(?P<a>\b(?:{'|'.join(API)})\b)"
    rf"|(?P<k>\b(?:{'|'.join(keyword.kwlist)})\b)"
    r"|(?P<n>\b\d[\d_]*(?:\.\d+)?\b)")
# Shown as visible escapes: control characters, and bidi overrides that would reorder what is read.
INVISIBLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

SCRIPT = """
function openAround(el) { for (; el; el = el.parentElement) if (el.tagName === 'DETAILS') el.open = true; }
function openTarget() { const el = document.getElementById(location.hash.slice(1)); if (el) { openAround(el); el.scrollIntoView(); } }
window.addEventListener('hashchange', openTarget);
window.addEventListener('DOMContentLoaded', () => {
  openTarget();
  for (const b of document.querySelectorAll('button[data-open]'))
    b.addEventListener('click', () => { for (const d of document.querySelectorAll('details')) d.open = b.dataset.open === '1'; });
});
"""
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; overflow-wrap: anywhere; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: .2em 0; padding: .3em .5em; background: #f6f6f4; }
pre.code { background: #f3f6fb; border-left: 3px solid #58c; } pre.obs { background: #f8f3e8; border-left: 3px solid #c93; }
.lang { float: right; color: #888; font-size: 11px; } .c { color: #787; } .s { color: #a52; } .k { color: #70a; }
.a { color: #06c; font-weight: bold; } .n { color: #164; } .dim, .preview { color: #777; }
table { border-collapse: collapse; } th { white-space: nowrap; overflow-wrap: normal; } td, th { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .right { color: #080; } .wrong { color: #b00; }
section.rollout { border-top: 2px solid #444; margin-top: 2em; }
.timeline { margin: .5em 0; } .tl-row { display: flex; align-items: center; height: 18px; }
.tl-label { width: 260px; flex: none; overflow: hidden; white-space: nowrap; font-size: 12px; }
.tl-track { position: relative; flex: 1; height: 14px; background: #f4f4f4; }
.bar { position: absolute; top: 1px; height: 12px; min-width: 3px; border-radius: 2px; box-sizing: border-box;
       font-size: 10px; line-height: 12px; color: #fff; overflow: hidden; text-decoration: none; }
.bar.root { background: #555; } .bar.rlm_query { background: #58c; } .bar.llm_query { background: #9b7; }
.bar.crit { outline: 2px solid #d00; } .tl-axis { display: flex; justify-content: space-between; margin-left: 260px; color: #777; font-size: 11px; }
.call { margin: .3em 0 .3em 1.2em; border-left: 2px solid #ccc; padding-left: .6em; }
.call.crit { border-left-color: #d00; } .call > summary { cursor: pointer; }
.kind { font-weight: bold; } .tag { font-size: 11px; padding: 0 4px; border-radius: 3px; background: #eee; }
.tag.crit { background: #fdd; color: #b00; } .tag.failed { background: #fed; color: #a50; }
.turn { margin: .3em 0 .3em .6em; } .turn > summary { color: #555; cursor: pointer; }
"""


def clean(text):
    """Model text as escaped HTML that shows every character, whatever bytes it came from."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates, e.g. from bad bytes
    text = INVISIBLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text)
    return html.escape(text, quote=True)


def fold(text, css="", body=None):
    """Short text as a <pre>; long text whole but folded behind a preview line."""
    text = str(text)
    body = clean(text) if body is None else body
    pre = f'<pre class="{css}">{body}</pre>'
    if len(text) <= FOLD_CHARS and text.count("\n") < FOLD_LINES:
        return pre
    return (f'<details class="fold"><summary><span class="preview">{clean(text[:120])}</span> &hellip; '
            f'<span class="dim">({len(text):,} characters, {text.count(chr(10)) + 1:,} lines)</span></summary>{pre}</details>')


def highlight(code):
    parts, pos = [], 0
    for m in PY_TOKEN.finditer(code):
        parts.append(clean(code[pos:m.start()]) + f'<span class="{m.lastgroup}">{clean(m.group())}</span>')
        pos = m.end()
    return "".join(parts) + clean(code[pos:])


def render_reply(reply):
    if reply is None:
        return '<p class="dim">(no reply: the rollout was stopped before this turn sampled)</p>'
    parts, pos = [], 0
    for m in FENCE.finditer(reply):
        if reply[pos:m.start()].strip():
            parts.append(fold(reply[pos:m.start()]))
        lang, code = m.group(1), m.group(2)
        ran = lang.lower() in RUNS
        label = f'<span class="lang">{clean(lang or "text")}{" &middot; ran" if ran else ""}</span>'
        parts.append(fold(code, "code", label + (highlight(code) if ran else clean(code))))
        pos = m.end()
    if reply[pos:].strip() or not parts:
        parts.append(fold(reply[pos:]))
    return "".join(parts)


# -----------------------------------------------------------------------------
# Timing: where each call sits on the clocks, and which calls make the critical path


def logical_intervals(rollout):
    """call id -> (start, end) on the rollout's logical clock; the root spans it all, failed calls have none."""
    spans = {s["call"]: (s["start"], s["end"]) for c in rollout.calls for t in c.turns for s in t["sub_calls"]}
    spans[0] = (0, max((end for _, end in spans.values()), default=0) + 1)
    return spans


def tree_order(rollout):
    """Calls depth-first, each parent before its children, children in the order they started."""
    children = {}
    for c in rollout.calls[1:]:
        children.setdefault(c.parent, []).append(c)
    order, todo = [], [rollout.calls[0]] if rollout.calls else []
    while todo:
        call = todo.pop()
        order.append(call)
        todo += sorted(children.get(call.id, []), key=lambda c: c.started, reverse=True)
    return order


def render_timeline(rollout, prefix, critical, clock):
    if clock == "logical":
        spans = logical_intervals(rollout)
        unit = "ticks of the logical clock (sub-call starts and ends, in the order they happened)"
    else:
        origin = rollout.calls[0].started
        spans = {c.id: (c.started - origin, c.ended - origin) for c in rollout.calls}
        unit = "seconds of wall time"
    total = max((end for _, end in spans.values()), default=1) or 1
    rows = []
    for call in tree_order(rollout):
        label = f'{"&nbsp;" * 3 * call.depth}#{call.id} {call.kind} <span class="dim">{clean(call.query[:60])}</span>'
        bar = '<span class="dim">&nbsp;no record (the sub-call failed)</span>'
        if call.id in spans:
            start, end = spans[call.id]
            left, width = 100 * start / total, 100 * (end - start) / total
            tip = clean(f"#{call.id} {call.kind}, {clock} {start:g} to {end:g}; {call.cost.generated_tokens} tokens "
                        f"generated in its subtree, critical path {call.cost.critical_path_tokens}")
            crit = " crit" if call.id in critical else ""
            bar = (f'<a class="bar {call.kind}{crit}" href="#{prefix}c{call.id}" data-call="{call.id}" '
                   f'data-start="{start:g}" data-end="{end:g}" style="left:{left:.4f}%;width:{width:.4f}%" '
                   f'title="{tip}">{call.id}</a>')
        rows.append(f'<div class="tl-row"><div class="tl-label">{label}</div><div class="tl-track">{bar}</div></div>')
    axis = f'<div class="tl-axis"><span>0</span><span>{unit}</span><span>{total:g}</span></div>'
    return f'<div class="timeline" data-clock="{clock}">{"".join(rows)}{axis}</div>'


# -----------------------------------------------------------------------------
# The call tree


def render_call(rollout, call, prefix, critical, children):
    c = call.cost
    crit = call.id in critical
    recorded = {s["call"] for t in rollout.calls[call.parent].turns for s in t["sub_calls"]} if call.parent is not None else {0}
    tags = ('<span class="tag crit">critical path</span> ' if crit else "") + (
        "" if call.id in recorded else '<span class="tag failed">failed: no answer returned</span> ')
    summary = (f'<span class="kind">#{call.id} {call.kind}</span> depth {call.depth} {tags}'
               f'<span class="dim">{clean(call.query[:100])}</span> &rarr; <b>{clean(call.answer[:100]) if call.answer is not None else "—"}</b>')
    costs = (f'<p class="dim">subtree: prompt {c.prompt_tokens:,} tokens, generated {c.generated_tokens:,} '
             f'(this call {sum(call.sampled_mask):,}), critical path {c.critical_path_tokens:,}, '
             f'wall {c.wall_seconds:.2f} s, sub-calls llm {c.sub_calls["llm_query"]} / rlm {c.sub_calls["rlm_query"]}</p>')
    parts = [costs, "<b>query</b>", fold(call.query), "<b>answer</b>", fold("—" if call.answer is None else call.answer)]
    if call.kind != "llm_query":  # a plain completion's one turn is its answer
        for i, turn in enumerate(call.turns):
            links = "".join(f'<li><a href="#{prefix}c{s["call"]}">{clean(s["fn"])} #{s["call"]}</a> '
                            f'<span class="dim">clock {s["start"]}&ndash;{s["end"]}'
                            f'{"; waited for " + ", ".join(f"#{a}" for a in s["after"]) if s.get("after") else ""}</span></li>'
                            for s in sorted(turn["sub_calls"], key=lambda s: s["start"]))
            body = ["<b>reply</b>", render_reply(turn["reply"])]
            if turn["observation"] is not None:
                body += ["<b>observation</b>", fold(turn["observation"], "obs")]
            if links:
                body.append(f"<b>sub-calls</b><ul>{links}</ul>")
            n = len(turn["sub_calls"])
            count = f" &middot; {n} sub-call" + "s" * (n != 1) if n else ""
            parts.append(f'<details class="turn" id="{prefix}c{call.id}t{i}" open><summary>turn {i}{count}</summary>'
                         f'{"".join(body)}</details>')
    parts += [render_call(rollout, child, prefix, critical, children) for child in children.get(call.id, [])]
    is_open = " open" if call.depth < 2 else ""
    return (f'<details class="call{" crit" if crit else ""}" id="{prefix}c{call.id}"{is_open}>'
            f'<summary>{summary}</summary>{"".join(parts)}</details>')


def render_rollout(rollout, index, meta):
    prefix, critical = f"r{index}", critical_calls(rollout)
    children = {}
    for call in rollout.calls[1:]:
        children.setdefault(call.parent, []).append(call)
    c = rollout.cost
    head = (f'<h2>Rollout {index}: {clean(rollout.query[:200])}</h2><p>{clean(describe(meta))} answer: '
            f'<b>{clean(rollout.answer) if rollout.answer is not None else "—"}</b>; {len(rollout.calls)} calls, '
            f'generated {c.generated_tokens:,} tokens of {rollout.max_generated_tokens:,}, prompt {c.prompt_tokens:,}, '
            f'depth {c.depth}, critical path {c.critical_path_tokens:,} tokens (red), wall {c.wall_seconds:.1f} s</p>')
    timelines = (render_timeline(rollout, prefix, critical, "logical")
                 + f'<details><summary>timeline in wall seconds</summary>{render_timeline(rollout, prefix, critical, "wall")}</details>')
    tree = render_call(rollout, rollout.calls[0], prefix, critical, children) if rollout.calls else ""
    return f'<section class="rollout" id="{prefix}">{head}{timelines}{tree}</section>'


# -----------------------------------------------------------------------------
# Several rollouts: the index and the page


def as_item(item):
    """-> (metadata, rollout or None). A Rollout, its dict, or a record (eval.py's) with an optional "trace"."""
    if not isinstance(item, dict):  # a trace.Rollout
        return {}, item
    meta, trace = ({}, item) if "calls" in item else (item, item.get("trace"))
    return meta, rollout_from_dict(trace) if isinstance(trace, dict) else trace


def describe(meta):
    keys = [k for k in ("method", "family", "length", "seed", "step") if k in meta]
    return " · ".join(f"{k} {meta[k]:,}" if k == "length" else f"{k} {meta[k]}" for k in keys)


def number(value, digits):
    return "—" if value is None else f"{value:.{digits}f}"


def render_index(items):
    rows = []
    for i, (meta, rollout) in enumerate(items):
        task = rollout.query if rollout else meta.get("query", "—")
        answer = meta.get("answer", rollout.answer if rollout else None)
        correctness = meta.get("correctness")
        mark = "" if correctness is None else (' class="num right"' if correctness >= 1 else ' class="num wrong"')
        link = f'<a href="#r{i}">{i}</a>' if rollout else f'{i} <span class="dim">(no trace)</span>'
        c = rollout.cost if rollout else None
        rows.append(f'<tr><td>{link}</td><td>{clean(describe(meta))}</td><td>{clean(task[:160])}</td>'
                    f'<td>{clean("—" if answer is None else str(answer)[:160])}</td>'
                    f'<td>{clean(str(meta.get("truth", "—"))[:160])}</td><td{mark or " class=num"}>{number(correctness, 2)}</td>'
                    f'<td class="num">{number(meta.get("reward"), 3)}</td><td class="num">{len(rollout.calls) if rollout else "—"}</td>'
                    f'<td class="num">{f"{c.generated_tokens:,}" if c else "—"}</td>'
                    f'<td class="num">{f"{c.critical_path_tokens:,}" if c else "—"}</td></tr>')
    header = "".join(f"<th>{h}</th>" for h in ("#", "run", "task", "answer", "truth", "correct", "reward", "calls",
                                                "generated", "critical path"))
    return f'<table class="index"><tr>{header}</tr>{"".join(rows)}</table>'


def render_page(items, title="RLM rollouts"):
    items = [as_item(item) for item in items]
    sections = [render_rollout(rollout, i, meta) for i, (meta, rollout) in enumerate(items) if rollout is not None]
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'"
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<title>{clean(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>'
            f'<h1>{clean(title)}</h1><p><button data-open="1">expand all</button> <button data-open="0">collapse all</button> '
            f'<span class="dim">bars: <span style="color:#555">root</span>, <span style="color:#58c">rlm_query</span>, '
            f'<span style="color:#9b7">llm_query</span>; red: the critical path</span></p>'
            f'{render_index(items)}{"".join(sections)}</body></html>')


def write_html(items, path, title="RLM rollouts"):
    """Write one self-contained page of rollouts (Rollout objects, their dicts, or records with "trace")."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_page(items, title))
    return path


def load(path):
    """Items from a traces file: rollout lines (samples.jsonl, --trace), eval records with traces, or
    eval.json. Raises InputError, naming the file's line, for what is not one of those."""
    if path.endswith(".json"):
        text, _ = read_text(path, "traces file", strict=True)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); give eval.py's .json output "
                             "or a .jsonl traces file") from None
        items = data.get("records") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise InputError(f"{path} holds no list of records; give eval.py's .json output or a .jsonl traces file")
        lines = list(enumerate(items, 1))
    else:
        lines = json_lines(path, "traces file")
    items = []
    for lineno, d in lines:
        where = f"record {lineno}" if path.endswith(".json") else f"line {lineno}"
        if not isinstance(d, dict):
            raise InputError(f"{path}, {where}: expected a JSON object (a rollout or a record), "
                             f"got {type(d).__name__}")
        if "calls" in d or "answer" in d or "trace" in d:  # not train.py's summary lines
            try:
                rollout = as_item(d)[1]
                if rollout is not None and not rollout.calls:
                    raise KeyError("no calls")
            except (KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{path}, {where}: not a rollout or record as rlm.py, train.py and eval.py write "
                                 f"them ({type(e).__name__}: {e}); give one of their traces files") from None
            items.append(d)
    return items


# -----------------------------------------------------------------------------
# Training curves (a PNG, beside the pages)


def plot_curves(metrics, path):
    """Training curves from metrics.jsonl lines (train.py's): warm-start NLL, then RL reward, accuracy and costs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    warm = [m for m in metrics if m.get("phase") == "warm"]
    rl = [m for m in metrics if m.get("phase", "rl") == "rl"]
    panels = [("warm start: NLL per token", warm, "nll"), ("RL: reward", rl, "reward"),
              ("RL: accuracy", rl, "accuracy"), ("RL: generated tokens", rl, "generated_tokens"),
              ("RL: prompt tokens", rl, "prompt_tokens"), ("RL: critical path (tokens)", rl, "critical_path")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, ms, key) in zip(axes.flat, panels):
        ax.plot([m["step"] for m in ms], [m[key] for m in ms], marker=".")
        if not ms:  # e.g. RL from --init_adapter has no warm start
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=90)
    os.replace(path + ".tmp.png", path)  # a later run reads it whole or not at all
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="traces files: .jsonl of rollouts or records, or eval.py's .json")
    parser.add_argument("-o", "--out", default=None,
                        help="the page to write, not one of the inputs (default: the first path, .html)")
    parser.add_argument("--last", type=int, default=0, help="only the last N items, N at least 0 (0: all)")
    args = parser.parse_args()
    out = args.out or os.path.splitext(args.paths[0])[0] + ".html"
    try:
        if args.last < 0:
            raise InputError(f"--last must be at least 0 (got {args.last}); 0 shows every item")
        for path in args.paths:
            input_file(path, "traces file")
        if args.out is None and out == args.paths[0]:
            raise InputError(f"{out} would be replaced by its own page; give a traces file (.jsonl or .json), "
                             "or the page's path with -o")
        writable(out, "the page" if args.out is None else "-o", inputs=args.paths)
        items = [item for path in args.paths for item in load(path)]
    except InputError as e:
        sys.exit(f"view.py: {e}")
    if not items:
        parser.exit(1, f"view.py: no rollouts or records found in {', '.join(args.paths)}; give a samples.jsonl, "
                       "an rlm.py --trace file or eval.py --traces output\n")
    items = items[-args.last:] if args.last else items
    write_html(items, out, title=", ".join(os.path.basename(p) for p in args.paths))
    print(f"wrote {out} ({len(items)} items)")


if __name__ == "__main__":
    main()
