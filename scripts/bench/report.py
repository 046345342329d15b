"""Tables on stdout, JSON results on disk, and the facts about the machine and the run."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scripts.bench.harness import ROOT, run

RESULTS_DIR = ROOT / "results"  # gitignored


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain, aligned text table: text to the left, numbers to the right."""
    text = [[cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str], raw: Sequence[Any]) -> str:
        parts = []
        for value, width, original in zip(values, widths, raw, strict=True):
            numeric = isinstance(original, int | float) and not isinstance(original, bool)
            parts.append(value.rjust(width) if numeric else value.ljust(width))
        return "  ".join(parts).rstrip()

    print(f"\n{title}")
    print(line(list(headers), list(headers)))
    print("  ".join("-" * width for width in widths))
    for values, raw in zip(text, rows, strict=True):
        print(line(values, raw))


def _cpu_model() -> str:
    try:
        for raw in Path("/proc/cpuinfo").read_text().splitlines():
            if raw.startswith("model name"):
                return raw.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    """A read-only git query about the checkout (None outside a git checkout)."""
    try:
        answer = subprocess.run(  # noqa: S603 - our own arguments, read-only
            ["git", *args],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return answer.stdout.strip()


def _commit() -> str | None:
    commit = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--", "proxy", "providers", "schema.sql")
    return f"{commit}+uncommitted changes" if commit and changed else commit


def machine() -> dict[str, Any]:
    """When and where the numbers were taken: they are only comparable on the same machine."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _commit(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the results; the load average at the end says how busy the machine was."""
    if "machine" in payload:
        payload["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")


def add_output_options(parser: argparse.ArgumentParser, name: str, plot_help: str) -> None:
    """--out (default results/<name>.json), --plot FILE.png and --keep: every benchmark's."""
    parser.add_argument("--out", type=Path, default=default_out(name))
    parser.add_argument("--plot", type=Path, help=plot_help)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")


def run_benchmark(
    main: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    args: argparse.Namespace,
    draw: Callable[[Path, dict[str, Any]], None],
) -> None:
    """Run `main` as Engram runs (uvloop), write its JSON, and draw the plot if asked."""
    payload = run(main(args))
    write_json(args.out, payload)
    if args.plot:
        draw(args.plot, payload)


def verdict(
    name: str, value: float, target: float, *, at_most: bool, strict: bool = False
) -> dict[str, Any]:
    """One target check, for the summary table and the JSON."""
    if strict:
        met, sign = (value < target, "<") if at_most else (value > target, ">")
    else:
        met, sign = (value <= target, "<=") if at_most else (value >= target, ">=")
    return {"target": f"{name} {sign} {target}", "measured": value, "met": bool(met)}


def print_verdicts(verdicts: Sequence[dict[str, Any]]) -> None:
    rows = [(v["target"], v["measured"], "yes" if v["met"] else "NO") for v in verdicts]
    print_table("Targets (issue 6)", ("target", "measured", "met"), rows)
