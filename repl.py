"""
A persistent Python REPL in a child process: where a Recursive Language Model keeps its input.

The long input never enters the model's prompt. It is the variable `context` in a Python
process started here; the model's code runs there, keeps its variables between cells,
and calls a model again through the parent's `handler`:

    async with REPL(context, handler=handler, timeout=30.0, setup="import re") as repl:
        observation = await repl.execute("print(len(context))")   # what the model sees next
        repl.answer   # None until the code calls FINAL(value), then str(value)

    python repl.py                          # demo: top-level await, concurrent sub-calls
    python repl.py "print(context[:40])"    # run a cell of your own on the demo context

The model's namespace: `context` (a str, or a list or dict of str), FINAL(value),
FINAL_VAR(name), llm_query(prompt), rlm_query(query, context), their awaitable twins
llm_query_async and rlm_query_async, and llm_query_batched(prompts), which runs them
concurrently and puts "Error: <message>" in the slot of a prompt that failed; then
whatever the `setup` code defines (run before the first cell and after every restart).
FINAL ends the cell: the code after it does not run (unless the code catches
BaseException), and a cell's first FINAL is its answer.

Each sub-call is one dict awaited by the handler, {"fn": "llm_query", "prompt": str} or
{"fn": "rlm_query", "query": str, "context": obj}, plus "id", its number in the order
the code made its requests, and "received", the ids of earlier requests whose replies
the code had taken since its previous request. Requests reach the handler in code order,
and replies reach the code in that order too (a reply waits for those asked before it),
so for code that does not read the clock the sequence of requests, and what each one
knows has finished, never depends on which sub-call was fastest. Handler calls run
concurrently, a handler exception is raised in the model's code, and waiting on
sub-calls does not count against `timeout`.

Bad code gets a clear observation, never an exception out of `execute`: tracebacks of
the model's own lines; SIGINT after `timeout` seconds (variables kept), then a kill and
restart if that did not stop it, as after exit codes, signals or a broken protocol (the
setup code runs again, and the observation says what was restored and that the other
variables were lost); RLIMIT_AS at `memory_mb`;
output cut to `max_output_chars` (head and tail, and how much was left out).

Imports are limited to ALLOWED_MODULES, and open/input/breakpoint are refused. This
guards against accidents and casual reward hacking; it is NOT a security boundary
(allowed modules reach `os`, e.g. `random._os`). The boundary is that the child holds
nothing worth taking: an empty environment and the context it was given, no ground truth.

Protocol: frames of an 8-byte length and a payload on the child's stdin/stdout, which the
child moves to private fds so stray reads and writes of fds 0/1 cannot corrupt them.
Parent -> child payloads are pickles (fast for a big context); child -> parent payloads
are JSON, since the parent must not unpickle what the model's code could have written.
"""

import ast
import builtins
import io
import json
import linecache
import os
import pickle
import queue
import re
import signal
import struct
import sys
import threading
import time
import traceback
import types

# What the model's code may import: computation only, no files, processes or network.
ALLOWED_MODULES = frozenset({
    "re", "json", "math", "cmath", "decimal", "fractions", "numbers", "random", "statistics",
    "collections", "itertools", "functools", "operator", "heapq", "bisect", "array", "copy",
    "string", "textwrap", "difflib", "unicodedata", "csv", "base64", "hashlib", "struct",
    "datetime", "time", "calendar", "enum", "typing", "dataclasses", "abc", "types",
    "contextlib", "pprint", "reprlib", "warnings", "asyncio", "sys",
})
REFUSED_BUILTINS = ("open", "input", "breakpoint")   # file and terminal access
KILL_GRACE_S = 1.0      # after SIGINT, how long the code may take to stop before it is killed
START_TIMEOUT_S = 60.0  # a child that is not ready by then is killed (a huge context may need long)
_LAST = "__repl_last_value__"  # holds the value of a cell's final bare expression
_THIS_FILE = os.path.abspath(__file__)


def _frame(payload):
    return struct.pack(">Q", len(payload)) + payload


# ----------------------------------------------------------------------------------
# The child process. It runs this file with --child and stops before the parent part,
# so it never imports asyncio unless the model's code uses it (start-up stays fast).

class _Capture(io.TextIOBase):
    """sys.stdout and sys.stderr of the model's code: one ordered stream that keeps only
    its first and last max_chars/2 characters, so the child never holds or sends
    megabytes of output."""
    encoding, errors = "utf-8", "backslashreplace"

    def __init__(self, max_chars):
        self.half, self.total = max_chars // 2, 0
        self.head, self.head_len, self.tail, self.tail_len = [], 0, [], 0
        self.buffer = _BytesToText(self)

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        size = len(text)
        self.total += size
        room = self.half - self.head_len
        if room > 0:
            self.head.append(text[:room])
            self.head_len += min(room, len(text))
            text = text[room:]
        if text:
            self.tail.append(text)
            self.tail_len += len(text)
            if self.tail_len > 2 * self.half + 4096:   # compact now and then: O(1) per write
                self.tail = [self.tail_text()]
                self.tail_len = len(self.tail[0])
        return size

    def tail_text(self):
        tail = "".join(self.tail)
        return tail[len(tail) - self.half:] if self.half else ""


class _BytesToText:
    """sys.stdout.buffer: bytes that are not UTF-8 show as \\xNN escapes."""
    def __init__(self, text_stream):
        self.text_stream = text_stream

    def write(self, data):
        self.text_stream.write(bytes(data).decode("utf-8", "backslashreplace"))
        return len(data)

    def flush(self):
        pass


def _clean(text):
    """Lone surrogates (e.g. from printing '\\udcff') become visible escapes, not bad UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    # Only the model's own import statements come through here; allowed modules import
    # what they need with the real __import__ of their own globals.
    if level == 0 and name.partition(".")[0] in ALLOWED_MODULES:
        return builtins.__import__(name, globals, locals, fromlist, level)
    raise ImportError(f"module {name!r} is not available in this REPL (no file, process or "
                      f"network access). Available: {', '.join(sorted(ALLOWED_MODULES))}")


def _refuser(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name}() is not available in this REPL: it has no file, process "
                              "or network access. The input is in the variable `context`.")
    return refuse


def _exit(code=None):
    raise SystemExit(code)


class _Final(BaseException):
    """Raised by FINAL to end the cell quietly; a BaseException so `except Exception` lets it by."""


def _result(fn, reply):
    if "error" in reply:
        raise RuntimeError(f"{fn} failed: {reply['error']}")
    return reply["result"]


def _in_model_code(frame):
    while frame is not None:
        if frame.f_code.co_filename.startswith("<repl-"):
            return True
        frame = frame.f_back
    return False


def _model_frames_only(exc, seen):
    """Drop the REPL's own frames from a traceback (and its causes), keeping the model's cells."""
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    kept, tb = [], exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<repl-"):
            kept.append(tb)
        tb = tb.tb_next
    for tb, next_tb in zip(kept, kept[1:] + [None]):
        tb.tb_next = next_tb
    exc.__traceback__ = kept[0] if kept else None
    for inner in (exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ())):
        _model_frames_only(inner, seen)


class _Child:
    def __init__(self, out_fd, init):
        self.out_fd, self.memory_mb = out_fd, init["memory_mb"]
        self.max_chars, self.has_handler = init["max_output_chars"], init["has_handler"]
        self.pending = {}                      # request id -> callback, called by the reader thread
        self.commands = queue.SimpleQueue()    # exec requests from the parent
        self.next_id, self.cells = init["first_id"], 0   # ids stay unique across restarts
        self.received = []                     # ids whose replies the code took since its last request
        self.running = self.sending = self.interrupt_pending = False
        self.loop = self.task = None           # made by the first top-level await; the cell's task
        self.interrupted = False
        main = types.ModuleType("__main__")    # a real module, so pickle/dataclasses find classes
        sys.modules["__main__"] = main
        self.ns = main.__dict__
        self.builtin_overrides = {"__import__": _guarded_import, "exit": _exit, "quit": _exit,
                                  **{name: _refuser(name) for name in REFUSED_BUILTINS}}
        self.builtins = {**builtins.__dict__, **self.builtin_overrides}
        self.reserved = {
            "context": init["context"], "FINAL": self.final, "FINAL_VAR": self.final_var,
            "llm_query": lambda prompt: self.call("llm_query", prompt),
            "rlm_query": lambda query, context: self.call("rlm_query", query, context),
            "llm_query_async": lambda prompt: self.call_async("llm_query", prompt),
            "rlm_query_async": lambda query, context: self.call_async("rlm_query", query, context),
            "llm_query_batched": self.llm_query_batched}
        self.restore()
        before = set(self.ns)
        try:
            exec(compile(init["setup"], "<setup>", "exec"), self.ns)
        except Exception as exc:
            raise RuntimeError(f"the setup code failed: {exc!r}") from None
        self.setup_names = sorted(set(self.ns) - before)
        self.restore()

    def restore(self):
        self.builtins.update(self.builtin_overrides)
        self.ns.update(self.reserved, __builtins__=self.builtins)

    # -- protocol --
    def send(self, msg):
        data = _frame(json.dumps(msg, ensure_ascii=False).encode("utf-8", "replace"))
        self.sending = True   # a SIGINT now would cut the frame in half: hold it until it is out
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.out_fd, view):]
        finally:
            self.sending = False
        if self.interrupt_pending and self.running:
            self.interrupt_pending = False
            raise KeyboardInterrupt

    def on_sigint(self, signum, frame):
        if not self.running:
            return
        if self.sending:
            self.interrupt_pending = True
        elif self.task is not None and not _in_model_code(frame):
            # asyncio's own machinery is running (e.g. waiting in select): an exception
            # raised here could leave the loop broken, so cancel the cell's task instead.
            self.interrupted = True
            self.task.get_loop().call_soon_threadsafe(self.task.cancel)
        else:
            raise KeyboardInterrupt

    def read_forever(self, in_file):
        while True:
            try:
                msg = pickle.loads(_read_frame(in_file))
            except EOFError:   # the parent is gone: nobody is left to report to
                os._exit(0)
            if msg["op"] != "reply":
                self.commands.put(msg)
            elif (callback := self.pending.pop(msg["id"], None)) is not None:
                try:
                    callback(msg)
                except Exception:   # e.g. the event loop of an asyncio.run() has closed
                    pass

    # -- sub-calls. The sync ones block on a queue that the reader thread fills, so they work
    #    anywhere, even inside the running event loop; the async ones await a future. --
    def request(self, fn, on_reply, text, *context):
        if not self.has_handler:
            raise RuntimeError(f"{fn} is not available: this REPL was started without a handler "
                               "(pass handler= to REPL to enable sub-calls)")
        if not isinstance(text, str):
            raise TypeError(f"{fn} needs a str {'prompt' if fn == 'llm_query' else 'query'}, "
                            f"got {type(text).__name__}")
        fields = {"prompt": text} if fn == "llm_query" else {"query": text, "context": context[0]}
        self.next_id += 1
        self.pending[self.next_id] = on_reply
        try:
            self.send({"op": "request", "id": self.next_id, "fn": fn, **fields, "received": self.received})
        except (TypeError, ValueError):   # from json: the context was not plain data
            del self.pending[self.next_id]
            raise TypeError(f"{fn} needs a context made of str, list and dict (JSON data), "
                            f"got {type(context[0]).__name__}") from None
        self.received = []
        return self.next_id

    def call(self, fn, *args):
        replies = queue.SimpleQueue()
        request_id = self.request(fn, replies.put, *args)
        reply = replies.get()
        self.received.append(request_id)
        return _result(fn, reply)

    async def call_async(self, fn, *args):
        import asyncio
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        settle = lambda reply: future.done() or future.set_result(reply)  # noqa: E731
        request_id = self.request(fn, lambda reply: loop.call_soon_threadsafe(settle, reply), *args)
        reply = await future
        self.received.append(request_id)
        return _result(fn, reply)

    def llm_query_batched(self, prompts):
        prompts, replies = list(prompts), queue.SimpleQueue()
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError("llm_query_batched needs a list of str prompts")
        ids = [self.request("llm_query", lambda reply, i=i: replies.put((i, reply)), prompt)
               for i, prompt in enumerate(prompts)]
        results = [None] * len(prompts)
        for _ in prompts:
            i, reply = replies.get()
            results[i] = f"Error: {reply['error']}" if "error" in reply else reply["result"]
        self.received += ids
        return results

    def final(self, value):
        self.send({"op": "final", "value": _clean(str(value))})
        raise _Final

    def final_var(self, name):
        if name not in self.ns:
            raise NameError(f"FINAL_VAR: no variable named {name!r}")
        self.final(self.ns[name])

    # -- running a cell --
    def run_cell(self, source):
        self.cells += 1
        filename = f"<repl-{self.cells}>"   # one name per cell: linecache keeps every cell's lines
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        out = _Capture(self.max_chars)
        sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = out
        try:
            try:
                self.running = True
                tree = ast.parse(source, filename)
                if tree.body and isinstance(tree.body[-1], ast.Expr):   # shown, as in a notebook
                    tree.body[-1] = ast.copy_location(ast.Assign(
                        [ast.Name(_LAST, ast.Store())], tree.body[-1].value), tree.body[-1])
                    ast.fix_missing_locations(tree)
                code = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                result = eval(code, self.ns)
                if isinstance(result, types.CoroutineType):   # the cell used top-level await
                    self.run_coroutine(result)
                value = self.ns.pop(_LAST, None)
                if value is not None:
                    out.write(repr(value) + "\n")
            finally:
                self.running = False
        except _Final:
            self.ns.pop(_LAST, None)
        except BaseException as exc:   # KeyboardInterrupt here means the time limit stopped it
            self.ns.pop(_LAST, None)
            _model_frames_only(exc, set())
            text = "".join(traceback.format_exception(exc))
            out.write(re.sub(r'"<repl-\d+>"', '"<repl>"', text))
            if isinstance(exc, SystemExit):
                out.write("exit() does not end this REPL; call FINAL(value) to give the answer.\n")
            if isinstance(exc, MemoryError):
                out.write(f"The REPL has a memory limit of {self.memory_mb} MB.\n")
        self.restore()
        self.send({"op": "done", "head": _clean("".join(out.head)),
                   "tail": _clean(out.tail_text()), "total": out.total})

    def run_coroutine(self, coroutine):
        import asyncio
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.task = task = self.loop.create_task(coroutine)
        self.interrupted = False
        try:
            self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
            raise KeyboardInterrupt from None
        except KeyboardInterrupt:   # raised in the model's code, maybe in another task
            if not task.done():     # stop the cell too, or it would resume in the next one
                task.cancel()
                try:
                    self.loop.run_until_complete(task)
                except BaseException:
                    pass
            raise
        finally:
            self.task = None


def _read_frame(in_file):
    header = in_file.read(8)   # a buffered read(n) returns n bytes unless the pipe closed
    if len(header) < 8:
        raise EOFError
    size = struct.unpack(">Q", header)[0]
    payload = in_file.read(size)
    if len(payload) < size:
        raise EOFError
    return payload


def _child_main(memory_mb):
    # Move the protocol to private fds first: the model's code can no longer read it
    # from fd 0 or scribble on it through fd 1.
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    import resource
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import fcntl
    try:   # Linux: a 1 MiB pipe instead of 64 KiB loads a large context about twice as fast
        fcntl.fcntl(in_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (AttributeError, OSError):
        pass
    in_file = os.fdopen(in_fd, "rb")
    try:
        child = _Child(out_fd, pickle.loads(_read_frame(in_file)))
    except EOFError:
        os._exit(0)
    except BaseException as exc:
        os.write(out_fd, _frame(json.dumps({"op": "fatal", "error": repr(exc)}).encode()))
        os._exit(1)
    signal.signal(signal.SIGINT, child.on_sigint)
    threading.Thread(target=child.read_forever, args=(in_file,), daemon=True).start()
    child.send({"op": "ready", "setup_names": child.setup_names})
    while True:
        msg = child.commands.get()
        if msg["op"] == "exec":
            child.run_cell(msg["code"])


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(int(sys.argv[2]))


# ----------------------------------------------------------------------------------
# The parent: starts the child, serves its sub-calls, keeps the clock, restarts it.

import asyncio  # noqa: E402  (parent only; the child never gets here)
import contextlib  # noqa: E402
import inspect  # noqa: E402


class REPL:
    """One model's REPL. context: str, or list or dict of str. handler: async fn(request) -> str
    serving the sub-calls (None: they raise). timeout: seconds of execution per cell, not
    counting sub-call waits. max_output_chars: observation size. memory_mb: child's RLIMIT_AS.
    setup: code run before the first cell and after every restart (imports, promised names)."""

    def __init__(self, context, handler=None, timeout=30.0, max_output_chars=20_000,
                 memory_mb=2048, setup=""):
        self.context, self.handler, self.timeout = context, handler, float(timeout)
        self.max_output_chars, self.memory_mb = int(max_output_chars), int(memory_mb)
        self.setup, self._setup_names = setup, []
        self.answer = None
        self._proc, self._closed, self._lock = None, False, asyncio.Lock()
        self._tasks = set()                            # handler calls in flight
        self._last_serve, self._last_id = None, 0      # the latest request's task, and its id
        self._cell, self._in_flight, self._idle = 0, 0, asyncio.Event()
        self._note = None                              # news for the next observation

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc_info):
        await self.close()

    async def start(self):
        """Start the child and load the context into it (also done by the first execute)."""
        if self._closed:
            raise RuntimeError("this REPL is closed; create a new REPL")
        if self._proc is not None:
            return
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", _THIS_FILE, "--child", str(self.memory_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env={})
        init = {"context": self.context, "max_output_chars": self.max_output_chars,
                "memory_mb": self.memory_mb, "has_handler": self.handler is not None,
                "setup": self.setup, "first_id": self._last_id}
        try:
            await self._send(self._proc, init)
            msg = await asyncio.wait_for(self._read(), START_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                ValueError) as exc:
            msg = {"op": "fatal", "error": repr(exc)}
        if msg.get("op") != "ready":
            await self._kill()
            error = str(msg.get("error"))
            advice = ("" if "setup code failed" in error else
                      f"; if the context is large, raise memory_mb (now {self.memory_mb})")
            raise RuntimeError(f"the REPL process could not start ({error}){advice}")
        self._setup_names = msg["setup_names"]

    async def close(self):
        self._closed = True
        await self._kill()

    async def execute(self, code):
        """Run one cell; return what the model sees: output, final value, traceback, notes."""
        async with self._lock:
            await self.start()
            try:
                return await self._run_cell(code)
            except BaseException:   # e.g. cancelled mid-cell: the child's stream is out of step
                await self._kill()
                self._note = f"The previous execution was cancelled, so the REPL was restarted: {self._kept()}"
                raise

    def _kept(self):
        """What a restart keeps (the child reloads it) and loses, for the observation."""
        setup = f", as were {', '.join(self._setup_names)}" if self._setup_names else ""
        return (f"`context` was reloaded and FINAL, llm_query and the other REPL functions restored{setup}; "
                "all other variables were lost.")

    async def _run_cell(self, code):
        self._cell += 1
        cell, self._in_flight = self._cell, 0
        notes, self._note = [self._note] if self._note else [], None
        self._idle.set()
        answered = False   # the cell's first FINAL is its answer, even if the code caught the stop
        used, stop_at, reading = 0.0, None, None   # used: seconds of execution, waits excluded
        try:
            await self._send(self._proc, {"op": "exec", "code": code})
            while True:
                reading = reading or asyncio.ensure_future(self._read())
                counting = stop_at is None and self._in_flight == 0
                waiters, idle = {reading}, None
                if stop_at is None and not counting:   # wake up when the last sub-call returns
                    idle = asyncio.ensure_future(self._idle.wait())
                    waiters.add(idle)
                limit = (stop_at - time.monotonic() if stop_at is not None
                         else self.timeout - used if counting else None)
                started = time.monotonic()
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=None if limit is None else max(limit, 0))
                if counting:
                    used += time.monotonic() - started
                if idle is not None:
                    idle.cancel()
                if reading in done:
                    msg, reading = reading.result(), None
                    if msg["op"] == "request":
                        self._in_flight += 1
                        self._idle.clear()
                        self._last_id = msg["id"]
                        task = asyncio.ensure_future(self._serve(self._proc, cell, msg, self._last_serve))
                        self._last_serve = task
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    elif msg["op"] == "final" and not answered:
                        self.answer, answered = msg["value"], True
                    elif msg["op"] == "done":
                        return self._observation(msg, notes)
                elif stop_at is None and used >= self.timeout:   # soft stop: KeyboardInterrupt
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.send_signal(signal.SIGINT)
                    stop_at = time.monotonic() + KILL_GRACE_S
                    notes.append(f"TimeoutError: the code ran longer than the {self.timeout:g} s "
                                 "time limit and was interrupted; variables defined so far are kept.")
                elif stop_at is not None and time.monotonic() >= stop_at:   # hard stop
                    reading.cancel()   # before the kill, or its end-of-file error goes unread
                    await self._restart()
                    return (f"TimeoutError: the code ran longer than the {self.timeout:g} s time "
                            f"limit and did not stop when interrupted, so the REPL was restarted: {self._kept()}")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, TypeError):
            how = await self._how_it_ended()
            await self._restart()
            return f"The REPL process {how} while running this code, so it was restarted: {self._kept()}"
        finally:
            if reading is not None:
                reading.cancel()

    def _observation(self, msg, notes):
        head, tail, total = msg["head"], msg["tail"], msg["total"]
        if total <= len(head) + len(tail):
            text = head + tail
        else:   # keep head and tail, and say how much is gone, within max_output_chars
            keep = max(self.max_output_chars - 60, 0)
            head, tail = head[:keep // 2], tail[max(len(tail) - (keep - keep // 2), 0):]
            omitted = total - len(head) - len(tail)
            text = f"{head}\n[... {omitted} of {total} characters omitted ...]\n{tail}"
        text = "\n".join(part for part in (text.rstrip("\n"), *notes) if part)
        return text or "(no output)"

    async def _serve(self, proc, cell, msg, asked_before):
        request = {key: value for key, value in msg.items() if key != "op"}
        try:
            result = self.handler(request)
            reply = {"result": str(await result if inspect.isawaitable(result) else result)}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if cell == self._cell:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
        if asked_before is not None:   # replies reach the code in the order it asked
            await asyncio.wait([asked_before])
        try:
            await self._send(proc, {"op": "reply", "id": msg["id"], **reply})
        except (ConnectionError, RuntimeError):
            pass   # that child is gone; its replacement never asked

    @staticmethod
    async def _send(proc, msg):
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.write(struct.pack(">Q", len(payload)))
        proc.stdin.write(payload)
        await proc.stdin.drain()

    async def _read(self):
        stdout = self._proc.stdout
        (size,) = struct.unpack(">Q", await stdout.readexactly(8))
        if size > 2**34:
            raise ValueError("the REPL process sent a corrupt frame")
        return json.loads(await stdout.readexactly(size))

    async def _how_it_ended(self):
        try:   # the end of its output comes just before its exit status
            code = await asyncio.wait_for(self._proc.wait(), 1.0)
        except asyncio.TimeoutError:
            return "sent a malformed message"   # still alive: _restart kills it
        return (f"died (exit code {code})" if code >= 0 else
                f"died (killed by signal {-code}, {signal.strsignal(-code)}; maybe out of memory)")

    async def _restart(self):
        await self._kill()
        await self.start()

    async def _kill(self):
        tasks, self._tasks, self._last_serve = list(self._tasks), set(), None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _demo(code):
    async def handler(request):   # stands in for a model
        await asyncio.sleep(0.1)
        text = request.get("prompt") or request["query"]
        return f"<reply to a {len(text)}-character {request['fn']}>"
    context = "".join(f"line {i}: the magic number is {i * 7}\n" for i in range(1000))
    async with REPL(context, handler=handler, timeout=5.0) as repl:
        print(await repl.execute(code), "\nanswer:", repl.answer)


if __name__ == "__main__":
    asyncio.run(_demo(sys.argv[1] if len(sys.argv) > 1 else (
        "import asyncio\nchunks = [context[i:i + 5000] for i in range(0, len(context), 5000)]\n"
        "replies = await asyncio.gather(*[llm_query_async('Summarise:\\n' + c) for c in chunks])\n"
        "print(len(chunks), replies[:2])\nFINAL(replies[0])")))
