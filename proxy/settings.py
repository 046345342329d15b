"""Engram's configuration, read once from the environment and frozen."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

OFFLINE_MODEL_NAME = "all-MiniLM-L6-v2-q8"
# The same model before it was quantized for int8 arithmetic: for databases
# whose vectors were made with it.
LEGACY_OFFLINE_MODEL_NAME = "all-MiniLM-L6-v2-int8"
EXTRACTION_MODES = ("llm", "raw", "off")
WORKER_MODES = ("inline", "off")
PROVIDER_NAMES = ("openai", "ollama", "gemini")
SEARCH_MODES = ("hybrid", "vector")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
# Read by the provider client itself when one is set (Settings.egress_proxy).
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class SettingsError(ValueError):
    """An environment variable holds a value Engram cannot use."""


@dataclass(frozen=True)
class Settings:
    """Everything Engram reads from its environment; the only reader of it."""

    host: str = "127.0.0.1"
    port: int = 8000
    home: Path = field(default_factory=lambda: Path("~/.local/share/engram").expanduser())
    database_url: str | None = None
    embedding_model: str = OFFLINE_MODEL_NAME
    admin_key: str | None = field(default=None, repr=False)
    auth_cache_ttl: float = 300.0
    auth_cache_size: int = 10_000
    # OpenAI takes images of up to 20 MB, 26.7 MB once in base64.
    max_body_bytes: int = 32 * 1024 * 1024
    max_messages: int = 2048
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    openai_api_key: str | None = field(default=None, repr=False)
    default_provider: str = "openai"
    ollama_base_url: str = "http://localhost:11434"
    gemini_api_key: str | None = field(default=None, repr=False)
    gemini_base_url: str | None = None
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    # HTTPS_PROXY or HTTP_PROXY is set: calls to providers then follow the
    # environment's proxy settings (NO_PROXY too), as other HTTP clients do.
    egress_proxy: bool = False
    log_level: str = "info"
    extraction: str = "llm"  # llm | raw | off
    extraction_provider: str = "openai"
    extraction_model: str | None = None
    extraction_max_attempts: int = 5
    extraction_retry_base: float = 2.0
    extraction_credentials_ttl: float = 900.0
    worker: str = "inline"  # inline | off
    worker_lease: float = 60.0
    worker_poll_interval: float = 0.5
    auth_db_timeout: float = 0.5
    journal_max_bytes: int = 64 * 1024 * 1024
    shutdown_grace: float = 30.0
    request_body_timeout: float = 30.0
    db_statement_cache_size: int = 100
    search: str = "hybrid"  # hybrid | vector

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        env = _Env(os.environ if environ is None else environ)
        defaults = cls()
        return cls(
            host=env.text("ENGRAM_HOST", defaults.host),
            port=env.integer("ENGRAM_PORT", defaults.port, minimum=0, maximum=65535),
            home=Path(env.text("ENGRAM_HOME", str(defaults.home))).expanduser(),
            database_url=env.optional("DATABASE_URL"),
            embedding_model=env.text("ENGRAM_EMBEDDING_MODEL", defaults.embedding_model),
            admin_key=env.optional("ENGRAM_ADMIN_KEY"),
            auth_cache_ttl=env.number("ENGRAM_AUTH_CACHE_TTL", defaults.auth_cache_ttl),
            max_body_bytes=env.integer(
                "ENGRAM_MAX_BODY_BYTES", defaults.max_body_bytes, minimum=1024
            ),
            max_messages=env.integer("ENGRAM_MAX_MESSAGES", defaults.max_messages, minimum=1),
            openai_base_url=env.text("OPENAI_BASE_URL", defaults.openai_base_url).rstrip("/"),
            openai_api_key=env.optional("OPENAI_API_KEY"),
            default_provider=env.choice(
                "ENGRAM_DEFAULT_PROVIDER", defaults.default_provider, PROVIDER_NAMES
            ),
            ollama_base_url=env.text("OLLAMA_BASE_URL", defaults.ollama_base_url).rstrip("/"),
            gemini_api_key=env.optional("GEMINI_API_KEY"),
            gemini_base_url=env.optional("GEMINI_BASE_URL"),
            upstream_connect_timeout=env.number(
                "ENGRAM_UPSTREAM_CONNECT_TIMEOUT", defaults.upstream_connect_timeout
            ),
            upstream_read_timeout=env.number(
                "ENGRAM_UPSTREAM_READ_TIMEOUT", defaults.upstream_read_timeout
            ),
            egress_proxy=any(env.optional(name) for name in PROXY_VARIABLES),
            log_level=env.choice("ENGRAM_LOG_LEVEL", defaults.log_level, LOG_LEVELS),
            extraction=env.choice("ENGRAM_EXTRACTION", defaults.extraction, EXTRACTION_MODES),
            extraction_provider=env.choice(
                "ENGRAM_EXTRACTION_PROVIDER", defaults.extraction_provider, PROVIDER_NAMES
            ),
            extraction_model=env.optional("ENGRAM_EXTRACTION_MODEL"),
            extraction_max_attempts=env.integer(
                "ENGRAM_EXTRACTION_MAX_ATTEMPTS", defaults.extraction_max_attempts, minimum=1
            ),
            extraction_retry_base=env.number(
                "ENGRAM_EXTRACTION_RETRY_BASE", defaults.extraction_retry_base
            ),
            extraction_credentials_ttl=env.number(
                "ENGRAM_EXTRACTION_CREDENTIALS_TTL", defaults.extraction_credentials_ttl
            ),
            worker=env.choice("ENGRAM_WORKER", defaults.worker, WORKER_MODES),
            worker_lease=env.number("ENGRAM_WORKER_LEASE", defaults.worker_lease, minimum=1),
            worker_poll_interval=env.number(
                "ENGRAM_WORKER_POLL_INTERVAL", defaults.worker_poll_interval, minimum=0.01
            ),
            auth_db_timeout=env.number(
                "ENGRAM_AUTH_DB_TIMEOUT", defaults.auth_db_timeout, minimum=0.01
            ),
            journal_max_bytes=env.integer(
                "ENGRAM_JOURNAL_MAX_BYTES", defaults.journal_max_bytes, minimum=1024
            ),
            shutdown_grace=env.number("ENGRAM_SHUTDOWN_GRACE", defaults.shutdown_grace),
            search=env.choice("ENGRAM_SEARCH", defaults.search, SEARCH_MODES),
            db_statement_cache_size=env.integer(
                "ENGRAM_DB_STATEMENT_CACHE_SIZE", defaults.db_statement_cache_size
            ),
            request_body_timeout=env.number(
                "ENGRAM_REQUEST_BODY_TIMEOUT", defaults.request_body_timeout, minimum=0.1
            ),
        )

    @property
    def embedded_data_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def server_key(self, provider: str) -> str | None:
        """The provider key the server holds for `provider`, if any."""
        return {"openai": self.openai_api_key, "gemini": self.gemini_api_key}.get(provider)

    @property
    def journal_dir(self) -> Path:
        return self.home / "journal"


@dataclass(frozen=True)
class _Env:
    """Typed reads of environment variables, with errors that name the variable."""

    environ: Mapping[str, str]

    def optional(self, name: str) -> str | None:
        value = self.environ.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise SettingsError(f"{name} must be a finite number, got {raw!r}")
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {raw!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {raw!r}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{name} must be at most {maximum}, got {raw!r}")
        return value
