"""A provider behind TLS (certifi's or a private CA's trust), and behind an egress proxy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import openai
import pytest
import trustme

from tests.conftest import Engram
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.serving import serve_in_thread, stream_server_in_thread


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_upstream(
    private_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FakeOpenAI, str]]:
    """The fake OpenAI over HTTPS, its certificate issued by `private_ca`; and its URL."""
    folder = tmp_path_factory.mktemp("tls")
    certificate = private_ca.issue_cert("127.0.0.1")
    certificate.private_key_pem.write_to_path(folder / "key.pem")
    certificate.cert_chain_pems[0].write_to_path(folder / "chain.pem")
    fake = FakeOpenAI(reply="Hello over TLS.")
    with serve_in_thread(
        fake.app, ssl_keyfile=str(folder / "key.pem"), ssl_certfile=str(folder / "chain.pem")
    ) as url:
        yield fake, url.replace("http://", "https://")


@pytest.fixture
def ca_file(private_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    private_ca.cert_pem.write_to_path(path)
    return str(path)


def test_a_provider_behind_a_private_ca_is_trusted_through_ssl_cert_file(
    tls_upstream: tuple[FakeOpenAI, str],
    ca_file: str,
    start_engram: Callable[..., AbstractContextManager[Engram]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, url = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)  # read when Engram makes its client
    with start_engram(openai_base_url=f"{url}/v1", extraction="off") as engram:
        user = engram.create_user()
        with engram.client(user) as client:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}]
            )
            streamed = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}], stream=True
            )
            text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert answer.choices[0].message.content == text.strip() == "Hello over TLS."
    assert len(fake.received) == 2


def test_an_untrusted_certificate_is_refused_and_said_so(
    tls_upstream: tuple[FakeOpenAI, str],
    start_engram: Callable[..., AbstractContextManager[Engram]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, url = tls_upstream
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # certifi's authorities only
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    calls_before = len(fake.received)
    with start_engram(openai_base_url=f"{url}/v1", extraction="off") as engram:
        user = engram.create_user()
        with engram.client(user) as client, pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}]
            )
    assert refused.value.status_code == 502
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_unreachable"
    assert "failed TLS certificate verification" in error["message"]
    assert "SSL_CERT_FILE" in error["message"]
    assert len(fake.received) == calls_before  # nothing was sent over the untrusted connection


@contextmanager
def connect_proxy() -> Iterator[tuple[str, list[str]]]:
    """An HTTPS egress proxy (CONNECT tunnels) in a thread; its URL and the targets it tunnelled."""
    tunnelled: list[str] = []

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        method, target = request.decode("latin-1").split(" ")[:2]
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        tunnelled.append(target)
        host, port = target.rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(
            pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True
        )

    with stream_server_in_thread(tunnel) as port:
        yield f"http://127.0.0.1:{port}", tunnelled


def test_https_proxy_carries_provider_calls_and_no_proxy_skips_it(
    tls_upstream: tuple[FakeOpenAI, str],
    ca_file: str,
    start_engram: Callable[..., AbstractContextManager[Engram]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, url = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    with connect_proxy() as (proxy_url, tunnelled):
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        for no_proxy, through_proxy in (("", True), ("127.0.0.1", False)):
            monkeypatch.setenv("NO_PROXY", no_proxy)
            tunnelled.clear()
            with start_engram(
                openai_base_url=f"{url}/v1", extraction="off", egress_proxy=True
            ) as engram:
                user = engram.create_user()
                with engram.client(user) as client:
                    answer = client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}]
                    )
            assert answer.choices[0].message.content == "Hello over TLS."
            upstream_host = url.removeprefix("https://")
            assert tunnelled == ([upstream_host] if through_proxy else []), no_proxy
