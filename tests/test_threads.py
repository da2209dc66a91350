"""torch_threads: the package's one place that sets torch's thread count and restores it."""

from __future__ import annotations

import pytest
import torch

from lr2vq_analysis._threads import torch_threads


def test_torch_threads_sets_the_count_and_restores_it_also_on_error():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), torch_threads(3):
            assert torch.get_num_threads() == 3
            raise RuntimeError
        assert torch.get_num_threads() == 2
        with torch_threads(None):  # no change asked: none made
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_torch_threads_keeps_a_setting_changed_inside_the_block():
    """torch.set_num_threads is process-wide: a change made meanwhile (another thread's) is not undone."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            torch.set_num_threads(3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
