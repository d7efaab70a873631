"""Careless input: every entry point checks before it works, says what to do in a sentence, never
hangs, and never loses or overwrites work (issue 20). Each test is one finding of that issue.

Most of them make loading a model raise ModelLoaded: a refusal must come before it, not after.
"""

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import bench
import checks
import eval as evaluation
import lora
import rlm
import tasks
import teacher
import config
import train
import view
from scripted import ScriptedPolicy, repl_block
from trace import Call, Cost, Rollout

ROOT = Path(__file__).resolve().parent.parent
MAINS = {"rlm.py": rlm.main, "eval.py": evaluation.main, "train.py": train.main, "view.py": view.main,
         "teacher.py": teacher.main, "bench.py": bench.main}


class ModelLoaded(Exception):
    """Raised where a model would load: the tests that use it expect to stop before."""


def no_model(*args, **kwargs):
    raise ModelLoaded("a model was loaded")


@pytest.fixture
def forbid_models(monkeypatch):
    for target in (lora, train, bench):
        for name in ("load_policy", "load_model", "load"):
            if hasattr(target, name):
                monkeypatch.setattr(target, name, no_model)


def refusal(monkeypatch, script, *argv):
    """Run a script's main as `python script argv...` -> its exit message (it must exit, with a sentence)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        MAINS[script]()
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith(f"{script}: "), message
    return message


def write_jsonl(path, records, prefix=b""):
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in records).encode())
    return path


def fake_adapter(folder):
    """A folder that looks like Policy.save_adapter's output (the checks read files, not weights)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"w": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    return folder


RECORD = {"context": "The code is 7.", "question": "What is the code?", "answer": "7"}
ROOT_CALL = Call(0, None, "root", 0, "What is the code?", answer="7", started=1.0, ended=2.0,
                 turns=[{"reply": "FINAL(7)", "code": [], "observation": None, "sub_calls": []}])
ROLLOUT = dataclasses.asdict(Rollout("What is the code?", "7", [ROOT_CALL], Cost(), 100))  # a traces line


# --- 1. the hang ------------------------------------------------------------------------


def test_a_failing_task_fails_alone_with_its_error_and_the_others_finish(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, json, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import eval as evaluation
        from rlm import Batcher
        from scripted import ScriptedPolicy, repl_block
        from tasks import Task
        good = Task("mine", "What is the code?", "The code is 7.", "7", "exact", 1)
        bad = Task("mine", "What is the code?", 42, "7", "exact", 2)  # a context no REPL can hold
        policy = ScriptedPolicy(lambda text: repl_block("FINAL('7')"))
        records = asyncio.run(evaluation.evaluate(Batcher(policy), {{14: [good, bad, good]}}, ["rlm", "direct"],
                                                  progress=False))
        print(json.dumps([[r["seed"], r["method"], r["answer"], r.get("error")] for r in records]))
        """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(runs) == 6
    for seed, method, answer, error in runs:
        if seed == 2 and method == "rlm":
            assert answer is None and "TypeError" in error
        else:  # the other rollouts finished, and direct, which needs no REPL, answered even the odd one
            assert answer is not None and error is None


def test_eval_refuses_a_jsonl_context_that_is_not_text_before_loading(tmp_path, monkeypatch, forbid_models):
    path = write_jsonl(tmp_path / "b.jsonl", [RECORD, {**RECORD, "context": 42}])
    message = refusal(monkeypatch, "eval.py", "--jsonl", path, "--out", tmp_path / "o.json")
    assert "line 2" in message and "context must be a string" in message


# --- 2. work destroyed ---------------------------------------------------------------------


def test_view_never_writes_its_page_over_an_input(tmp_path, monkeypatch):
    trace = write_jsonl(tmp_path / "t.jsonl", [ROLLOUT])
    named_html = write_jsonl(tmp_path / "t.html", [ROLLOUT])
    before = trace.read_bytes()
    assert "input" in refusal(monkeypatch, "view.py", trace, "-o", trace)
    assert "-o" in refusal(monkeypatch, "view.py", named_html)
    assert trace.read_bytes() == before and named_html.read_bytes() == before


def test_train_refuses_a_non_empty_out_dir_unless_resumed_or_overwritten(tmp_path, monkeypatch, forbid_models):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    message = refusal(monkeypatch, "train.py", "--out_dir", tmp_path)
    assert "--resume" in message and "--overwrite" in message
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # --overwrite deletes the earlier run's files (and only those) before anything else happens
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint").mkdir()
    monkeypatch.setattr(sys, "argv", ["train.py", "--out_dir", str(tmp_path), "--overwrite"])
    with pytest.raises(ModelLoaded):
        train.main()
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize("state", [b"", b"not a checkpoint", "empty dict", "cut short"])
def test_resume_refuses_a_damaged_or_foreign_state_and_leaves_it(state, tmp_path, monkeypatch, forbid_models):
    path = tmp_path / "checkpoint" / "state.pt"
    path.parent.mkdir()
    if state == "empty dict":
        torch.save({}, path)
    elif state == "cut short":
        torch.save({"step": 3, "config": {}, "blob": list(range(1000))}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(state)
    before = path.read_bytes()
    message = refusal(monkeypatch, "train.py", "--resume", "--out_dir", tmp_path)
    assert "cannot continue" in message and "state.pt" in message
    assert path.read_bytes() == before


def test_resume_refuses_a_checkpoint_whose_adapter_is_damaged(tmp_path, monkeypatch, forbid_models):
    (tmp_path / "checkpoint").mkdir()
    state = {k: {} for k in ("step", "evaluated", "stage", "phase", "config", "logs", "optimizer", "rng")}
    torch.save(state, tmp_path / "checkpoint" / "state.pt")
    weights = fake_adapter(tmp_path / "checkpoint" / "adapter") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert "adapter" in refusal(monkeypatch, "train.py", "--resume", "--out_dir", tmp_path)


# --- 3. silently wrong ---------------------------------------------------------------------


def test_eval_adapters_needs_name_equals_folder(tmp_path, monkeypatch, forbid_models):
    folder = fake_adapter(tmp_path / "adapter")
    assert "NAME=FOLDER" in refusal(monkeypatch, "eval.py", "--adapters", folder, "--out", tmp_path / "o.json")


@pytest.mark.parametrize("script, extra", [
    ("rlm.py", ["--query", "q", "--context", "CONTEXT"]),
    ("eval.py", []),
    ("train.py", ["--out_dir", "OUT"]),
])
def test_a_negative_temperature_is_refused(script, extra, tmp_path, monkeypatch, forbid_models):
    (tmp_path / "c.txt").write_text("some text")
    extra = [str(tmp_path / "c.txt") if a == "CONTEXT" else str(tmp_path / "o") if a == "OUT" else a for a in extra]
    assert "--temperature must be" in refusal(monkeypatch, script, *extra, "--temperature", "-1",
                                              *(["--out", tmp_path / "o.json"] if script == "eval.py" else []))


def test_rlm_refuses_negative_turns(tmp_path, monkeypatch, forbid_models):
    (tmp_path / "c.txt").write_text("some text")
    message = refusal(monkeypatch, "rlm.py", "--query", "q", "--context", tmp_path / "c.txt", "--max-turns", "-1")
    assert "--max-turns must be at least 0" in message


def test_view_refuses_a_negative_last(tmp_path, monkeypatch):
    trace = write_jsonl(tmp_path / "t.jsonl", [ROLLOUT])
    assert "--last must be at least 0" in refusal(monkeypatch, "view.py", trace, "--last", "-1")
    assert not (tmp_path / "t.html").exists()


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--jsonl", "EMPTY"], "holds no records"),
    (["--baselines", "-1", "--adapter", "ADAPTER"], "--baselines must be at least 0"),
    (["--baselines", "2"], "give --adapter or --adapters"),  # else its rows merge with the run's own
    (["--methods", "rlm,telepathy"], "unknown --methods telepathy"),
])
def test_eval_refuses_what_would_give_an_empty_or_wrong_table_before_loading(flags, message, tmp_path, monkeypatch,
                                                                            forbid_models):
    (tmp_path / "empty.jsonl").write_text("\n")
    fake_adapter(tmp_path / "adapter")
    flags = [str(tmp_path / "empty.jsonl") if f == "EMPTY" else str(tmp_path / "adapter") if f == "ADAPTER" else f
             for f in flags]
    assert message in refusal(monkeypatch, "eval.py", *flags, "--out", tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


def test_teacher_refuses_an_unknown_strategy(monkeypatch, forbid_models):
    message = refusal(monkeypatch, "teacher.py", "--family", "niah", "--strategy", "bogus")
    assert "no strategy 'bogus'" in message and "split_async" in message


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be greater than 0"),
    (["--eps_low", "1.5"], "--eps_low must be at least 0 and below 1"),
    (["--eps_high", "-0.1"], "--eps_high must be at least 0"),
    (["--grad_clip", "0"], "--grad_clip must be greater than 0"),
    (["--beta", "-1"], "--beta must be at least 0"),
    (["--weight_decay", "-0.1"], "--weight_decay must be at least 0"),
    (["--promote_at", "1.5"], "--promote_at must be between 0 and 1"),
    (["--max_sub_calls", "-1"], "--max_sub_calls must be at least 0"),
    (["--max_depth", "-1"], "--max_depth must be at least 0"),
    (["--eval_n", "-1"], "--eval_n must be at least 0"),
    (["--eval_every", "-2"], "--eval_every must be at least 0"),
    (["--warm_demos", "-3"], "--warm_demos must be at least 0"),
    (["--checkpoint_every", "-1"], "--checkpoint_every must be at least 0"),
    (["--families", "aggregate", "--lengths", "1000"], "too small for aggregate"),
])
def test_train_refuses_settings_out_of_range(flags, message):
    with pytest.raises(SystemExit) as exit_info:
        config.check_config(train.parse_config(flags))
    assert message in str(exit_info.value)


def option_help(help_text, flag):
    """The lines of one option in argparse's --help output: its own line and the indented ones after it."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  (-\w, )?{re.escape(flag)}\b", line))
    rest = itertools.takewhile(lambda line: line.startswith("    ") and not line.lstrip().startswith("-"),
                               lines[start + 1:])
    return " ".join([lines[start], *rest])


def test_every_flags_help_states_its_range(capsys, monkeypatch):
    for script, flags in [("rlm.py", ["--max-turns", "--temperature", "--max-call-tokens", "--max-depth"]),
                          ("eval.py", ["--n", "--baselines", "--temperature", "--max-turns", "--max-new-tokens"]),
                          ("view.py", ["--last"]), ("train.py", ["--temperature", "--eps_low", "--promote_at"]),
                          ("bench.py", ["--repeats", "--task-chars"])]:
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit):
            MAINS[script]()
        text = capsys.readouterr().out
        for flag in flags:
            words = option_help(text, flag)
            assert any(w in words for w in ("at least", "greater than", "between")), (script, flag, words)


# --- 4. work lost after it is done ---------------------------------------------------------


@pytest.mark.parametrize("script, flag", [
    ("rlm.py", "--trace"), ("rlm.py", "--html"), ("eval.py", "--out"), ("eval.py", "--traces"), ("bench.py", "--out"),
])
@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(script, flag, where, tmp_path, monkeypatch,
                                                                        forbid_models):
    (tmp_path / "c.txt").write_text("some text")
    (tmp_path / "a file").write_text("x")
    target = tmp_path / "a folder" if where == "a folder" else tmp_path / "a file" / "out.json"
    (tmp_path / "a folder").mkdir()
    argv = {"rlm.py": ["--query", "q", "--context", tmp_path / "c.txt"], "eval.py": ["--out", tmp_path / "o.json"],
            "bench.py": ["--only", "tasks"]}[script]
    message = refusal(monkeypatch, script, *argv, flag, target)
    assert flag in message and ("folder" in message or "cannot be written" in message)


def test_eval_writes_results_with_mixed_type_family_values(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{**RECORD, "family": 3}, {**RECORD, "family": "words"}])
    assert [t.family for t in tasks.load_jsonl(path)] == ["3", "words"]
    monkeypatch.setattr(lora, "load_policy", lambda *a, **k: ScriptedPolicy(lambda text: repl_block("FINAL('7')")))
    monkeypatch.setattr(sys, "argv", ["eval.py", "--jsonl", str(path), "--methods", "rlm", "--out",
                                      str(tmp_path / "o.json")])
    evaluation.main()
    report = json.loads((tmp_path / "o.json").read_text())
    assert sorted(r["family"] for r in report["summary"]) == ["3", "words"]
    # and records from elsewhere, with families of two types, still summarize
    records = [dict(report["records"][0], family=3), dict(report["records"][1], family="words")]
    assert len(evaluation.summarize(records)) == 2


def test_a_bad_second_adapter_is_found_before_the_first_is_evaluated(tmp_path, monkeypatch, forbid_models):
    good = fake_adapter(tmp_path / "good")
    message = refusal(monkeypatch, "eval.py", "--adapters", f"a={good},b={tmp_path / 'missing'}",
                      "--out", tmp_path / "o.json")
    assert "missing" in message and "no such folder" in message


def test_eval_keeps_the_first_policys_results_when_a_later_one_fails(tmp_path, monkeypatch):
    loads = []

    def load_policy(model=None, adapter=None):
        loads.append(adapter)
        if len(loads) > 1:
            raise ModelLoaded("the second policy failed to load")
        return ScriptedPolicy(lambda text: repl_block("FINAL('7')"))

    monkeypatch.setattr(lora, "load_policy", load_policy)
    path = write_jsonl(tmp_path / "r.jsonl", [RECORD])
    a, b = fake_adapter(tmp_path / "a"), fake_adapter(tmp_path / "b")
    monkeypatch.setattr(sys, "argv", ["eval.py", "--jsonl", str(path), "--methods", "rlm",
                                      "--adapters", f"first={a},second={b}", "--out", str(tmp_path / "o.json")])
    with pytest.raises(ModelLoaded):
        evaluation.main()
    report = json.loads((tmp_path / "o.json").read_text())
    assert [r["policy"] for r in report["summary"]] == ["first"]


def test_train_with_no_evaluation_and_one_checkpoint_at_the_end_finishes_cleanly(tmp_path, monkeypatch):
    from conftest import make_tiny_policy

    monkeypatch.setattr(train, "load_policy", lambda *a, **k: make_tiny_policy(seed=3))
    out_dir = tmp_path / "run"
    train.main(["--steps", "1", "--tasks_per_step", "1", "--group_size", "2", "--families", "niah",
                "--lengths", "2000", "--warm_demos", "0", "--max_turns", "1", "--max_new_tokens", "24",
                "--max_generated_tokens", "96", "--temperature", "1.0", "--eval_n", "0", "--eval_every", "0",
                "--checkpoint_every", "0", "--no-gradient_checkpointing", "--out_dir", str(out_dir)])
    for name in ("curves.png", "metrics.jsonl", "adapter/adapter_config.json", "checkpoint/state.pt"):
        assert (out_dir / name).exists(), name
    assert not (out_dir / "eval.jsonl").exists()


# --- 5. a sentence, not a traceback ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "folder", "binary"])
@pytest.mark.parametrize("script", ["rlm.py", "eval.py", "view.py"])
def test_an_input_file_that_is_missing_a_folder_or_binary_is_refused(kind, script, tmp_path, monkeypatch,
                                                                     forbid_models):
    path = tmp_path / "input.jsonl"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    argv = {"rlm.py": ["--query", "q", "--context", path], "eval.py": ["--jsonl", path, "--out", tmp_path / "o.json"],
            "view.py": [path, "-o", tmp_path / "page.html"]}[script]
    message = refusal(monkeypatch, script, *argv)
    assert {"missing": "no such file", "folder": "is a folder", "binary": "looks binary"}[kind] in message


@pytest.mark.parametrize("script", ["eval.py", "view.py"])
def test_malformed_jsonl_names_the_files_line(script, tmp_path, monkeypatch, forbid_models):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(RECORD) + "\n\n" + '{"context": "x", "question": \n')
    argv = ["--jsonl", path, "--out", tmp_path / "o.json"] if script == "eval.py" else [path, "-o", tmp_path / "p.html"]
    message = refusal(monkeypatch, script, *argv)
    assert "line 3" in message and "JSON" in message


@pytest.mark.parametrize("line", ['{"calls": 5}', '{"calls": []}', '{"calls": [{"id": 0}]}', '{"trace": {"calls": "x"}}', "[1, 2]"])
def test_view_refuses_lines_that_are_no_rollouts(line, tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ROLLOUT) + "\n" + line + "\n")
    assert "line 2" in refusal(monkeypatch, "view.py", path, "-o", tmp_path / "p.html")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "bom.jsonl", [RECORD], prefix=b"\xef\xbb\xbf")
    assert [t.answer for t in tasks.load_jsonl(path)] == ["7"]
    trace = write_jsonl(tmp_path / "t.jsonl", [ROLLOUT], prefix=b"\xef\xbb\xbf")
    assert view.load(str(trace)) == [ROLLOUT]


def test_unknown_methods_are_found_before_the_model_loads(tmp_path, monkeypatch, forbid_models):
    assert "unknown --methods" in refusal(monkeypatch, "eval.py", "--methods", "rlm,magic", "--out", tmp_path / "o")


@pytest.mark.parametrize("damage", ["missing", "no config", "cut short"])
@pytest.mark.parametrize("script", ["rlm.py", "eval.py", "train.py"])
def test_a_bad_adapter_is_found_before_the_base_model_loads(damage, script, tmp_path, monkeypatch, forbid_models):
    folder = tmp_path / "adapter"
    if damage != "missing":
        weights = fake_adapter(folder) / "adapter_model.safetensors"
        if damage == "no config":
            (folder / "adapter_config.json").unlink()
        else:
            weights.write_bytes(weights.read_bytes()[:-8])
    (tmp_path / "c.txt").write_text("some text")
    argv = {"rlm.py": ["--query", "q", "--context", tmp_path / "c.txt", "--adapter", folder],
            "eval.py": ["--adapter", folder, "--out", tmp_path / "o.json"],
            "train.py": ["--init_adapter", folder, "--out_dir", tmp_path / "run"]}[script]
    message = refusal(monkeypatch, script, *argv)
    assert str(folder) in message and "adapter" in message


def test_teacher_loads_no_model(monkeypatch, forbid_models, capsys, smollm_tokenizer):
    monkeypatch.setattr(lora, "load_tokenizer", lambda model=None: smollm_tokenizer)
    monkeypatch.setattr(sys, "argv", ["teacher.py", "--family", "niah", "--strategy", "regex", "--length", "3000"])
    teacher.main()
    assert "correctness: 1.0" in capsys.readouterr().out


def test_bench_of_tasks_alone_loads_no_model(tmp_path, monkeypatch, forbid_models):
    out = tmp_path / "bench.json"
    bench.main(["--only", "tasks", "--tiny", "--task-chars", "3000", "--out", str(out)])
    assert {r["bench"] for r in json.loads(out.read_text())["rows"]} == {"tasks"}


def test_bad_bytes_in_a_context_are_counted_and_reported(tmp_path, monkeypatch, forbid_models, capsys):
    path = tmp_path / "c.txt"
    path.write_bytes(b"caf\xe9 and \xff\xfe more")
    text, replaced = checks.read_text(str(path), "--context")
    assert replaced == 3 and text == "caf\ufffd and \ufffd\ufffd more"
    monkeypatch.setattr(sys, "argv", ["rlm.py", "--query", "q", "--context", str(path)])
    with pytest.raises(ModelLoaded):
        rlm.main()
    assert "3 bytes" in capsys.readouterr().err


def test_a_valid_context_file_reads_as_before(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("line one\r\nline two\rcafé\n".encode())
    with open(path, encoding="utf-8", errors="replace") as f:  # how rlm.py read it before the checks
        assert checks.read_text(str(path), "--context") == (f.read(), 0)


def test_another_ranks_write_probe_does_not_make_an_out_dir_look_taken(tmp_path):
    """Under torchrun every rank probes --out_dir (checks.writable_folder) and then checks that it is
    empty: a probe file another rank has made and not yet removed is not an earlier run's output."""
    (tmp_path / f"{checks.WRITE_PROBE}12345").write_text("")
    config.prepare_out_dir({"out_dir": str(tmp_path), "overwrite": False}, resuming=False)  # no SystemExit
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="is not empty \\(metrics.jsonl\\)"):
        config.prepare_out_dir({"out_dir": str(tmp_path), "overwrite": False}, resuming=False)
