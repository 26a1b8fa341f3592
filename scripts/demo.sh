#!/usr/bin/env bash
# The main job on a fresh machine: install ftengine, make a small model, generate streamed text
# on the CPU. Extra arguments go to `python -m ftengine.generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FTENGINE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q .
[ -f demo-model/config.json ] || python scripts/make_demo_model.py demo-model
python -m ftengine.generate --model demo-model --prompt "Once upon a time" --max-new-tokens 48 "$@"
