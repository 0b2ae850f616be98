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
"$PYTHON" -m pip install -e ".[test]"

# The example third-party plugins, installed exactly as an outside package would be (not
# editable: what runs is what a user gets). Their requirements are lower bounds (flexgen, torch)
# or a range the installed torch satisfies (bitsandbytes needs torch>=2.4,<3), so pip adds
# bitsandbytes where it is missing and never replaces torch or the editable flexgen.
# Skip them with FLEXGEN_SKIP_PLUGINS=1.
if [ -z "${FLEXGEN_SKIP_PLUGINS:-}" ]; then
    "$PYTHON" -m pip install ./plugins/flexgen-sparse-attention ./plugins/flexgen-bitsandbytes
fi
