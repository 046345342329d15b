"""The production files: compose.yaml, Dockerfile, .dockerignore, .env.example, README.

There is no Docker engine (nor `docker compose`) on the machines that run this
suite, so nothing here builds or starts a container. compose.yaml is loaded with
PyYAML (locked as a dependency of uvicorn[standard]) and then checked the way
`docker compose config` would check it: known keys, valid interpolation, every
required variable set by a .env made from .env.example, declared volumes,
existing dependencies. The Dockerfile is read instruction by instruction.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The names Settings.from_env reads: it is the only reader of the environment.
SETTINGS_VARIABLE = re.compile(r'"((?:ENGRAM|OPENAI|OLLAMA|GEMINI)_[A-Z0-9_]+|DATABASE_URL)"')
COMPOSE_ONLY_VARIABLES = ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")

# `$$`, `${NAME}`, `${NAME:-default}` (and -, :?, ?, :+, +), `$NAME`: all compose accepts.
INTERPOLATION = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))"
)
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build", "image", "command", "entrypoint", "environment", "env_file", "ports", "expose",
    "volumes", "depends_on", "healthcheck", "restart", "profiles", "stop_grace_period",
    "stop_signal", "user", "working_dir", "networks", "labels", "logging", "deploy", "init",
    "read_only", "tmpfs", "ulimits", "extra_hosts", "pull_policy", "container_name",
    "security_opt", "cap_add", "cap_drop", "shm_size", "secrets", "configs",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
RESTART_POLICIES = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
SECRET_LITERAL = re.compile(r"sk-[A-Za-z0-9_-]{8,}|egm_[0-9a-f]{8,}|AIza[0-9A-Za-z_-]{20,}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")


def _text(name: str) -> str:
    return (ROOT / name).read_text()


def settings_variables() -> list[str]:
    return sorted(set(SETTINGS_VARIABLE.findall(_text("proxy/settings.py"))))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(_text("compose.yaml"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def env_example() -> dict[str, str]:
    """What a .env copied from .env.example sets: its uncommented assignments."""
    pairs = (line.split("=", 1) for line in _text(".env.example").splitlines())
    return {name: value for name, value in (p for p in pairs if len(p) == 2) if "#" not in name}


def strings(value: Any) -> Iterator[str]:
    """Every string value in a parsed compose file (keys are never interpolated)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def interpolations(text: str) -> list[re.Match[str]]:
    """Each `$` in `text` as compose reads it; an invalid one fails like `compose config`."""
    found = []
    for start in (m.start() for m in re.finditer(r"\$", text)):
        if found and start < found[-1].end():
            continue  # the second `$` of `$$`
        match = INTERPOLATION.match(text, start)
        assert match is not None, f"invalid interpolation format in {text!r}"
        found.append(match)
    return found


def interpolate(text: str, env: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match["braced"] or match["bare"]
        if name is None:
            return "$"
        op, arg, current = match["op"] or "", match["arg"] or "", env.get(name)
        unset = current is None or (op.startswith(":") and current == "")
        assert not (unset and op.endswith("?")), f"{name} is required: {arg}"
        if op.endswith("-"):
            return arg if unset else str(current)
        if op.endswith("+"):
            return "" if unset else arg
        return current or ""

    return INTERPOLATION.sub(value, text)


# ---------------------------------------------------------------- compose ----


def test_compose_has_the_four_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"postgres", "engram", "worker", "ollama"}
    image, tag = services["postgres"]["image"].split(":")
    assert image == "pgvector/pgvector"
    assert (major := re.fullmatch(r"pg(\d+)", tag))
    assert int(major[1]) >= 16
    assert services["engram"]["build"] in (".", {"context": "."})
    assert services["worker"]["image"] == services["engram"]["image"]
    assert services["worker"]["command"] == ["engram", "worker"]
    assert services["ollama"]["image"].split(":")[0] == "ollama/ollama"
    assert services["ollama"]["profiles"] == ["ollama"]
    assert [name for name, s in services.items() if "profiles" in s] == ["ollama"]


def test_compose_keys_are_ones_compose_knows(compose: dict[str, Any]) -> None:
    assert set(compose) - TOP_LEVEL_KEYS <= {k for k in compose if k.startswith("x-")}
    for name, service in compose["services"].items():
        assert set(service) <= SERVICE_KEYS, name
        assert RESTART_POLICIES.match(service.get("restart", "no")), name
        check = service.get("healthcheck", {})
        assert check == {"disable": True} or set(check) <= HEALTHCHECK_KEYS, name
        for key in ("interval", "timeout", "start_period"):
            assert key not in check or DURATION.match(check[key]), (name, key)
        assert "stop_grace_period" not in service or DURATION.match(service["stop_grace_period"])


def test_compose_dependencies_wait_for_a_healthy_database(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("engram", "worker"):
        assert services[name]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name, service in services.items():
        for target, rule in dict(service.get("depends_on", {})).items():
            assert target in services, name
            assert "profiles" not in services[target], f"{name} needs an optional service"
            assert rule["condition"] in CONDITIONS


def test_compose_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]["healthcheck"]["test"]
    assert postgres[0] == "CMD-SHELL"
    assert "pg_isready" in postgres[1]
    engram = services["engram"]["healthcheck"]["test"]
    assert engram[:3] == ["CMD", "python", "-c"]
    assert "/healthz" in engram[3]
    compile(engram[3], "engram healthcheck", "exec")
    # The worker serves no HTTP: the image's /healthz check would mark it unhealthy.
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_compose_engram_service(services: dict[str, dict[str, Any]]) -> None:
    engram = services["engram"]
    env = environment(engram)
    assert env["ENGRAM_WORKER"] == "off"  # a string: YAML 1.1 would read a bare off as False
    assert "ENGRAM_WORKER" not in environment(services["worker"])
    assert [str(p).rsplit(":", 1)[-1] for p in engram["ports"]] == ["8000"]
    assert env.get("ENGRAM_PORT", "8000") == "8000"
    assert engram["restart"] != "no"
    for name in ("engram", "worker"):
        assert services[name]["env_file"] in (".env", [".env"])


def test_compose_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/", "~", "$")):
                used.add(source)
    assert used == declared
    postgres = compose["services"]["postgres"]["volumes"]
    assert any(m.endswith(":/var/lib/postgresql/data") for m in postgres)
    assert any(
        m.endswith(":/var/lib/engram/journal") for m in compose["services"]["engram"]["volumes"]
    )


def test_compose_accepts_a_env_made_from_the_example(compose: dict[str, Any]) -> None:
    """What `docker compose config` does with .env: interpolate, fail on a missing `:?`."""
    env = env_example()
    for value in strings(compose):
        interpolations(value)  # every `$` well formed
        interpolate(value, env)  # every required variable set
    for name in ("engram", "worker"):
        url = interpolate(environment(compose["services"][name])["DATABASE_URL"], env)
        parts = urlsplit(url)
        assert parts.scheme in ("postgresql", "postgres")
        assert (parts.hostname, parts.port) == ("postgres", 5432)
        assert parts.username == env["POSTGRES_USER"]
        assert parts.password == env["POSTGRES_PASSWORD"]
        assert parts.path == "/" + env["POSTGRES_DB"]


def test_compose_holds_no_secret(compose: dict[str, Any]) -> None:
    assert not SECRET_LITERAL.search(_text("compose.yaml"))
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if key == "DATABASE_URL":
                assert urlsplit(value).password.startswith("${POSTGRES_PASSWORD"), name
            elif SECRET_NAME.search(key):
                leftover = INTERPOLATION.sub("", str(value))
                assert leftover == "", f"{name}: {key} must come from .env, not compose.yaml"


def test_every_compose_variable_is_in_the_env_example(compose: dict[str, Any]) -> None:
    used = {
        match["braced"] or match["bare"]
        for value in strings(compose)
        for match in interpolations(value)
        if match["braced"] or match["bare"]
    }
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", _text(".env.example"), re.M))
    assert used
    assert used <= documented


# ------------------------------------------------------------ .env.example ----


def test_settings_variables_are_found() -> None:
    names = settings_variables()
    assert "DATABASE_URL" in names
    assert "ENGRAM_WORKER" in names
    assert "OPENAI_API_KEY" in names
    assert len(names) >= 25


@pytest.mark.parametrize("name", [*settings_variables(), *COMPOSE_ONLY_VARIABLES])
def test_env_example_documents_every_variable(name: str) -> None:
    lines = _text(".env.example").splitlines()
    assignment = re.compile(r"^#? ?[A-Z][A-Z0-9_]*=")
    at = next((i for i, line in enumerate(lines) if re.match(rf"^#? ?{name}=", line)), None)
    assert at is not None, f"{name} is missing from .env.example"
    while at > 0 and assignment.match(lines[at - 1]):
        at -= 1  # variables that share one comment
    assert lines[at - 1].startswith("# ") if at else False, f"{name} has no comment"


def test_env_example_holds_placeholders_only() -> None:
    assert not SECRET_LITERAL.search(_text(".env.example"))
    for name, value in env_example().items():
        if SECRET_NAME.search(name) and name != "POSTGRES_PASSWORD":
            assert value == "", f"{name} in .env.example must be empty"
    assert "replace" in env_example()["POSTGRES_PASSWORD"]


@pytest.mark.parametrize("name", settings_variables())
def test_readme_documents_every_variable(name: str) -> None:
    assert f"`{name}`" in _text("README.md")


def test_readme_production_section() -> None:
    readme = _text("README.md")
    assert readme.index("## Production") < readme.index("## The `engram` command")
    section = readme.split("## Production", 1)[1].split("\n## ", 1)[0]
    for phrase in (
        "docker compose up",
        ".env",
        "--scale worker=",
        "SKIP LOCKED",
        "PgBouncer",
        "ENGRAM_DB_STATEMENT_CACHE_SIZE",
        "pg_dump",
        "schema.sql",
        "X-Engram-Mode: passthrough",
        "Retry-After",
        "/readyz",
        "engram model fetch",
    ):
        assert phrase in section, phrase


# -------------------------------------------------------------- Dockerfile ----


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not (pending or line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (pending + line).strip().partition(" ")
        result.append((word.upper(), rest.strip()))
        pending = ""
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each starting with its FROM, with ARGs resolved."""
    found: list[list[tuple[str, str]]] = []
    args: dict[str, str] = {}
    for word, rest in instructions(_text("Dockerfile")):
        if word == "ARG" and "=" in rest:
            args.update([rest.split("=", 1)])
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), rest)
        if word == "FROM":
            found.append([])
        if found:
            found[-1].append((word, rest))
    return found


def placed(stage: list[tuple[str, str]]) -> dict[str, str]:
    """Where each file COPY'd from the build context lands, as an absolute path."""
    workdir, paths = "/", {}
    for word, rest in stage:
        if word == "WORKDIR":
            workdir = str(Path(workdir, rest))
        if word == "COPY" and not rest.startswith("--from"):
            *sources, dest = shlex.split(rest)
            target = Path(workdir, dest)
            for source in sources:
                name = source.rstrip("/")
                many = (dest.endswith("/") and not source.endswith("/")) or len(sources) > 1
                paths[name] = str(target / name if many else target)
    return paths


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    pairs = (shlex.split(rest) for word, rest in stage if word == "ENV")
    return dict(item.split("=", 1) for pair in pairs for item in pair)


def test_dockerfile_is_multi_stage_from_the_lock_file() -> None:
    builder, runtime = stages()
    assert re.fullmatch(r"python:3\.11-slim AS builder", builder[0][1])
    assert re.fullmatch(r"python:3\.11-slim AS runtime", runtime[0][1])
    pinned = re.search(r'UV_VERSION="([^"]+)"', _text("scripts/_setup.sh"))
    runs = [rest for word, rest in builder if word == "RUN"]
    assert pinned
    assert any(f"uv=={pinned[1]}" in run for run in runs)
    syncs = [run for run in runs if "uv sync" in run]
    assert syncs
    assert all("--frozen" in run and "--no-dev" in run for run in syncs)
    assert "--no-install-project" not in syncs[-1]
    assert "--no-editable" not in syncs[-1]
    assert placed(builder)["uv.lock"] == "/app/uv.lock"
    assert env_of(builder)["UV_PROJECT_ENVIRONMENT"] == "/app/.venv"
    # The project is installed (editable, pointing at /app) only once its source is there.
    last_sync = builder.index(("RUN", syncs[-1]))
    copied = " ".join(rest for word, rest in builder[:last_sync] if word == "COPY")
    assert all(name in copied for name in ("proxy/", "providers/", "schema.sql"))


def test_dockerfile_keeps_the_source_layout_schema_sql_needs() -> None:
    """proxy/db/pool.py reads schema.sql from the folder that holds proxy/."""
    for stage in stages():
        paths = placed(stage)
        assert paths["proxy"] == "/app/proxy"
        assert paths["providers"] == "/app/providers"
        assert paths["schema.sql"] == "/app/schema.sql"
    runtime = stages()[-1]
    assert ("COPY", "--from=builder /app/.venv /app/.venv") in runtime


def test_dockerfile_runs_as_a_fixed_non_root_user_with_the_model_baked_in() -> None:
    runtime = stages()[-1]
    words = [word for word, _ in runtime]
    user_at = max(i for i, word in enumerate(words) if word == "USER")
    uid = runtime[user_at][1].split(":")[0]
    assert uid.isdigit(), "a numeric USER lets orchestrators check it is not root"
    assert int(uid) != 0
    assert any(f'--uid "{uid}"' in rest for word, rest in runtime[:user_at] if word == "RUN")
    fetch_at = words.index("RUN", user_at)
    assert runtime[fetch_at][1] == "engram model fetch"
    env = env_of(runtime)
    assert env["ENGRAM_HOME"].startswith("/")
    assert env["ENGRAM_HOST"] == "0.0.0.0"  # noqa: S104  (a container must listen outside itself)
    assert any(env["ENGRAM_HOME"] in rest for word, rest in runtime[:user_at] if word == "RUN")


def test_dockerfile_serves_on_8000_with_a_healthcheck() -> None:
    runtime = dict(stages()[-1])
    assert runtime["EXPOSE"] == "8000"
    assert json.loads(runtime["CMD"]) == ["engram", "serve"]
    assert "ENTRYPOINT" not in runtime or runtime["ENTRYPOINT"].startswith("[")
    check = json.loads(runtime["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert check[:2] == ["python", "-c"]
    assert "/healthz" in check[2]
    compile(check[2], "image healthcheck", "exec")


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = set(_text(".dockerignore").split())
    assert {".env", ".venv", ".tools", ".git"} <= ignored
