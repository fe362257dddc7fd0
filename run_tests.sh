#!/usr/bin/env bash
# Set up a virtual environment with the test requirements and run the test suite.
# Extra arguments go to pytest, e.g. `bash run_tests.sh -k convert`.
# VENV and PADDLE choose another environment and Paddle (see tools/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup_env.sh --test
exec "${VENV:-.venv}/bin/python" -m pytest -q tests "$@"
