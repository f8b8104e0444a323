"""Code-execution reward: run the response's Python against the sample's test cases.

    response ──last ```python block──► program
    label / metadata["tests"] ──► test cases ──► Sandbox.run(program [+ asserts], stdin) each
                                                  ──► passed / total ──► score

Test-case formats (JSON in ``sample.label``, or already parsed in ``sample.metadata[tests_key]``):

- stdin/stdout: ``{"inputs": ["1 2\\n"], "outputs": ["3\\n"]}`` or ``[{"input": .., "output": ..}]``;
  outputs compare line by line with trailing whitespace ignored;
- asserts: ``{"asserts": ["assert add(1, 2) == 3"]}`` or ``{"test": "<python with asserts>"}``
  (one case per entry); after the program finishes, a judge process the program cannot touch
  runs the tests, calling the program's functions over a pipe and comparing the plain values
  they return (exact builtin types: an always-equal object passes nothing); they must reach
  their end. Only the judge's nonce, not anything the program prints, patches or exits with,
  counts as a pass (see :mod:`~slime_rl.rewards.sandbox_judge`).

Timing: each test case gets ``timeout_s`` of wall time once a sandbox slot is free; the
runner's ``reward.timeout_s`` starts when the first case of a sample gets its slot
(:func:`~slime_rl.rewards.protocol.work_started`), so queueing behind other samples never
counts. It must be at least ``timeout_s`` (checked at start-up); for a sample with many cases
keep it above ``timeout_s * ceil(cases / max_parallel)``.
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

from slime_rl.buffers.schema import Sample
from slime_rl.rewards.builtin.text import final_text
from slime_rl.rewards.protocol import queued, work_started
from slime_rl.rewards.sandbox import Sandbox, SandboxLimits

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class CodeTest:
    stdin: str = ""
    expected_stdout: str | None = None
    """Expected output (stdin/stdout style), or None for an assert-style case."""
    test_code: str = ""
    """Code appended to the program (assert style)."""


def extract_code(response: str) -> str:
    """The last fenced code block of the answer (after any reasoning block), else the answer."""
    text = final_text(response)
    blocks = _FENCE_RE.findall(text)
    return blocks[-1] if blocks else text.strip()


def parse_tests(spec: Any) -> list[CodeTest]:
    """Test cases from one of the supported formats (see the module docstring)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"test cases are not valid JSON: {e}") from e
    if isinstance(spec, dict) and "inputs" in spec:
        ins, outs = list(spec["inputs"]), list(spec.get("outputs", []))
        if len(ins) != len(outs):
            raise ValueError(f"test cases have {len(ins)} inputs but {len(outs)} outputs")
        return [CodeTest(stdin=str(i), expected_stdout=str(o)) for i, o in zip(ins, outs)]
    if isinstance(spec, list) and all(isinstance(t, dict) and "input" in t for t in spec):
        return [CodeTest(stdin=str(t["input"]), expected_stdout=str(t.get("output", ""))) for t in spec]
    if isinstance(spec, dict) and "asserts" in spec:
        return [CodeTest(test_code=str(a)) for a in spec["asserts"]]
    if isinstance(spec, dict) and "test" in spec:
        return [CodeTest(test_code=str(spec["test"]))]
    raise ValueError(
        "unknown test-case format; expected {'inputs': [...], 'outputs': [...]}, "
        "[{'input': .., 'output': ..}], {'asserts': [...]} or {'test': '...'}"
    )


def _same_output(got: str, expected: str) -> bool:
    def lines(s: str) -> list[str]:
        return [ln.rstrip() for ln in s.strip().splitlines()]

    return lines(got) == lines(expected)


@queued
class CodeExecution:
    """Reward = fraction of test cases passed (``score="fraction"``) or 1/0 (``"all"``).

    One sandboxed process per test case, at most ``max_parallel`` at a time per instance.
    Metrics: ``passed``, ``total``, ``timeouts``; the first failure's detail goes to
    ``reward_info``.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        max_processes: int = 32,
        disk_mb: int = 64,
        max_files: int = 1024,
        max_parallel: int = 4,
        score: str = "fraction",
        tests_key: str = "tests",
        python: str = "auto",
        network: str = "auto",
    ) -> None:
        if score not in ("fraction", "all"):
            raise ValueError(f"code_execution score={score!r}; allowed: 'fraction', 'all'")
        limits = SandboxLimits(
            wall_s=timeout_s, cpu_s=max(1, int(timeout_s + 0.999)), memory_mb=memory_mb,
            max_processes=max_processes, disk_mb=disk_mb, max_files=max_files,
        )
        self.sandbox = Sandbox(limits, python=python, network=network)
        self.timeout_s = float(timeout_s)
        self.score_mode = score
        self.tests_key = tests_key
        self.max_parallel = max_parallel
        self._sems: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def call_time_limit_s(self) -> float:
        """Wall time one test case may take; the runner checks ``reward.timeout_s`` exceeds it."""
        return self.timeout_s

    def _sem(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._sems:
            self._sems[loop] = asyncio.Semaphore(self.max_parallel)
        return self._sems[loop]

    def _tests(self, sample: Sample) -> list[CodeTest]:
        spec = sample.metadata.get(self.tests_key)
        if spec is None:
            if sample.label is None:
                raise ValueError(
                    f"sample {sample.sample_id} has no test cases: set metadata[{self.tests_key!r}] or the label"
                )
            spec = sample.label
        tests = parse_tests(spec)
        if not tests:
            raise ValueError(f"sample {sample.sample_id} has an empty list of test cases")
        return tests

    async def _run_case(self, program: str, case: CodeTest) -> tuple[bool, bool, str]:
        """``(passed, timed_out, detail)`` of one test case."""
        tests = case.test_code if case.expected_stdout is None else None
        async with self._sem():
            work_started()
            res = await self.sandbox.run(program, stdin=case.stdin, tests=tests)
        if res.timed_out:
            return False, True, f"timed out after {self.sandbox.limits.wall_s:g} s"
        if res.returncode != 0:
            return False, False, f"exit code {res.returncode}: {res.stderr.strip()[-500:]}"
        if case.expected_stdout is None:
            ok = bool(res.tests_passed)
            return ok, False, "" if ok else "the program exited before the tests ran"
        ok = _same_output(res.stdout, case.expected_stdout)
        detail = "" if ok else f"expected {case.expected_stdout[:200]!r}, got {res.stdout[:200]!r}"
        return ok, False, detail

    async def __call__(self, sample: Sample) -> dict[str, Any]:
        tests = self._tests(sample)
        program = extract_code(sample.response)
        results = await asyncio.gather(*(self._run_case(program, t) for t in tests))
        passed = sum(ok for ok, _, _ in results)
        out: dict[str, Any] = {
            "score": passed / len(tests) if self.score_mode == "fraction" else float(passed == len(tests)),
            "passed": float(passed),
            "total": float(len(tests)),
            "timeouts": float(sum(t for _, t, _ in results)),
        }
        failure = next((d for ok, _, d in results if not ok), None)
        if failure:
            out["first_failure"] = failure
        return out
