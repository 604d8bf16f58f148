#!/usr/bin/env bash
# The test command (README, and .ci/run runs exactly this): setup, then every tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "tools/test.sh: pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit $rc
