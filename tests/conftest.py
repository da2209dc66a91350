"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the test models are tiny, and several threads spin-wait on a shared machine (7x here).

    The sweeps and the training loop also run one thread per process; the caller's setting is restored.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
