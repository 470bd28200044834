#!/usr/bin/env bash
# Regenerate tests/fixtures/golden/ with the reference libraries (SAELens, EleutherAI sparsify,
# dictionary_learning), each in its own git-ignored venv .venv-ref-<lib>/, then re-derive every
# fixture with plain torch as a cross-check.
#   scripts/make_golden_fixtures.sh                  # all libraries
#   scripts/make_golden_fixtures.sh sparsify         # one library
#   scripts/make_golden_fixtures.sh --no-install     # reuse the venvs as they are
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" scripts/make_golden_fixtures.py "$@"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, safetensors" 2>/dev/null; then
  .venv/bin/python scripts/make_golden_fixtures.py --self-check | tail -n 1
fi
