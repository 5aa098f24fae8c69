#!/usr/bin/env bash
# Create .venv, install durable_nb with its development tools, and build the widget's
# front-end (extension/widget -> durable_nb/static/). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'

# The widget bundle is built, not committed. npm ci only when the lock file changed.
if command -v npm >/dev/null 2>&1; then
    (
        cd extension/widget
        if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
            npm ci --no-audit --no-fund --loglevel=error
        fi
        npm run --silent build
    )
elif [ "${CI:-}" = "true" ]; then
    echo "setup.sh: npm (Node.js 18+) is needed to build the widget front-end" >&2
    exit 1
else
    echo "setup.sh: npm not found; the trace widget's bundle is not built (widgets will say so)" >&2
fi
