#!/usr/bin/env bash
# Create a virtual environment and install the pinned requirements into it.
#   bash tools/setup_env.sh          runtime requirements, into ./.venv
#   bash tools/setup_env.sh --test   and the test requirements, with the optional
#                                    deployment ones (ONNX export and ONNX Runtime) they test
# Paddle: paddlepaddle (CPU) without a CUDA GPU, paddlepaddle-gpu where
# `nvidia-smi` sees one. Overrides from the environment:
#   PYTHON  the interpreter (default python3)
#   VENV    the environment's folder (default .venv)
#   PADDLE  the Paddle requirement(s) instead of the detected ones,
#           e.g. PADDLE="paddlepaddle==2.6.2 numpy<2"
# A stamp file skips pip when nothing changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1
venv=${VENV:-.venv}

if [ -n "${PADDLE:-}" ]; then
  read -r -a paddle <<< "$PADDLE"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # PyPI's newest GPU build; it was built against NumPy 1.x
  paddle=(paddlepaddle-gpu==2.6.2 "numpy<2")
else
  paddle=(paddlepaddle==3.3.1 numpy==2.4.6)
fi
files=(requirements.txt)
[ "$with_tests" = 1 ] && files+=(requirements-test.txt requirements-deploy.txt)

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
stamp="$venv/.installed-$(cat "${files[@]}" <(printf '%s\n' "${paddle[@]}") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "Installing ${paddle[*]} and ${files[*]} into $venv ..."
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${paddle[@]}" \
    $(printf -- '-r %s ' "${files[@]}") 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$stamp"
fi
