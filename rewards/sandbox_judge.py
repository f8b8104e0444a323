"""Assert-style tests judged in a process the graded program cannot touch (standard library only).

    sandbox_launcher (after isolation and dropping privileges), PR_SET_DUMPABLE=0, fork:
      candidate (child)                                judge (parent; pid 1 of the sandbox)
        main.py as __main__ (its own interpreter)       read tests + nonce from the secret pipe
        "ready" ─────────────────────────────────────►  compile tests, names they use
        globals(names) ◄────────────────────────────    request those of the program's globals
        serve: call / getattr / iter / next ... ◄────►  exec tests with proxies for them
                 results as plain data only              all asserts passed -> nonce to verdict
                                                         fd; kill the candidate

Nothing the program does in its own process can change the verdict: the test code, the nonce
and the verdict pipe live only in the judge (never in the candidate's memory, not even by
fork: the judge reads them after forking), the judge is not dumpable (no ptrace, no
``/proc/<pid>/mem`` or ``/proc/<pid>/fd`` access for the candidate) and, in the pid namespace,
is its init (cannot be killed from inside). Patching ``builtins.exec`` or ``compile``, reading
``sys._getframe(1).f_locals`` or scanning memory therefore finds nothing.

What crosses the boundary is plain data of *exact* builtin types (``None``, ``bool``, ``int``,
``float``, ``complex``, ``str``, ``bytes``, ``bytearray``, ``list``, ``tuple``, ``dict``, ``set``,
``frozenset``, ``range``, ``Fraction``, ``Decimal``; numpy values as lists and Python numbers),
rebuilt by the judge from a tagged JSON encoding; anything else (an instance of the program's classes, an ``int`` subclass, a
generator) stays in the candidate and reaches the tests as a *remote handle*: it can be
called, its attributes read and set, iterated, indexed and measured, but it compares equal
only to itself, so an object whose ``__eq__`` always returns True passes no ``==`` assert.
Mutable arguments (``list``, ``dict``, ``set``, ``bytearray``) are copied back after a call,
so in-place algorithms can be tested. Names the tests use that are builtins are never taken
from the program, and a name of a standard-library module is always the judge's own module.

Limits: test code cannot pass its own functions or objects to the program (a ``key=`` lambda,
say); the program's module-level values are read once, when the tests start.
"""

import base64
import builtins
import decimal
import fractions
import importlib
import json
import os
import select
import signal
import struct
import sys
import traceback

_HEADER = struct.Struct(">Q")
MAX_MESSAGE_BYTES = 64 << 20
_MAX_DEPTH = 200
_STDLIB = getattr(sys, "stdlib_module_names", frozenset(
    "math cmath os sys re itertools collections functools heapq bisect string random json fractions "
    "decimal statistics operator typing copy datetime time array queue enum dataclasses".split()
))
_PLAIN_MUTABLE = (list, dict, set, bytearray)


class ProtocolError(BaseException):
    """The program broke the protocol (garbage, a death mid-call): the tests fail.

    A ``BaseException`` so that a test's ``except Exception`` cannot swallow it."""


class RemoteError(Exception):
    """The program raised an exception that is not a builtin one; the message names it."""


# -- framing --------------------------------------------------------------------------------


def send_message(fd, obj):
    data = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd, n, alive):
    chunks, got = [], 0
    while got < n:
        if alive is not None:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                if not alive():
                    return None
                continue
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_message(fd, alive=None):
    """The next message, or None at end of stream (or once ``alive()`` says the writer died)."""
    head = _read_exact(fd, _HEADER.size, alive)
    if head is None:
        return None
    (n,) = _HEADER.unpack(head)
    if n > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {n} bytes from the program (limit {MAX_MESSAGE_BYTES})")
    data = _read_exact(fd, n, alive)
    if data is None:
        return None
    return json.loads(data)


# -- plain data, by exact type ------------------------------------------------------------


def encode(value, other, depth=0):
    """Tagged JSON form of ``value``; ``other(v)`` encodes what is not plain data (a handle)."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(value)
    d = depth + 1
    if value is None:
        return ["n"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", format(value, "x")]
    if t is float:
        return ["f", value.hex()]
    if t is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if t is str:
        return ["s", value]
    if t is bytes or t is bytearray:
        return ["y" if t is bytes else "a", base64.b64encode(value).decode()]
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
        return [tag, [encode(v, other, d) for v in value]]
    if t is dict:
        return ["d", [[encode(k, other, d), encode(v, other, d)] for k, v in value.items()]]
    if t is range:
        return ["r", format(value.start, "x"), format(value.stop, "x"), format(value.step, "x")]
    if t is fractions.Fraction:
        return ["q", format(value.numerator, "x"), format(value.denominator, "x")]
    if t is decimal.Decimal:
        return ["D", str(value)]
    if value is Ellipsis:
        return ["e"]
    return other(value)


def decode(data, handle, depth=0):
    """Inverse of :func:`encode`; ``handle(tagged)`` rebuilds a handle. Raises
    :class:`ProtocolError` on anything malformed."""
    try:
        return _decode(data, handle, depth)
    except ProtocolError:
        raise
    except Exception as e:  # a forged or broken encoding
        raise ProtocolError(f"malformed value from the program: {type(e).__name__}: {e}") from None


def _decode(data, handle, depth):
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    tag, d = data[0], depth + 1
    if tag == "n":
        return None
    if tag == "b":
        if type(data[1]) is not bool:
            raise ValueError("bad bool")
        return data[1]
    if tag == "i":
        return int(data[1], 16)
    if tag == "f":
        return float.fromhex(data[1])
    if tag == "c":
        return complex(float.fromhex(data[1]), float.fromhex(data[2]))
    if tag == "s":
        if type(data[1]) is not str:
            raise ValueError("bad str")
        return data[1]
    if tag in ("y", "a"):
        raw = base64.b64decode(data[1], validate=True)
        return raw if tag == "y" else bytearray(raw)
    if tag in ("l", "t", "S", "F"):
        items = [_decode(v, handle, d) for v in data[1]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d":
        return {_decode(k, handle, d): _decode(v, handle, d) for k, v in data[1]}
    if tag == "r":
        return range(int(data[1], 16), int(data[2], 16), int(data[3], 16))
    if tag == "q":
        return fractions.Fraction(int(data[1], 16), int(data[2], 16))
    if tag == "D":
        return decimal.Decimal(data[1])
    if tag == "e":
        return Ellipsis
    if tag == "h":
        return handle(data)
    raise ValueError(f"unknown tag {tag!r}")


# -- candidate side ------------------------------------------------------------------------


def serve(req_fd, rep_fd, program_globals):
    """Answer the judge's requests about the finished program until the judge hangs up."""
    objects = []
    ids = {}

    def other(value):
        if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
            return encode(value.tolist(), other)  # numpy scalars and arrays as plain data
        key = id(value)
        if key not in ids:
            ids[key] = len(objects)
            objects.append(value)
        kind = "class" if isinstance(value, type) else "callable" if callable(value) else "object"
        return ["h", ids[key], kind, type(value).__name__]

    def safe_encode(value):
        try:
            return encode(value, other)
        except (ValueError, RecursionError):
            return other(value)  # cyclic or too deep: keep it here as a handle

    def resolve(tagged):
        return objects[tagged[1]]

    _flush()  # the judge kills this process when done: what the program printed must be out
    send_message(rep_fd, {"ready": True})
    while True:
        msg = recv_message(req_fd)
        if msg is None:
            return
        try:
            reply = _answer(msg, program_globals, objects, safe_encode, resolve)
        except BaseException as e:  # noqa: BLE001 - reported to the judge, which decides
            names = [c.__name__ for c in type(e).__mro__]
            reply = {"err": [type(e).__name__, str(e)[:2000], names]}
        _flush()
        send_message(rep_fd, reply)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the program may have replaced or closed them
            pass


def _answer(msg, g, objects, enc, resolve):
    op = msg["op"]
    if op == "globals":
        found = {}
        for name in msg["names"]:
            if name in g:
                value = g[name]
                is_module = type(value).__name__ == "module" and isinstance(getattr(value, "__name__", None), str)
                found[name] = ["M", value.__name__] if is_module else enc(value)
        return {"ok": found}
    if op == "stop":
        return {"ok": ["n"]}
    target = objects[msg["h"]]
    if op == "call":
        args = [decode(a, resolve) for a in msg["args"]]
        kwargs = {k: decode(v, resolve) for k, v in msg["kwargs"].items()}
        result = target(*args, **kwargs)
        after = [[i, enc(a)] for i, a in enumerate(args) if type(a) in _PLAIN_MUTABLE]
        after += [[k, enc(v)] for k, v in kwargs.items() if type(v) in _PLAIN_MUTABLE]
        return {"ok": enc(result), "after": after}
    if op == "getattr":
        return {"ok": enc(getattr(target, msg["name"]))}
    if op == "setattr":
        setattr(target, msg["name"], decode(msg["value"], resolve))
        return {"ok": ["n"]}
    if op == "iter":
        return {"ok": enc(iter(target))}
    if op == "next":
        try:
            return {"ok": enc(next(target))}
        except StopIteration:
            return {"stop": True}
    if op == "len":
        return {"ok": enc(len(target))}
    if op == "getitem":
        return {"ok": enc(target[decode(msg["key"], resolve)])}
    raise ValueError(f"unknown request {op!r}")


# -- judge side ----------------------------------------------------------------------------


class _Channel:
    def __init__(self, req_fd, rep_fd, alive):
        self.req_fd, self.rep_fd, self.alive = req_fd, rep_fd, alive
        self.proxies = {}

    def request(self, **msg):
        try:
            send_message(self.req_fd, msg)
        except OSError as e:
            raise ProtocolError(f"the program is gone ({e})") from None
        reply = recv_message(self.rep_fd, self.alive)
        if reply is None:
            raise ProtocolError("the program exited while the tests were calling it")
        if type(reply) is not dict:
            raise ProtocolError("malformed reply from the program")
        if "err" in reply:
            raise _remote_exception(reply["err"])
        if reply.get("stop") is True:
            raise StopIteration
        if "ok" not in reply:
            raise ProtocolError("malformed reply from the program")
        return reply

    def value(self, data):
        return decode(data, self.handle)

    def handle(self, tagged):
        rid = int(tagged[1])
        if rid not in self.proxies:  # one proxy per object: `is` holds as it does in the program
            self.proxies[rid] = Remote(self, rid, str(tagged[3]) if len(tagged) > 3 else "object")
        return self.proxies[rid]

    def arg(self, value):
        def other(v):
            if type(v) is Remote and v._channel is self:
                return ["h", v._rid]
            raise TypeError(
                f"the tests passed a {type(v).__name__} to the program: only plain data and the "
                "program's own objects cross into the graded process"
            )

        return encode(value, other)


def _remote_exception(err):
    try:
        name, message, mro = str(err[0]), str(err[1]), [str(n) for n in err[2]]
    except Exception:
        return ProtocolError("malformed error from the program")
    for base in mro:
        cls = getattr(builtins, base, None)
        if (
            isinstance(cls, type) and issubclass(cls, Exception)
            and not issubclass(cls, (StopIteration, StopAsyncIteration))
        ):
            if cls is Exception:
                break
            exc = cls(message)
            return exc if name == base else type(exc)(f"{name}: {message}")
    return RemoteError(f"{name}: {message}")


class Remote:
    """A handle on an object that lives in the graded program's process."""

    __slots__ = ("_channel", "_rid", "_kind")

    def __init__(self, channel, rid, kind):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_rid", rid)
        object.__setattr__(self, "_kind", kind)

    def __repr__(self):
        return f"<program's {self._kind} #{self._rid}>"

    def __call__(self, *args, **kwargs):
        ch = self._channel
        reply = ch.request(
            op="call", h=self._rid, args=[ch.arg(a) for a in args], kwargs={str(k): ch.arg(v) for k, v in kwargs.items()}
        )
        result = ch.value(reply["ok"])
        for where, data in reply.get("after", []):
            original = args[where] if type(where) is int and 0 <= where < len(args) else kwargs.get(where)
            _copy_back(original, ch.value(data))
        return result

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._channel.value(self._channel.request(op="getattr", h=self._rid, name=name)["ok"])

    def __setattr__(self, name, value):
        self._channel.request(op="setattr", h=self._rid, name=name, value=self._channel.arg(value))

    def __iter__(self):
        return self._channel.value(self._channel.request(op="iter", h=self._rid)["ok"])

    def __next__(self):
        return self._channel.value(self._channel.request(op="next", h=self._rid)["ok"])

    def __len__(self):
        n = self._channel.value(self._channel.request(op="len", h=self._rid)["ok"])
        if type(n) is not int:
            raise TypeError("len() of a program object returned a non-int")
        return n

    def __getitem__(self, key):
        reply = self._channel.request(op="getitem", h=self._rid, key=self._channel.arg(key))
        return self._channel.value(reply["ok"])


def _copy_back(original, new):
    """Apply the program's in-place changes of a mutable argument to the tests' object."""
    t = type(original)
    if t is not type(new):
        return
    if t is list or t is bytearray:
        original[:] = new
    elif t is dict or t is set:
        original.clear()
        original.update(new)


def _global_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


def _used_as_modules(code):
    """Global names the tests read attributes of (``math.isclose``): used as modules."""
    import dis

    found = set()
    prev = None
    for ins in dis.get_instructions(code):
        if prev is not None and prev.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            found.add(prev.argval)
        prev = ins
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            found |= _used_as_modules(const)
    return found


def judge(tests, req_fd, rep_fd, alive):
    """Run ``tests`` against the program behind the pipes. Returns normally only when every
    statement ran to its end; raises otherwise (an assert, an error, a protocol breach).
    Returns False without running anything when the program exited before it finished."""
    code = compile(tests, "<tests>", "exec")
    ready = recv_message(rep_fd, alive)
    if ready is None:
        return False
    if ready != {"ready": True}:
        raise ProtocolError("malformed hello from the program")
    channel = _Channel(req_fd, rep_fd, alive)
    wanted = sorted(n for n in _global_names(code) if not hasattr(builtins, n))
    found = channel.request(op="globals", names=wanted)["ok"]
    if type(found) is not dict:
        raise ProtocolError("malformed globals from the program")
    as_modules = _used_as_modules(code)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for name in wanted:
        entry = found.get(name)
        if entry is None:
            continue
        if name in _STDLIB and (name in as_modules or entry[:1] == ["M"]):
            # Tests that rely on the program's `import math` get the real module, never a
            # stand-in the program put under that name (a `math` whose isclose is always True).
            namespace[name] = importlib.import_module(name)
            continue
        if type(entry) is list and entry[:1] == ["M"]:
            try:
                namespace[name] = importlib.import_module(str(entry[1]))
            except Exception:  # noqa: BLE001 - a module the judge lacks: the name stays undefined
                pass
            continue
        namespace[name] = channel.value(entry)
    exec(code, namespace)
    return True


def run_judge(tests, nonce, req_fd, rep_fd, verdict_fd, child_pid):
    """The judge process: exit 0 after writing ``nonce`` only if the tests passed."""
    status = [None]

    def alive():
        if status[0] is None:
            pid, st = os.waitpid(child_pid, os.WNOHANG)
            if pid == child_pid:
                status[0] = st
        return status[0] is None

    code = 1
    try:
        if judge(tests, req_fd, rep_fd, alive):
            sys.stdout.flush()
            os.write(verdict_fd, nonce.encode())
            code = 0
        else:  # the program ended before its tests ran: report its own exit
            for _ in range(100):
                if not alive():
                    break
                select.select([], [], [], 0.02)
            st = status[0]
            if st is None:  # hung up but still running: it cannot be tested
                code = 0
            else:
                code = os.waitstatus_to_exitcode(st) if hasattr(os, "waitstatus_to_exitcode") else (st >> 8)
                code = 128 - code if code < 0 else code
    except BaseException:  # noqa: BLE001 - any failure is a failed test
        traceback.print_exc()
        code = 1
    finally:
        try:
            os.kill(child_pid, signal.SIGKILL)
        except OSError:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
