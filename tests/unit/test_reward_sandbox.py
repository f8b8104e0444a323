"""Sandboxed code execution: correct programs pass; loops, fork bombs, memory hogs and network
calls are contained; the working folder is thrown away."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardRunner, load_reward
from slime_rl.rewards.builtin.code_exec import CodeExecution, extract_code, parse_tests
from slime_rl.rewards.sandbox import Sandbox, SandboxLimits

pytestmark = pytest.mark.timeout(60)

ADD_TESTS = json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]})


def _sample(code: str, label: str | None = ADD_TESTS, **metadata) -> Sample:
    return Sample("g0-0", "g0", [1], [2], response=f"Here you go:\n```python\n{code}\n```\n", label=label, metadata=metadata)


def _score(reward: CodeExecution, sample: Sample) -> dict:
    return asyncio.run(reward(sample))


def _leftover_sandbox_processes() -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if b"SLIME_RL_SANDBOX_TOKEN" in f.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def reward() -> CodeExecution:
    return CodeExecution(timeout_s=5.0, memory_mb=256, max_processes=16)


def test_stdin_stdout_tests_pass_and_partial_credit(reward):
    ok = _score(reward, _sample("a, b = map(int, input().split())\nprint(a + b)"))
    assert ok["score"] == 1.0 and ok["passed"] == 2.0 and ok["total"] == 2.0
    half = _score(reward, _sample("a, b = map(int, input().split())\nprint(a + b if a == 1 else 0)"))
    assert half["score"] == 0.5
    assert half["first_failure"] == "expected '12\\n', got '0\\n'"


def test_all_or_nothing_mode():
    strict = CodeExecution(timeout_s=5.0, score="all")
    out = _score(strict, _sample("a, b = map(int, input().split())\nprint(a + b if a == 1 else 0)"))
    assert out["score"] == 0.0 and out["passed"] == 1.0


def test_assert_style_tests_and_early_exit_does_not_pass(reward):
    tests = {"asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    good = _score(reward, _sample("def add(a, b):\n    return a + b", label=None, tests=tests))
    assert good["score"] == 1.0
    wrong = _score(reward, _sample("def add(a, b):\n    return a - b", label=None, tests=tests))
    assert wrong["score"] == 0.0 and "AssertionError" in wrong["first_failure"]
    for exit_call in ("sys.exit(0)", "os._exit(0)"):
        cheat = _score(reward, _sample(f"import os, sys\ndef add(a, b):\n    return 0\n{exit_call}", label=None, tests=tests))
        assert cheat["score"] == 0.0
        assert cheat["first_failure"] == "the program exited before the tests ran"


# A wrong program that looks for the success marker (or the tests) in its own source, its
# folder, its arguments and its environment, prints whatever it finds and exits at once.
SNOOP = r"""
import os, re, sys
found = [open(__file__).read(), " ".join(sys.argv), open("/proc/self/cmdline", "rb").read().decode(errors="replace")]
found += [f"{k}={v}" for k, v in os.environ.items()]
for name in os.listdir("."):
    found.append(open(name, errors="replace").read())
markers = [m for text in found for m in re.findall(r"__slime_rl_done_\w+?__", text)]
print("\n".join(found))
print("\n".join(markers))  # the marker last, as a passing program's output would end
os._exit(0)
def add(a, b):
    return 0
"""


def test_assert_style_cheat_that_reads_its_own_source_and_prints_the_marker_fails(reward):
    tests = {"asserts": ["assert add(1, 2) == 3  # the secret test"]}
    out = _score(reward, _sample(SNOOP, label=None, tests=tests))
    assert out["score"] == 0.0
    assert out["first_failure"] == "the program exited before the tests ran"
    res = asyncio.run(reward.sandbox.run(SNOOP, tests="assert add(1, 2) == 3  # the secret test"))
    assert res.returncode == 0 and res.tests_passed is False
    assert "the secret test" not in res.stdout  # not in any file, argument or variable it can read


def test_infinite_loop_is_killed():
    out = _score(CodeExecution(timeout_s=1.0), _sample("while True:\n    pass"))
    assert out["score"] == 0.0
    assert out["timeouts"] + out["passed"] <= out["total"]
    assert "timed out" in out["first_failure"] or "exit code -" in out["first_failure"]
    assert _leftover_sandbox_processes() == []


def test_fork_bomb_is_contained(reward):
    bomb = "import os\nwhile True:\n    os.fork()"
    res = asyncio.run(reward.sandbox.run(bomb))
    # The process limit (not the wall clock) stopped it, and nothing of it survives.
    assert not res.timed_out and res.returncode == 1
    assert "BlockingIOError" in res.stderr and "Resource temporarily unavailable" in res.stderr
    assert _leftover_sandbox_processes() == []
    out = _score(reward, _sample(bomb))
    assert out["timeouts"] == 0.0 and "BlockingIOError" in out["first_failure"]
    assert _leftover_sandbox_processes() == []


@pytest.mark.parametrize("network", ["auto", "audit"])
def test_fork_bomb_hits_the_process_limit(network):
    try:
        box = Sandbox(SandboxLimits(wall_s=5, max_processes=8), network=network)
    except RuntimeError as e:
        pytest.skip(f"{network} sandbox unavailable here: {e}")
    code = (
        "import os, time\nn = 0\ntry:\n    for _ in range(100):\n        if os.fork() == 0:\n"
        "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
        "except OSError as e:\n    print('blocked after', n, type(e).__name__)\n"
    )
    res = asyncio.run(box.run(code))
    assert "blocked after" in res.stdout and "BlockingIOError" in res.stdout
    assert int(res.stdout.split()[2]) < 100
    assert _leftover_sandbox_processes() == []


def test_memory_hog_fails_with_memory_error():
    # A generous wall limit: on a busy machine touching the memory is slow, and here the
    # memory limit (not the clock) must be what stops the program.
    reward = CodeExecution(timeout_s=20.0, memory_mb=128)
    out = _score(reward, _sample("chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024 * 1024))"))
    assert out["score"] == 0.0
    assert "MemoryError" in out["first_failure"]


@pytest.mark.parametrize("network", ["auto", "audit"])
def test_network_call_fails_inside_but_works_outside(network):
    try:
        box = Sandbox(SandboxLimits(wall_s=10), network=network)
    except RuntimeError as e:
        pytest.skip(f"{network} sandbox unavailable here: {e}")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    code = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    print('CONNECTED')\n"
        "except OSError as e:\n    print('BLOCKED', e)\n"
    )
    try:
        outside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
        assert outside.stdout.startswith("CONNECTED")  # the server is reachable without the sandbox
        inside = asyncio.run(box.run(code))
    finally:
        server.close()
    assert inside.stdout.startswith("BLOCKED"), inside.stdout + inside.stderr


def test_working_folder_is_private_and_thrown_away(monkeypatch):
    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    box = Sandbox(SandboxLimits(wall_s=5))
    res = asyncio.run(box.run("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())"))
    assert res.returncode == 0 and "slime-rl-sandbox-" in res.stdout
    assert made and not any(os.path.exists(d) for d in made)


def test_code_execution_through_the_runner_by_short_name():
    comp = load_reward("code_execution", {"timeout_s": 5.0, "max_parallel": 2})
    runner = RewardRunner([comp], timeout_s=20)
    samples = [_sample("a, b = map(int, input().split())\nprint(a + b)"), _sample("print(")]
    outcomes = asyncio.run(runner.score(samples))
    assert [o.score for o in outcomes] == [1.0, 0.0]
    assert outcomes[1].metrics["code_execution/passed"] == 0.0
    assert "SyntaxError" in outcomes[1].info["code_execution/first_failure"]
    runner.close()


def test_test_case_parsing_and_code_extraction():
    assert len(parse_tests([{"input": "1", "output": "1"}, {"input": "2", "output": "2"}])) == 2
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        parse_tests({"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(ValueError, match="unknown test-case format"):
        parse_tests({"cases": []})
    text = "<think>```python\nwrong()\n```</think>Final:\n```py\nprint(1)\n```\nand\n```python\nprint(2)\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"


def test_missing_test_cases_fail_the_sample(reward):
    with pytest.raises(ValueError, match="sample g0-0 has no test cases"):
        _score(reward, _sample("print(1)", label=None))
