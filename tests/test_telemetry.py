"""Engram reports to no one: onnxruntime's telemetry is off in each process that loads the model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.model_store import ONNX_FILE, ensure_offline_model
from proxy.settings import OFFLINE_MODEL_NAME, Settings
from tests.fakes.serving import stream_server_in_thread

# A process that loads the model the way Engram does, and one that makes a bare
# onnxruntime session of the same file. Each then idles until it is stopped.
ENGRAM = """
import sys, time
from pathlib import Path
from proxy.embeddings import load_model
model = load_model(sys.argv[1], Path(sys.argv[2]))
list(model.embed(["what did I say about espresso?"]))
time.sleep(120)
"""
BARE = """
import sys, time
import onnxruntime
onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
time.sleep(120)
"""


@contextmanager
def destinations() -> Iterator[tuple[str, list[str]]]:
    """An HTTPS proxy that connects nowhere: its URL, and the hosts asked of it."""
    asked: list[str] = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        asked.append(request.split(b" ")[1].decode("latin-1"))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    with stream_server_in_thread(note) as port:
        yield f"http://127.0.0.1:{port}", asked


# onnxruntime keeps quiet where one of these says it runs on a CI service (they
# are in its library), as when this suite runs in CI; a server has none of them.
_CI_MARKERS = (
    "CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
    "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
    "ORT_RUNNING_UNIT_TESTS",
)  # fmt: skip


def _start(code: str, args: list[str], proxy_url: str, home: Path) -> subprocess.Popen[bytes]:
    # Without the variable: each process must switch the telemetry off itself.
    left_out = {"ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", *_CI_MARKERS}
    env = {name: value for name, value in os.environ.items() if name not in left_out}
    # A home of its own: onnxruntime keeps a device id and its unsent events
    # under ~/.cache, and backs off for a while after failed uploads.
    home.mkdir()
    env.update(HTTPS_PROXY=proxy_url, HTTP_PROXY=proxy_url, HOME=str(home))
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-c", code, *args]
    return subprocess.Popen(argv, env=env, cwd=root)  # noqa: S603 (our own code)


def test_the_embedding_model_reports_to_no_one(base_settings: Settings, tmp_path: Path) -> None:
    # onnxruntime 1.29+ sends telemetry to Microsoft from Linux unless told not to
    # (proxy.telemetry). The bare session shows the test would see it: here it
    # asked for mobile.events.data.microsoft.com about 9 s after it started.
    folder = ensure_offline_model(base_settings.models_dir / OFFLINE_MODEL_NAME)
    engram_home, bare_home = tmp_path / "engram", tmp_path / "bare"
    with destinations() as (engram_proxy, engram_asked), destinations() as (bare_proxy, bare_asked):
        models = str(base_settings.models_dir)
        engram = _start(ENGRAM, [OFFLINE_MODEL_NAME, models], engram_proxy, engram_home)
        bare = _start(BARE, [str(folder / ONNX_FILE)], bare_proxy, bare_home)
        try:
            deadline = time.monotonic() + 60
            while not bare_asked and time.monotonic() < deadline:
                time.sleep(0.1)
            assert bare_asked, "a bare onnxruntime session reported nothing within 60 s"
            time.sleep(5)  # Engram's process started with it, its model a second later
            assert engram.poll() is None, "the Engram process ended early"
        finally:
            for process in (engram, bare):
                process.kill()
                process.wait()
    assert engram_asked == []
    # Nor did it leave the device id and event store the bare session made.
    assert (bare_home / ".cache" / "Microsoft").is_dir()
    assert not (engram_home / ".cache").exists()
