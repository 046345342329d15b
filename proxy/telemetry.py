"""Engram reports to no one: the one dependency that would is told not to.

Since 1.29 onnxruntime's Linux and macOS builds send events to Microsoft
(process, session and model facts, then every few seconds while it runs: a
session made here asked for mobile.events.data.microsoft.com 9 s later, then
again at 15 and 23 s) unless ORT_DISABLE_TELEMETRY=1 is in the environment
before it starts. A self-hosted memory proxy calls the providers it is
configured for and nothing else, so every path to onnxruntime goes through
here first.
"""

from __future__ import annotations

import os


def silence_onnxruntime() -> None:
    """Switch onnxruntime's telemetry off for this process, unless the operator chose otherwise.

    Call before onnxruntime (or fastembed, which imports it) is first imported:
    onnxruntime reads the variable once, when it starts.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
