#!/usr/bin/env bash
# Set up (if needed) and run every check: ruff, mypy --strict, the widget front-end's
# typecheck and unit tests, and the whole test suite (including the real-browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# The browser test drives Debian's chromium (Playwright cannot download browsers here).
# Install it only when missing; under CI=true a missing browser fails that test.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
        || echo "test.sh: could not install chromium; the browser test will not run" >&2
fi

# The PostgreSQL tests need the server on 127.0.0.1:5432; start the local cluster if it is
# installed but stopped. Under CI=true an unreachable server fails those tests.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 \
    && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start \
        || echo "test.sh: could not start PostgreSQL; its tests will not run" >&2
fi

.venv/bin/ruff check durable_nb tests benchmarks
.venv/bin/ruff format --check durable_nb
.venv/bin/mypy
if command -v npm >/dev/null 2>&1; then
    (cd extension/widget && npm run --silent typecheck && npm test --silent)
fi
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
