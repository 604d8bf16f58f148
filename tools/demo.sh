#!/usr/bin/env bash
# The main job: regsync on its bundled demo guest (SMP, serial output, exit status).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/regsync run --stats "$@"
