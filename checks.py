"""
Checks of what a user hands the scripts, made before any model loads or any work starts.

    text, replaced = read_text(path, "--context")        # refuses a missing, folder or binary file
    writable(args.out, "--out", inputs=[args.jsonl])     # refuses an output that would replace an input
    adapter_folder(args.adapter, "--adapter")            # refuses a folder that holds no whole adapter
    refuse("eval.py", [at_least("--n", args.n, 1), ...]) # exits with every problem found, if any

A careless input should cost seconds, not the minutes of a model load or a run whose results
then cannot be saved; and it should say what to do in one sentence. A traceback is for bugs.
Failures are InputError, which the entry points turn into that sentence and exit status 1.
"""

import json
import os
import re
import sys


class InputError(ValueError):
    """Something the user gave cannot work; the message is one sentence that says what to do."""


def refuse(prog, problems):
    """Exit with every problem (sentences, Nones skipped), or return when there is none."""
    problems = [p for p in problems if p]
    if len(problems) == 1:
        sys.exit(f"{prog}: {problems[0]}")
    if problems:
        sys.exit(f"{prog}: this cannot work:\n  - " + "\n  - ".join(problems))


# --- numbers ---------------------------------------------------------------------------


def at_least(name, value, low):
    """None when value >= low, else the sentence."""
    return None if value >= low else f"{name} must be at least {low} (got {value})"


def positive(name, value):
    return None if value > 0 else f"{name} must be greater than 0 (got {value})"


def between(name, value, low, high):
    """None when low <= value <= high, else the sentence."""
    return None if low <= value <= high else f"{name} must be between {low} and {high} (got {value})"


def int_list(name, text, low=None):
    """Comma-separated integers, each at least low -> (list, problem or None)."""
    try:
        values = [int(x) for x in str(text).split(",")]
    except ValueError:
        return [], f"{name} must be comma-separated integers (got {text!r})"
    if low is not None and min(values) < low:
        return values, f"{name} must be at least {low} each (got {text})"
    return values, None


# --- files -----------------------------------------------------------------------------


def input_file(path, what):
    """Refuse a path that is missing or a folder, before anything is read or loaded."""
    if not os.path.exists(path):
        raise InputError(f"{what} {path}: no such file; check the path")
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder; give a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} cannot be read; check its permissions")


_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of each byte that is not UTF-8


def read_text(path, what, strict=False):
    """A text file's contents as str -> (text, replaced). A leading UTF-8 byte-order mark is dropped.

    A file with NUL bytes is refused as binary (no text format uses them; UTF-16 does, and is not
    what we read). Other bytes that are not UTF-8 are refused when strict (a JSONL file, whose
    records would be cut), else each becomes U+FFFD and `replaced` says how many did, so that a
    caller can report it rather than let a context change silently."""
    input_file(path, what)
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data:
        raise InputError(f"{what} {path} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        text, replaced = data.decode("utf-8-sig"), 0
    except UnicodeDecodeError as e:
        if strict:
            line = data[:e.start].count(b"\n") + 1
            raise InputError(f"{what} {path}, line {line}: byte {data[e.start]:#04x} is not UTF-8; "
                             "save the file as UTF-8") from None
        text, replaced = _BAD_BYTE.subn("\ufffd", data.decode("utf-8-sig", errors="surrogateescape"))
    return text.replace("\r\n", "\n").replace("\r", "\n"), replaced  # newlines as open() in text mode reads them


def json_lines(path, what):
    """The JSON values of a JSONL file -> [(line number in the file, value)]; blank lines skipped."""
    text, _ = read_text(path, what, strict=True)
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise InputError(f"{what} {path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                             "each line must be one JSON object") from None
    return values


def writable(path, what, inputs=()):
    """Refuse an output path that would replace one of the inputs, or that cannot be written, before
    the work whose results go there. Creates the missing folders above it, as the writer would."""
    for other in inputs:
        if other and (os.path.abspath(path) == os.path.abspath(other)
                      or os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other)):
            raise InputError(f"{what} {path} is also an input and would be replaced; write to another path")
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder; give a file path")
    existed = os.path.exists(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a"):  # appending changes nothing in a file that is there
            pass
        if not existed:
            os.remove(path)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{what} {path} cannot be written (a file stands where one of its folders should be); "
                         "choose another path") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be written ({e.strerror}); choose another path") from None


WRITE_PROBE = ".write-test-"  # writable_folder's probe file, one per process; what to ignore in a listing


def writable_folder(path, what):
    """Refuse a folder that cannot be made or written in (a file in its place, no permission)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{what} {path} is a file, not a folder; choose another {what}")
    # One probe per process: under torchrun every rank checks the same folder at the same time, and
    # with one shared name a rank could remove the probe another had just made (ENOENT), failing it.
    probe = os.path.join(path, f"{WRITE_PROBE}{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{what} {path} cannot be written in ({e.strerror}); choose another {what}") from None


def adapter_folder(path, what):
    """Refuse, before the base model loads, a folder that holds no whole LoRA adapter (as
    Policy.save_adapter writes it: adapter_config.json and the weights)."""
    if not os.path.isdir(path):
        raise InputError(f"{what} {path}: {'not a folder' if os.path.exists(path) else 'no such folder'}; "
                         "give a folder that Policy.save_adapter wrote, e.g. out/train/adapter")
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        raise InputError(f"{what} {path} holds no adapter_config.json; give a folder that Policy.save_adapter "
                         "wrote, e.g. out/train/adapter")
    try:
        with open(config, encoding="utf-8") as f:
            if not isinstance(json.load(f), dict):
                raise ValueError
    except (ValueError, OSError):
        raise InputError(f"{what} {path}: adapter_config.json is not a JSON object (damaged?); "
                         "save the adapter again") from None
    weights = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(weights):
        from safetensors import safe_open

        try:
            with safe_open(weights, "np") as f:  # reads the header, which knows the file's full length
                f.keys()
        except Exception as e:  # safetensors has one error type for every kind of damage
            raise InputError(f"{what} {path}: adapter_model.safetensors is damaged or cut short ({e}); "
                             "save the adapter again") from None
    elif not os.path.isfile(os.path.join(path, "adapter_model.bin")):
        raise InputError(f"{what} {path} holds no adapter weights (adapter_model.safetensors); "
                         "save the adapter again")
