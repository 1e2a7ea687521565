# Sourced by tools/run and tools/test: create .venv if needed and install meshq into it.
# $1 is the extras to install ("" or "test" or "test,bench").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "meshq needs Python 3.11 or newer (found: $("$py" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x "$root/.venv/bin/python" ]; then
    "$py" -m venv "$root/.venv"
fi
extras="${1:-}"
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
stamp="$root/.venv/.meshq-installed-$(echo "$extras" | tr ',' '-')"
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "installing meshq${extras:+ [$extras]} into .venv ..." >&2
    log="$root/.venv/install.log"
    if ! { "$root/.venv/bin/python" -m pip install --upgrade pip \
           && "$root/.venv/bin/python" -m pip install -e "$spec"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "installing meshq failed; the whole log is in $log" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
