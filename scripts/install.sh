#!/usr/bin/env bash
# Install flexgen (editable) with its test extras, then the example plugins under plugins/
#
# torch is installed first, pinned, only where none is installed: a bare "torch" requirement
# on a machine without it pulls the newest CUDA build (several GB). A user who already has a
# torch build (CUDA or CPU) keeps it, since flexgen only asks for torch>=2.1.
# Override the pin with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0" or "torch --index-url ...".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install ${TORCH_SPEC:-torch==2.13.0}
fi

# From here on pip may add packages but never replace that torch: every later install is
# constrained to the installed version, so a dependency that wants another torch is an error
# instead of a several-GB download.
constraints=$(mktemp)

# pip builds each package inside its source folder and leaves build/ and *.egg-info there (the
# installed metadata lives in site-packages). Remove the ones this script made, on success or
# failure, so the clone stays as git checked it out; folders that were there before are kept.
build_leftovers() { ls -d flexgen.egg-info build plugins/*/build plugins/*/src/*.egg-info 2>/dev/null || true; }
existing=$(build_leftovers)
cleanup() {
    rm -f "$constraints"
    for path in $(build_leftovers); do
        grep -qxF "$path" <<<"$existing" || rm -rf "$path"
    done
}
trap cleanup EXIT
"$PYTHON" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
"$PYTHON" -m pip install -c "$constraints" -e ".[test]"

# The example third-party plugins, installed exactly as an outside package would be (not
# editable: what runs is what a user gets); pip adds bitsandbytes where it is missing.
# bitsandbytes needs torch>=2.4,<3: with another torch that plugin is skipped, with a line
# saying so (its tests then skip too). Skip both with FLEXGEN_SKIP_PLUGINS=1.
if [ -z "${FLEXGEN_SKIP_PLUGINS:-}" ]; then
    "$PYTHON" -m pip install -c "$constraints" ./plugins/flexgen-sparse-attention
    if "$PYTHON" -c "import sys, torch; from packaging.version import Version as V; \
sys.exit(not (2, 4) <= V(torch.__version__).release < (3,))"; then
        "$PYTHON" -m pip install -c "$constraints" ./plugins/flexgen-bitsandbytes
    else
        echo "install.sh: skipping plugins/flexgen-bitsandbytes: bitsandbytes needs torch>=2.4,<3," \
             "and the installed $(cat "$constraints") is kept" >&2
    fi
fi
