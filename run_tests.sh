#!/usr/bin/env bash
# Set up ./.venv with the test requirements and run the test suite.
# Extra arguments go to pytest, e.g. `bash run_tests.sh -k convert`.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup_env.sh --test
exec .venv/bin/python -m pytest -q tests "$@"
