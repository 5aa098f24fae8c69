#!/usr/bin/env bash
# The core test subset on every other Python that pyproject claims, each with a pandas and
# DuckDB at an end of the supported ranges (scripts/test.sh runs everything on 3.11 with the
# newest). One virtual environment per cell under .venvs/ (git-ignored), made on first use.
#
#   bash scripts/test_versions.sh            # every cell
#   bash scripts/test_versions.sh 3.12       # the cells of one Python
#
# Interpreters: pyenv's builds (~/.pyenv/versions/3.X.*) when present, else python3.X on
# PATH. A cell whose Python is missing is skipped with a message, except under CI=true, where
# a claimed version that cannot be tested fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

# python | what it pins (pip requirement specifiers) | why this cell
MATRIX=(
    "3.10|pandas==2.1.* duckdb==1.1.* numpy<2 pyarrow==16.*|the oldest Python with the oldest pandas, DuckDB and pyarrow allowed"
    "3.12|pandas==2.3.* duckdb==1.5.* numpy<2.5|the newest pandas 2 and DuckDB 1 (what pip picks on 3.10; pandas 2.3 warns inside timedelta_range on numpy 2.5)"
    "3.13|pandas>=3 duckdb>=2|the newest Python with the newest pandas and DuckDB"
)
# the core: hashing, codecs, the engine, both stores and their migrations, the features
CORE=(
    tests/test_hashing.py
    tests/test_codecs.py
    tests/test_engine.py
    tests/test_duckdb_store.py
    tests/test_store_conformance.py
    tests/test_postgres_store.py
    tests/test_schema_evolution.py
    tests/test_features.py
    tests/test_client.py
)
TOOLS=(pytest pytest-timeout hypothesis polars pydantic pyarrow numpy pandas duckdb)

find_python() {
    # the first candidate that runs and is that version (a pyenv shim may exist and fail)
    local v=$1 p
    for p in "$HOME"/.pyenv/versions/"$v".*/bin/python "$(command -v "python$v" || true)"; do
        if [ -n "$p" ] && [ -x "$p" ] &&
            "$p" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$v')" 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

only=${1:-}
failed=()
ready=()
for cell in "${MATRIX[@]}"; do
    IFS='|' read -r ver pins why <<<"$cell"
    if [ -n "$only" ] && [ "$only" != "$ver" ]; then
        continue
    fi
    if ! py=$(find_python "$ver"); then
        msg="test_versions.sh: Python $ver not found (no ~/.pyenv/versions/$ver.* and no python$ver on PATH)"
        if [ "${CI:-}" = "true" ]; then
            echo "$msg: pyproject claims it, so CI fails; install it (pyenv install $ver)" >&2
            failed+=("$ver (no interpreter)")
            continue
        fi
        echo "$msg: skipped" >&2
        continue
    fi
    venv=".venvs/py$ver"
    stamp="$venv/.pins"
    start=$(date +%s)
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$pins" ]; then
        rm -rf "$venv"
        mkdir -p .venvs
        log=".venvs/py$ver.install.log"
        # shellcheck disable=SC2086  # the pins are separate specifiers
        if ! {
            "$py" -m venv "$venv" &&
                "$venv/bin/python" -m pip install --quiet --upgrade pip &&
                "$venv/bin/python" -m pip install --quiet -e '.[postgres]' "${TOOLS[@]}" $pins
        } >"$log" 2>&1; then
            cat "$log" >&2
            echo "test_versions.sh: could not install the environment of Python $ver ($pins)" >&2
            failed+=("$ver (install)")
            continue
        fi
        echo "$pins" >"$stamp"
    fi
    echo "== Python $ver: environment ready in $(($(date +%s) - start)) s ($pins)"
    ready+=("$ver|$why")
done

# The cells' tests wait on processes, timers and the database far more than they compute,
# so they run side by side (each its own PostgreSQL schemas and temporary folders); their
# outputs are shown whole, one after the other.
start=$(date +%s)
pids=()
for cell in "${ready[@]}"; do
    IFS='|' read -r ver why <<<"$cell"
    ".venvs/py$ver/bin/python" -m pytest -q -p no:cacheprovider "${CORE[@]}" \
        >".venvs/py$ver.test.log" 2>&1 &
    pids+=("$!")
done
for i in "${!ready[@]}"; do
    IFS='|' read -r ver why <<<"${ready[$i]}"
    set +e
    wait "${pids[$i]}"
    rc=$?
    set -e
    versions=$(".venvs/py$ver/bin/python" -c 'import sys, pandas, duckdb, pyarrow, numpy
print(f"Python {sys.version.split()[0]}, pandas {pandas.__version__}, duckdb {duckdb.__version__}, pyarrow {pyarrow.__version__}, numpy {numpy.__version__}")')
    echo "== core tests on $versions: $why"
    cat ".venvs/py$ver.test.log"
    echo "== $versions: pytest exit $rc"
    if [ "$rc" -ne 0 ]; then
        failed+=("$ver")
    fi
done
echo "== the core tests of ${#ready[@]} Python versions took $(($(date +%s) - start)) s side by side"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "test_versions.sh: failed on ${failed[*]}" >&2
    exit 1
fi
if [ "${#ready[@]}" -eq 0 ]; then
    echo "test_versions.sh: no Python version was tested" >&2
    [ "${CI:-}" != "true" ] || exit 1
fi
