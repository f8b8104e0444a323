"""Assert-style code tests are judged in a process the graded program cannot touch: patching
``exec``/``compile``, reading the harness's frame, or returning an always-equal object scores 0
with a wrong solution, while a correct solution (even one carrying the same tricks) scores 1."""

from __future__ import annotations

import asyncio

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards.builtin.code_exec import CodeExecution
from slime_rl.rewards.sandbox_judge import ProtocolError, decode, encode

pytestmark = pytest.mark.timeout(120)

ADD_TESTS = {"asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(20, 22) == 42"]}
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return 7\n"

PATCH_EXEC = "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
PATCH_COMPILE = "import builtins\n_c = builtins.compile\nbuiltins.compile = lambda *a, **k: _c('pass', '<t>', 'exec')\n"
# Read the verdict fd and the nonce out of the harness's frames (the harness ran the program
# with exec() from a function whose locals held both), write every candidate nonce to every
# open fd, then leave before any test could run.
FRAME_SNOOP = r"""
import gc, os, re, sys
found_strs, found_fds = set(), set()
def walk(v, depth=0):
    if depth > 4:
        return
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v):
        found_strs.add(v)
    elif isinstance(v, int) and not isinstance(v, bool) and 2 < v < 1024:
        found_fds.add(v)
    elif isinstance(v, dict):
        for x in list(v.values()):
            walk(x, depth + 1)
    elif isinstance(v, (list, tuple)):
        for x in v:
            walk(x, depth + 1)
f = sys._getframe(1)
while f is not None:
    walk(dict(f.f_locals))
    f = f.f_back
for obj in gc.get_objects():
    if isinstance(obj, dict):
        walk(obj, 3)
fds = set(int(n) for n in os.listdir("/proc/self/fd")) | found_fds
for fd in sorted(fds):
    for nonce in found_strs:
        try:
            os.write(fd, nonce.encode())
        except OSError:
            pass
"""
# Go after the judge (the parent process) itself: its memory, fds and environment via /proc.
PROC_SNOOP = r"""
import os, re
ppid = os.getppid()
found, fds = set(), []
for name in ("environ", "cmdline"):
    try:
        found |= set(re.findall(rb"[0-9a-f]{32}", open(f"/proc/{ppid}/{name}", "rb").read()))
    except OSError:
        pass
try:
    with open(f"/proc/{ppid}/maps") as maps, open(f"/proc/{ppid}/mem", "rb") as mem:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if "rw" in line.split()[1] and hi - lo < (64 << 20):
                try:
                    mem.seek(lo)
                    found |= set(re.findall(rb"[0-9a-f]{32}", mem.read(hi - lo)))
                except (OSError, ValueError, OverflowError):
                    pass
except OSError:
    pass
try:
    fds = os.listdir(f"/proc/{ppid}/fd")
except OSError:
    pass
for fd in fds:
    try:
        with open(f"/proc/{ppid}/fd/{fd}", "wb") as f:
            for nonce in found:
                f.write(nonce)
    except OSError:
        pass
"""
EARLY_EXIT = "import os\nos._exit(0)\n"
ALWAYS_EQUAL = """
class Yes:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
def add(a, b):
    return Yes()
"""
INT_SUBCLASS = """
class Int(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Int(0)
"""


def _sample(code: str, tests: dict) -> Sample:
    return Sample("g0-0", "g0", [1], [2], response=f"```python\n{code}\n```", label=None, metadata={"tests": tests})


@pytest.fixture(scope="module", params=["auto", "audit"])
def reward(request) -> CodeExecution:
    # "audit" (no namespaces, same user as the judge) must hold too: the judge is not dumpable.
    return CodeExecution(timeout_s=10.0, max_parallel=4, network=request.param)


def _score(reward: CodeExecution, code: str, tests: dict = ADD_TESTS) -> dict:
    return asyncio.run(reward(_sample(code, tests)))


@pytest.mark.parametrize(
    ("attack", "wrong", "right"),
    [
        ("builtins.exec patched", PATCH_EXEC + WRONG, PATCH_EXEC + RIGHT),
        ("builtins.compile patched", PATCH_COMPILE + WRONG, PATCH_COMPILE + RIGHT),
        ("harness frame read", WRONG + FRAME_SNOOP + EARLY_EXIT, RIGHT + FRAME_SNOOP),
        ("judge's memory and fds via /proc", WRONG + PROC_SNOOP + EARLY_EXIT, RIGHT + PROC_SNOOP),
        ("__eq__ always True", ALWAYS_EQUAL, "class Yes:\n    pass\n" + RIGHT),
        ("int subclass with a lying __eq__", INT_SUBCLASS, "class Int(int):\n    pass\n" + RIGHT),
    ],
)
def test_reward_hacks_score_zero_and_correct_solutions_still_pass(reward, attack, wrong, right):
    bad = _score(reward, wrong)
    assert bad["score"] == 0.0, f"{attack}: a wrong solution passed ({bad})"
    good = _score(reward, right)
    assert good["score"] == 1.0, f"{attack}: a correct solution failed ({good})"


def test_a_program_that_replaces_math_cannot_fool_tests_that_rely_on_its_import(reward):
    tests = {"asserts": ["assert math.isclose(area(2.0), 12.566, rel_tol=1e-3)"]}
    right = "import math\ndef area(r):\n    return math.pi * r * r\n"
    fake = "class M:\n    def isclose(self, *a, **k):\n        return True\nmath = M()\ndef area(r):\n    return 0\n"
    assert _score(reward, right, tests)["score"] == 1.0
    assert _score(reward, fake, tests)["score"] == 0.0


def test_common_test_styles_still_work(reward):
    cases = {
        # HumanEval: a check() that receives the function
        "def inc(x):\n    return x + 1\n": {"test": "def check(candidate):\n    assert candidate(1) == 2\n    assert [candidate(i) for i in range(3)] == [1, 2, 3]\n\ncheck(inc)\n"},
        # LeetCode: classes, methods, attributes of returned objects
        "class Node:\n    def __init__(self, v):\n        self.val = v\n        self.next = None\nclass Solution:\n    def make(self, xs):\n        head = None\n        for x in reversed(xs):\n            n = Node(x)\n            n.next = head\n            head = n\n        return head\n":
            {"asserts": ["h = Solution().make([1, 2])\nassert h.val == 1 and h.next.val == 2 and h.next.next is None"]},
        # in-place algorithms, generators, expected exceptions, floats, tuples, dicts, sets
        "def sort_in_place(xs):\n    xs.sort()\ndef gen(n):\n    yield from range(n)\ndef check_pos(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\ndef stats(xs):\n    return (min(xs), max(xs)), {'n': len(xs)}, set(xs), 0.1 + 0.2\n":
            {"asserts": [
                "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
                "assert list(gen(3)) == [0, 1, 2] and sum(gen(4)) == 6",
                "try:\n    check_pos(-1)\n    assert False\nexcept ValueError as e:\n    assert 'negative' in str(e)",
                "assert stats([2, 1, 2]) == ((1, 2), {'n': 3}, {1, 2}, 0.1 + 0.2)",
            ]},
    }
    for code, tests in cases.items():
        out = _score(reward, code, tests)
        assert out["score"] == 1.0, (code, out)


def test_failures_still_say_why(reward):
    wrong = _score(reward, WRONG)
    assert wrong["score"] == 0.0 and "AssertionError" in wrong["first_failure"]
    crash = _score(reward, "1 / 0\n" + RIGHT)
    assert crash["score"] == 0.0 and "ZeroDivisionError" in crash["first_failure"]
    early = _score(reward, RIGHT + "import sys\nsys.exit(0)\n")
    assert early["first_failure"] == "the program exited before the tests ran"
    lambda_arg = _score(reward, "def apply(f, x):\n    return f(x)\n", {"asserts": ["assert apply(lambda v: v + 1, 1) == 2"]})
    assert lambda_arg["score"] == 0.0 and "only plain data" in lambda_arg["first_failure"]


def test_codec_keeps_exact_builtin_types_and_turns_anything_else_into_a_handle():
    handles = []

    def other(v):
        handles.append(v)
        return ["h", len(handles) - 1, "object", type(v).__name__]

    value = [None, True, 1, -(2**200), 1.5, float("inf"), 2j, "é\udc80", b"\x00\xff", bytearray(b"x"),
             (1, 2), {1, 2}, frozenset({3}), {"k": [1]}, range(1, 9, 2), ...]
    assert decode(encode(value, other), lambda t: t) == value
    assert [type(x) for x in decode(encode(value, other), lambda t: t)] == [type(x) for x in value]

    class Sneaky(int):
        pass

    tagged = encode([Sneaky(3), True], other)
    assert tagged[1][0][0] == "h" and handles[-1] == 3 and tagged[1][1] == ["b", True]
    for forged in (["b", 1], ["S", [["l", []]]], ["zz"], ["i", "xyz"]):
        with pytest.raises(ProtocolError):
            decode(forged, lambda t: t)
