#!/usr/bin/env bash
# The GPU check of rlmonitor as one prepared command (benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/check.sh [--device cuda|cpu] [--dry-run] [--out DIR] [--budget SECONDS]
#                                [--only PART,...] [--wheels DIR] [--install auto|shim] [--python PY]
#
# 1. installs the carried wheels (--wheels, default <repo>/.whl) into a scratch folder on
#    PYTHONPATH, without network (pip --no-index --no-deps);
# 2. makes rlmonitor importable from this working tree without network or pip: the
#    installed rlmonitor when it is this tree (an editable install), else a scratch
#    package folder of links (rlmonitor/* plus callbacks/ as rlmonitor/callbacks, the
#    package-dir mapping of pyproject.toml) first on PYTHONPATH, with PYTHONSAFEPATH=1
#    so the tree's own rlmonitor/ (which has no callbacks/) is not imported from the
#    current folder (Python >= 3.11); --install shim forces the latter;
# 3. runs benchmarks/gpu/check.py (every other option goes to it), which runs the parts
#    and writes gpu-check.json, gpu-check-summary.txt and gpu-check.log under --out
#    (default: $OUT if set, else ./gpu-check-results).
# Exit code: 0 when every part ran without failing or timing out, 1 otherwise, 2 for bad options,
# 128 + N when stopped by signal N (the running part is ended, the results still written).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
PY="${PYTHON:-python3}"
WHEELS="$REPO/.whl"
INSTALL=auto
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --wheels=*) WHEELS="${1#*=}"; shift ;;
        --install) INSTALL="${2:?--install needs auto or shim}"; shift 2 ;;
        --install=*) INSTALL="${1#*=}"; shift ;;
        --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
        --python=*) PY="${1#*=}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "${BASH_SOURCE[0]}"
                   exec "$PY" "$REPO/benchmarks/gpu/check.py" --help ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
case "$INSTALL" in
    auto|shim) ;;
    *) echo "check.sh: --install takes 'auto' or 'shim', not '$INSTALL'" >&2; exit 2 ;;
esac
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "check.sh: no Python interpreter '$PY' (set --python or PYTHON)" >&2
    exit 2
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
STATE="$(mktemp -d "${TMPDIR:-/tmp}/rlm-gpu-check-setup.XXXXXX")"
trap 'rm -rf "$STATE"' EXIT
export WANDB_DIR="$STATE/wandb"
mkdir -p "$WANDB_DIR"
SETUP=""
note() {
    echo "[$(date +%H:%M:%S)]             setup | $*"
    SETUP="$SETUP$*"$'\n'
}

# 1. carried wheels
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    count=$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check \
            --target "$STATE/site" "$WHEELS"/*.whl >"$STATE/pip.log" 2>&1; then
        export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
        note "installed $count wheels from $WHEELS into $STATE/site"
    else
        note "pip could not install the wheels of $WHEELS: $(tail -n 3 "$STATE/pip.log" | tr '\n' ' ')"
    fi
    export RLM_GPU_WHEELS="$WHEELS"
else
    note "no wheels in $WHEELS: using the installed packages"
fi

# 2. rlmonitor (with rlmonitor.callbacks) from this working tree
callbacks_of() {  # where `import rlmonitor.callbacks` resolves, run from the repository root
    (cd "$REPO" && "$PY" -c 'import os, rlmonitor.callbacks as c; print(os.path.realpath(c.__file__))' 2>/dev/null)
}
if [ "$INSTALL" = auto ] && [ "$(callbacks_of)" = "$REPO/callbacks/__init__.py" ]; then
    note "rlmonitor: the installed one is this working tree ($REPO)"
else
    mkdir -p "$STATE/shim/rlmonitor"
    for entry in "$REPO"/rlmonitor/*; do
        ln -s "$entry" "$STATE/shim/rlmonitor/$(basename "$entry")"
    done
    ln -s "$REPO/callbacks" "$STATE/shim/rlmonitor/callbacks"
    export PYTHONPATH="$STATE/shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    if [ "$(callbacks_of)" = "$REPO/callbacks/__init__.py" ]; then
        note "rlmonitor: this working tree through links in $STATE/shim (PYTHONSAFEPATH=1)"
    else
        note "rlmonitor: could not make rlmonitor.callbacks importable from $REPO (Python >= 3.11 needed for the links)"
    fi
fi
export RLM_GPU_SETUP="$SETUP"

# in the background, so that a SIGTERM/SIGINT/SIGHUP to this script reaches it (it then ends the
# running part, writes the results and exits) before the scratch folder goes
"$PY" "$REPO/benchmarks/gpu/check.py" ${ARGS[@]+"${ARGS[@]}"} &
CHILD=$!
trap 'kill -TERM "$CHILD" 2>/dev/null' TERM INT HUP
while :; do
    wait "$CHILD"
    rc=$?
    kill -0 "$CHILD" 2>/dev/null || break
done
exit "$rc"
