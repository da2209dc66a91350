"""Thread cliff: k-means and probe paths at the user's thread setting vs one thread, beside a busy process.

Each compute path runs at torch's default thread count (``--threads``, default: the number of CPUs, what
torch uses without ``OMP_NUM_THREADS``) and at one thread, alternating, while a second process keeps one
core busy (the situation of a shared machine, or of a data-loader worker). Reported: median seconds of
each setting and their ratio (user / one thread); the goal is ≤ 1.2×. With ``--unpinned`` the package's
``single_threaded`` helper is replaced by its former version (threadpoolctl only, torch's threads left
alone), which shows the cliff the helper removes, in the same run.

Usage::

    python benchmarks/bench_threads.py                 # ~2 min on 2 shared cores
    python benchmarks/bench_threads.py --unpinned      # the same with the old helper
    python benchmarks/bench_threads.py --quick         # tiny, correctness only (a test runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from lr2vq_analysis import probes as probes_module
from lr2vq_analysis.kmeans import assign, kmeans
from lr2vq_analysis.probes import clustering_error_curve

# The module, not the function the package exports under the same name (patched by --unpinned).
kmeans_module = importlib.import_module("lr2vq_analysis.kmeans")


def _spin(stop: Any) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """A second process that keeps one core busy for the duration of the block."""
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    process.start()
    try:
        yield
    finally:
        stop.set()
        process.join(timeout=5)


def _threadpoolctl_only(device: Any = None, *, user_api: str | None = None) -> Any:
    """The former helper: native pools limited, torch's intra-op threads untouched."""
    if device is not None and torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api=user_api)


def paths(quick: bool) -> dict[str, Callable[[], object]]:
    """The compute paths, each a closure over its data."""
    rng = np.random.default_rng(0)
    n = 2000 if quick else 18432
    x8 = torch.from_numpy((rng.standard_normal((n, 8)) * np.linspace(1, 0.2, 8)).astype(np.float32))
    x4 = x8[:, :4].contiguous()
    centroids = x8[:256].clone()
    weight = rng.standard_normal((96, 96) if quick else (384, 384)).astype(np.float32)
    return {
        "kmeans d=8 k=256 (25 it)": lambda: kmeans(x8, 256, seed=0, max_iter=25, tol=0.0),
        "kmeans d=4 k=16 (25 it)": lambda: kmeans(x4, 16, seed=0, max_iter=25, tol=0.0),
        "assign d=8 k=256": lambda: assign(x8, centroids),
        "probes k=64 m=8 d̃=2,8": lambda: clustering_error_curve(weight, k=64, m=8, d_tilde=[2, 8]),
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 repeat (correctness only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the user's setting (default: CPUs)")
    parser.add_argument("--unpinned", action="store_true", help="use the former threadpoolctl-only helper")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else max(1, args.repeats)
    if args.unpinned:
        kmeans_module.single_threaded = _threadpoolctl_only  # type: ignore[assignment]
        probes_module.single_threaded = _threadpoolctl_only  # type: ignore[assignment]
    previous = torch.get_num_threads()
    settings = {"user": args.threads, "one": 1}
    rows: list[dict[str, object]] = []
    print(
        f"torch {torch.__version__}, user setting {args.threads} thread(s), {os.cpu_count()} CPUs, "
        f"{'unpinned (former helper)' if args.unpinned else 'pinned'}, load {os.getloadavg()}"
    )
    try:
        with busy_process():
            for name, run in paths(args.quick).items():
                times: dict[str, list[float]] = {label: [] for label in settings}
                run()  # warm-up: lazy imports, thread pools, allocator
                for repeat in range(repeats):
                    order = list(settings) if repeat % 2 == 0 else list(settings)[::-1]
                    for label in order:
                        torch.set_num_threads(settings[label])
                        with threadpool_limits(limits=settings[label]):
                            start = time.perf_counter()
                            run()
                            times[label].append(time.perf_counter() - start)
                user, one = statistics.median(times["user"]), statistics.median(times["one"])
                rows.append({"path": name, "user_s": user, "one_s": one, "ratio": user / one})
                print(f"{name:<28} user {user:8.3f} s   one thread {one:8.3f} s   ratio {user / one:5.2f}×", flush=True)
    finally:
        torch.set_num_threads(previous)
    return rows


if __name__ == "__main__":
    main()
