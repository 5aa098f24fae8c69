#!/usr/bin/env bash
# Install the benchmark-only dependencies (the peers: duron, dbos, joblib; see the `bench`
# extra in pyproject.toml) and run the whole suite:
#
#     bash benchmarks/run.sh              # full run (~45 s here), rewrites benchmarks/README.md
#     bash benchmarks/run.sh --quick      # small sizes, to check the suite itself
#     bash benchmarks/run.sh --no-write   # print only
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[bench]'
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python benchmarks/run.py "$@"
