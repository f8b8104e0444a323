"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one torch CPU thread (the tiny-model tests are faster that way on a
    shared machine), then restore the previous count. ``torch._C.set_num_threads`` because
    a vLLM CPU worker created in this process replaces ``torch.set_num_threads`` by a no-op."""
    import torch

    n = torch.get_num_threads()
    torch._C.set_num_threads(1)
    yield
    torch._C.set_num_threads(n)
