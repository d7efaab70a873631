"""A policy with canned replies, for driving rlm.py without a model.

Its "tokenizer" maps each UTF-8 byte b to the id b + 1 and keeps id 0 for end-of-turn,
so token counts are byte counts and a test can work costs out by hand. A script is a
function from the whole prompt text to the reply; `parse` splits a prompt into what a
script usually needs (is it an RLM call or a plain completion, its query, which turn,
the last observation).
"""

import re
import threading
import time
from dataclasses import dataclass

EOS = 0


@dataclass
class ScriptedSample:
    token_ids: list
    logprobs: list
    finish_reason: str


def encode(text):
    return [b + 1 for b in text.encode("utf-8")]


def parse(prompt_text):
    """-> dict(kind="rlm" or "llm", query, turn, observation)."""
    if prompt_text.startswith("<system>"):
        query = re.search(r"<user>Query: (.*?)\n\nThe context is", prompt_text, re.DOTALL).group(1)
        observation = prompt_text.rsplit("<user>", 1)[1][: -len("<assistant>")]
        return {"kind": "rlm", "query": query, "turn": prompt_text.count("<assistant>") - 1,
                "observation": observation}
    prompt = prompt_text[len("<user>"): -len("<assistant>")]
    return {"kind": "llm", "query": prompt, "turn": 0, "observation": None}


class ScriptedPolicy:  # rlm.SamplingPolicy with canned replies
    def __init__(self, script, delay=0.0):
        self.script = script  # prompt text -> reply text
        self.delay = delay  # seconds per sampling call (or a function giving them), so requests pile up
        self.eos_token_ids = [EOS]
        self.batch_sizes = []  # one entry per sampling call
        self.prompts = []  # every prompt sampled from, as ids
        self._lock = threading.Lock()

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i != EOS).decode("utf-8", errors="replace")

    def chat_ids(self, messages):
        return encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def followup_ids(self, user_text, ended_with_eos):
        return ([] if ended_with_eos else [EOS]) + encode(f"<user>{user_text}<assistant>")

    def sample(self, prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_strings=None, seeds=None):
        with self._lock:
            self.batch_sizes.append(len(prompts))
            self.prompts += [list(p) for p in prompts]
        time.sleep(self.delay() if callable(self.delay) else self.delay)
        samples = []
        for p in prompts:
            ids = (encode(self.script(self.decode(p))) + [EOS])[:max_new_tokens]
            samples.append(ScriptedSample(ids, [-0.5] * len(ids), "stop" if ids[-1] == EOS else "length"))
        return samples


def repl_block(code):
    return f"```repl\n{code}\n```"


NEEDLE_SOLVER = repl_block(   # any wording: the query's word with a digit that the context holds, then its line's value
    "import re\n"
    "key = next(w for w in re.findall(r'[\\w-]+(?:\\.[\\w-]+)*', query) if re.search(r'\\d', w) and w in context)\n"
    "line = next(l for l in context.splitlines() if key in l)\n"
    "FINAL(max(re.findall(r'[\\w,-]*\\d[\\w,-]*', line.replace(key, ' ')), key=len))")
