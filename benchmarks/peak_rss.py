"""Measure wall time and peak resident memory of a command *and all of its descendants*.

Why the sum over the process tree: both nnU-Net and decathlete do their heavy lifting in worker
processes (``multiprocessing`` pools, ``-np``/``-npfp`` workers, data-loader workers).  The RSS of
the parent process alone would then report a few hundred MB while the workers hold the actual
volumes.  What matters for "will this fit on a 24 GiB machine" is the total, so every ``interval``
seconds we walk ``psutil.Process(pid).children(recursive=True)``, add up ``memory_info().rss`` over
the root and every live descendant, and keep the maximum.  The largest single-process RSS seen in
any sample is reported as well.

Limits -- read the numbers as an upper-ish estimate with sampling noise, not as an exact figure:

* Shared pages are counted once per process that maps them.  Forked workers share the parent's
  copy-on-write pages (the Python interpreter, imported numpy/torch, ...) and shared libraries, so
  the tree sum overstates true physical usage.  This matters in practice: nnU-Net v2.8 briefly forks
  a hard-coded ``Pool(12)`` just to list files, and each fork *looks* like a full copy of the parent
  (~250 MB RSS) for a few hundred ms, so the RSS peak can be dominated by pages that are never
  really duplicated.  ``pss=True`` (``--pss``) additionally tracks the peak of the summed PSS
  (proportional set size: shared pages split between the processes that map them), which does not
  double-count; it reads ``/proc/PID/smaps_rollup`` per process (Linux only, somewhat slower).
* Sampling can miss short spikes shorter than ``interval`` and processes that start and exit between
  two samples.  A smaller interval costs more CPU on the measuring side.
* Memory held outside the tree (page cache, tmpfs/``/dev/shm`` files, daemonised grandchildren that
  re-parent to init) is not counted.

``cpu_s`` is the user+system CPU time of the command and every descendant that was waited for,
taken as the delta of ``getrusage(RUSAGE_CHILDREN)`` around the run.  Unlike wall time it barely
moves when other jobs compete for the (2) cores, so compare both.  It is only meaningful when no
other thread of the calling process reaps children during the measurement.

Usage::

    python benchmarks/peak_rss.py --json out.json -- nnUNetv2_preprocess -d 4 -np 2
    python benchmarks/peak_rss.py --pss --interval 0.02 -- python -c "print('hi')"

psutil must be importable from the interpreter that runs this file (it is not needed by the
measured command).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

_MB = 1024.0 * 1024.0


def _tree_rss(root: psutil.Process, pss: bool = False) -> tuple[int, int, int, int]:
    """Return (sum RSS, largest single RSS, sum PSS (0 unless ``pss``), process count) over root + descendants.

    Sizes are in bytes.
    """
    try:
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        procs = [root]
    total = 0
    largest = 0
    pss_total = 0
    counted = 0
    for proc in procs:
        try:
            if pss:
                full = proc.memory_full_info()
                rss, proc_pss = full.rss, getattr(full, "pss", full.uss)
            else:
                rss, proc_pss = proc.memory_info().rss, 0
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += rss
        largest = max(largest, rss)
        pss_total += proc_pss
        counted += 1
    return total, largest, pss_total, counted


def measure(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    interval: float = 0.05,
    pss: bool = False,
) -> dict[str, Any]:
    """Run ``cmd`` to completion and report its wall time and peak tree RSS.

    ``env`` replaces the environment entirely when given (pass ``{**os.environ, ...}`` to extend it).
    The command's stdout/stderr are inherited.  Returns a dict with ``wall_s``, ``cpu_s``, ``peak_rss_mb`` (peak
    of the per-sample sum over the process tree), ``peak_single_process_rss_mb``, ``peak_pss_mb`` (peak of
    the summed PSS when ``pss`` is true, else ``None``), ``peak_n_processes``, ``n_samples``, ``returncode``,
    ``interval_s`` and ``cmd``.
    """
    if not cmd:
        raise ValueError("empty command")
    if interval <= 0:
        raise ValueError("interval must be > 0")
    peak_total = 0
    peak_single = 0
    peak_pss = 0
    peak_nproc = 0
    n_samples = 0
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    popen = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd)
    try:
        root = psutil.Process(popen.pid)
        while True:
            total, largest, pss_total, nproc = _tree_rss(root, pss)
            n_samples += 1
            peak_total = max(peak_total, total)
            peak_single = max(peak_single, largest)
            peak_pss = max(peak_pss, pss_total)
            peak_nproc = max(peak_nproc, nproc)
            try:
                popen.wait(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                continue
    except psutil.NoSuchProcess:
        popen.wait()
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    wall = time.perf_counter() - start
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    return {
        "cmd": list(cmd),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(peak_total / _MB, 1),
        "peak_single_process_rss_mb": round(peak_single / _MB, 1),
        "peak_pss_mb": round(peak_pss / _MB, 1) if pss else None,
        "peak_n_processes": peak_nproc,
        "n_samples": n_samples,
        "interval_s": interval,
        "returncode": popen.returncode,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command and report wall time and peak RSS summed over its process tree.",
        usage="%(prog)s [--json OUT] [--interval S] [--pss] -- cmd [args...]",
    )
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result as JSON to this path")
    parser.add_argument("--interval", type=float, default=0.05, help="sampling interval in seconds (default 0.05)")
    parser.add_argument("--pss", action="store_true", help="also track the peak of summed PSS (Linux)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run, after --")
    args = parser.parse_args(argv)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("no command given (put it after --)")
    result = measure(cmd, interval=args.interval, pss=args.pss)
    text = json.dumps(result, indent=2)
    print(text, file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return int(result["returncode"]) if result["returncode"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
