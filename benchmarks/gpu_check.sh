#!/usr/bin/env bash
# The GPU check in one call, on a machine that has only this repository and a Python with torch (a CUDA build):
#   bash benchmarks/gpu_check.sh [OUT] [--dry-run] [--only STEPS]     OUT default gpu_check; PYTHON default python3
# The package runs from src/ without an install (such a machine may reach no package index); a missing
# dependency is named with the fix. See benchmarks/gpu_check.py for the steps and the report.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY' || exit 2
import importlib.util, sys
needed = ["torch", "transformers", "safetensors", "tokenizers", "numpy", "yaml", "tqdm", "pytest"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"gpu_check: {sys.executable} lacks {', '.join(missing)}; install them (pip install -r requirements.lock, "
             "or carry their wheels to a machine without a package index) or set PYTHON to a Python that has them")
PY
exec "$PYTHON" benchmarks/gpu_check.py "${1:-gpu_check}" "${@:2}"
