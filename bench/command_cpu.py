"""CPU per object of our SCP receiving and our push sending, with and without the command-set
codec (:mod:`anonpipe.commandset`), alternating in one process.

Run from the repository root (DCMTK and Orthanc installed)::

    .venv/bin/python -m bench.command_cpu --files 400 --rounds 3

Each round receives the study from one ``storescu`` into our StorageSCP and pushes it with
:func:`anonpipe.scu.push_items` (one association) into a research Orthanc, once with the codec
and once with pynetdicom's own command-set path (order alternating by round). Printed: this
process's CPU seconds (all threads: ``time.process_time``) and milliseconds per object, and the
ratio with / without; ``storescu`` and Orthanc are other processes and are not counted.
``--profile FILE`` then writes yappi profiles (CPU clock) of one more run of each with the
codec, as ``FILE.receive`` and ``FILE.push`` (pstat).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from anonpipe import commandset
from anonpipe.logs import configure_logging
from bench.net_throughput import make_study, receive_ours, send_ours, start_servers


@contextmanager
def codec(enabled: bool) -> Iterator[None]:
    """The codec installed, or kept out (``associate`` calls ``install``: made a no-op)."""
    install = commandset.install
    if enabled:
        install()
    else:
        commandset.uninstall()
        commandset.install = lambda: None
    try:
        yield
    finally:
        commandset.install = install


def cpu(action: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) spent in *action*."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    action()
    return time.process_time() - cpu0, time.perf_counter() - wall0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="write a yappi profile (pstat) here")
    args = parser.parse_args()
    configure_logging("warning")
    work = Path(tempfile.mkdtemp(prefix="command-cpu-", dir="/var/tmp"))
    tmp = work / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    study = make_study(work / "in", args.files)
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    with ExitStack() as stack:
        servers = start_servers(stack, work)
        cases: dict[str, Callable[[], object]] = {
            "receive": lambda: receive_ours(servers, study, 1, work / "landing"),
            "push": lambda: send_ours(servers, study, 1),
        }
        for round_ in range(args.rounds):
            for enabled in (round_ % 2 == 0, round_ % 2 == 1):
                with codec(enabled):
                    for case, run in cases.items():
                        os.sync()
                        spent = cpu(run)
                        results.setdefault((case, enabled), []).append(spent)
                        label = "codec" if enabled else "pynetdicom"
                        print(
                            f"round {round_ + 1} {case:7s} {label:10s} cpu {spent[0]:6.2f} s "
                            f"wall {spent[1]:6.2f} s",
                            flush=True,
                        )
        if args.profile:
            # A profiler only (not a dependency of anonpipe): pip install yappi.
            yappi: Any = importlib.import_module("yappi")
            yappi.set_clock_type("cpu")
            with codec(True):
                for case, run in cases.items():
                    yappi.start()
                    run()
                    yappi.stop()
                    yappi.get_func_stats().save(f"{args.profile}.{case}", type="pstat")
                    yappi.clear_stats()
    count = study.count
    print(f"\n{count} objects, median of {args.rounds} round(s); CPU of this process")
    for case in ("receive", "push"):
        without = statistics.median(c for c, _w in results[(case, False)])
        with_ = statistics.median(c for c, _w in results[(case, True)])
        print(
            f"{case:7s} pynetdicom {without:6.2f} s ({1000 * without / count:5.2f} ms/object)  "
            f"codec {with_:6.2f} s ({1000 * with_ / count:5.2f} ms/object)  "
            f"ratio {with_ / without:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
