"""Thread limits for the small numerical steps of the analysis and of k-means on CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["single_threaded"]

_controller: ThreadpoolController | None = None


def single_threaded(
    device: str | torch.device | None = None, *, user_api: str | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Run the calling thread's BLAS/OpenMP pools with one thread on CPU, as scikit-learn's KMeans does.

    Every step here is small (n × m with m ≤ a few dozen, or k × d centroids): a second thread gains
    little, while each parallel region can wait a whole scheduler slice (6–16 ms measured) whenever
    another process holds a core, which made k-means 10–40× slower on a shared 2-core machine.
    ``torch.set_num_threads`` and other threads are untouched; the limit is restored on exit.

    Parameters
    ----------
    device : str or torch.device, optional
        Nothing is limited on a non-CPU device.
    user_api : {"openmp", "blas"}, optional
        Limit only this kind of pool (default: both).
    """
    global _controller
    if device is not None and torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    if _controller is None:  # inspecting the loaded libraries takes milliseconds: do it once
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api=user_api)
