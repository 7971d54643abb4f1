"""Tasks run on worker threads with the bytes in flight bounded, and failures and interrupts handled in the
calling thread."""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

Task = TypeVar("Task")


def default_workers() -> int:
    """The number of cores this process may run on."""
    return len(os.sched_getaffinity(0))


def run_bounded(
    tasks: Sequence[Task],
    run: Callable[[Task], None],
    cost: Callable[[Task], int],
    workers: int,
    budget: int,
    done: Callable[[Task], None] | None = None,
) -> None:
    """`run(task)` for every task, on at most `workers` threads, in the order given.

    A task starts only while the costs (bytes) of the tasks in flight and its own fit in `budget`; one costlier than
    the budget runs alone. `done(task)` runs in the calling thread as tasks finish. The first failure stops new
    tasks, waits for the running ones and is raised as it was raised; so is an exception in the calling thread
    (Ctrl-C, SIGTERM): no task is running when this returns or raises.
    """
    running: dict[Future, Task] = {}
    in_flight = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardproof-worker")
    try:
        for task in tasks:
            size = cost(task)
            while running and (len(running) >= workers or in_flight + size > budget):
                in_flight -= _collect(running, cost, done)
            running[pool.submit(run, task)] = task
            in_flight += size
        while running:
            _collect(running, cost, done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(running: dict[Future, Task], cost: Callable[[Task], int], done: Callable[[Task], None] | None) -> int:
    """Wait for at least one running task to finish; report it (or raise its failure); return the bytes freed."""
    finished, _ = wait(running, return_when=FIRST_COMPLETED)
    freed = 0
    for future in [f for f in running if f in finished]:  # in start order
        task = running.pop(future)
        future.result()
        freed += cost(task)
        if done:
            done(task)
    return freed
