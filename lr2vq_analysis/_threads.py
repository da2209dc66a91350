"""Thread limits for the small numerical steps of the analysis, k-means and other CPU compute paths.

The package's one helper for this is :func:`single_threaded`: every compute path that would otherwise
stall on a busy machine (k-means, the probes, the trade-off fit) runs inside it. Setting torch's
thread count and restoring it is done in one place, :func:`torch_threads` (fine-tuning uses it with the
count its ``num_threads`` policy picks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["single_threaded", "torch_threads"]

_controller: ThreadpoolController | None = None


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``; restore the caller's count on exit.

    ``None`` leaves the setting alone. The previous count comes back also when the block raises,
    unless another Python thread changed the (process-wide) setting meanwhile: its setting is kept.

    Parameters
    ----------
    count : int or None
        Torch intra-op threads inside the block (at least 1), or None for no change.

    Examples
    --------
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() == count:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def _one_thread(user_api: str | None) -> Iterator[None]:
    global _controller
    if _controller is None:  # inspecting the loaded libraries takes milliseconds: do it once
        _controller = ThreadpoolController()
    with torch_threads(1), _controller.limit(limits=1, user_api=user_api):
        yield


def single_threaded(
    device: str | torch.device | None = None, *, user_api: str | None = None
) -> contextlib.AbstractContextManager[None]:
    """Run torch's intra-op threads and the BLAS/OpenMP pools with one thread on CPU; restore on exit.

    Every step run inside is small (n × m with m ≤ a few dozen, or k × d centroids): a second thread
    gains little, while each parallel region can wait a whole scheduler slice (6–16 ms measured)
    whenever another process holds a core. On a shared 2-core machine this made k-means 8–40× slower
    at torch's default of 2 threads than at 1 (see ``docs/performance.md``, "Threads").

    Inside the block ``torch.get_num_threads() == 1`` and threadpoolctl limits the native pools
    (OpenMP, MKL/OpenBLAS) to one thread; on exit the caller's settings come back, also when the block
    raises. ``torch.set_num_threads`` is process-wide: if another Python thread changes it meanwhile,
    its setting is kept.

    Parameters
    ----------
    device : str or torch.device, optional
        Nothing is limited on a non-CPU device.
    user_api : {"openmp", "blas"}, optional
        Limit only this kind of native pool (default: both); torch's own threads are always pinned.

    Examples
    --------
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with single_threaded():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if device is not None and torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return _one_thread(user_api)
