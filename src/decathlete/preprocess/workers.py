"""Run per-case work in child processes, at most ``workers`` at a time, a fresh process per case or per chunk of
tiny cases.

A fresh process per case (the effect of ``maxtasksperchild=1``) or per chunk of tiny cases up to ``CHUNK_VOXELS`` (a
20 ms hippocampus case should not pay a ~25 ms process start) keeps memory near workers x one case, with no
fragmentation carried over; a child that dies fails its unreported cases, where a ``multiprocessing.Pool`` would
hang, and ``concurrent.futures`` with ``max_tasks_per_child`` deadlocks on Python 3.11-3.14 (gh-115634). Start method
"forkserver" ("spawn" where missing): plain "fork" of a parent that runs threads (torch, BLAS pools, tqdm's monitor)
can deadlock the child, while the fork server is a clean process that imported the preprocessing once, so children
start in milliseconds, not the interpreter start + imports of "spawn". As with any non-fork method, a script that
runs this with ``workers > 1`` needs ``if __name__ == "__main__":`` (children re-import the main script); without it
the cases fail with an error rather than hang.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from tqdm.auto import tqdm

CHUNK_VOXELS = 1 << 24  # input voxels x channels one child process may handle in a row (16 M: 64 MB float32)

Task = tuple[Any, ...]  # first element: the case id
Result = tuple[str, float, "str | None"]  # case id, seconds, error text or None
RunOne = Callable[[Task], Result]


def run_tasks(run_one: RunOne, tasks: list[Task], workers: int, progress: bool,
              size_of: Callable[[Task], int]) -> list[Result]:
    """``run_one`` (a module-level function that returns its errors as text) on every task, in this process
    (``workers <= 1``) or in child processes, with a progress bar; ``size_of`` estimates a task's voxels."""
    bar = tqdm(total=len(tasks), desc="preprocess", unit="case", disable=not progress or not tasks)
    try:
        if workers <= 1 or len(tasks) <= 1:
            results = []
            for task in tasks:
                results.append(run_one(task))
                bar.update()
            return results
        return _run_processes(run_one, _chunks(tasks, workers, size_of), workers, bar)
    finally:
        bar.close()


def _pool_context(run_one: RunOne) -> mp.context.BaseContext:
    """forkserver with ``run_one``'s module preloaded, or spawn where forkserver is missing."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([run_one.__module__])
        return ctx
    return mp.get_context("spawn")


def _chunks(tasks: list[Task], workers: int, size_of: Callable[[Task], int]) -> list[list[Task]]:
    """Consecutive tasks grouped up to ``CHUNK_VOXELS`` and ``len / (4 workers)`` cases per child process.

    A large case gets a process of its own; tiny ones (hippocampus: 60k voxels, 20 ms) share one, so the
    ~25 ms start-up of a child is not paid per case. At least 4 chunks per worker keep the load balanced.
    """
    cap = max(1, len(tasks) // (4 * workers))
    chunks: list[list[Task]] = []
    voxels = 0
    for task in tasks:
        size = size_of(task)
        if not chunks or len(chunks[-1]) >= cap or voxels + size > CHUNK_VOXELS:
            chunks.append([])
            voxels = 0
        chunks[-1].append(task)
        voxels += size
    return chunks


def _worker_main(run_one: RunOne, chunk: list[Task], conn: Connection) -> None:
    """Child process entry point: run a chunk of cases, sending each result to the parent as it finishes."""
    for task in chunk:
        conn.send(run_one(task))
    conn.close()


def _start_worker(ctx: mp.context.BaseContext, run_one: RunOne,
                  chunk: list[Task]) -> tuple[mp.process.BaseProcess, Connection]:
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_main, args=(run_one, chunk, send), name=f"preprocess-{chunk[0][0]}", daemon=True)
    proc.start()
    send.close()  # the child now holds the only write end: its exit shows up here as EOF
    return proc, receive


def _run_processes(run_one: RunOne, chunks: list[list[Task]], workers: int, bar: tqdm) -> list[Result]:
    """At most ``workers`` child processes at a time, a fresh one per chunk of cases (see the module docstring)."""
    ctx = _pool_context(run_one)
    pending = list(reversed(chunks))
    running: dict[Connection, tuple[mp.process.BaseProcess, list[Task], set[str]]] = {}
    results = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                chunk = pending.pop()
                proc, receive = _start_worker(ctx, run_one, chunk)
                running[receive] = (proc, chunk, set())
            for receive in wait(list(running)):
                proc, chunk, reported = running[receive]
                try:
                    new = [receive.recv()]
                except EOFError:  # the child has exited: whatever it did not report has failed
                    del running[receive]
                    proc.join()
                    receive.close()
                    hint = f"worker exited with code {proc.exitcode} (killed for memory, or a script without an "
                    hint += "`if __name__ == '__main__':` guard?)"
                    new = [(t[0], 0.0, hint) for t in chunk if t[0] not in reported]
                reported.update(r[0] for r in new)
                results.extend(new)
                bar.update(len(new))
    finally:
        for receive, (proc, _, _) in running.items():  # interrupted (Ctrl-C): stop the children still running
            proc.terminate()
            receive.close()
    return results
