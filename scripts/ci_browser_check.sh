#!/usr/bin/env bash
# CI's browser check (issue 8): the main job with smoke-test schedules (quick=tiny, a few minutes on 2 cores)
# writes the project's default store (./mlflow.db, ./mlruns, ./work) as `make run` does; then `mlflow ui`
# (mlflow server) on 127.0.0.1 is opened with headless Chromium. Screenshots, dumped DOMs and report.md are
# kept in work/browser-check/ (CI artifacts). Run from anywhere; needs the venv (`make venv`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
export PATH="$BIN:$PATH"   # mlflow run --env-manager local starts the entry points with this python

if ! command -v chromium >/dev/null 2>&1; then
    echo "[browser-check] installing Debian chromium"
    apt-get install -y chromium >/dev/null || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
fi

t0=$(date +%s)
mlflow run . -e main --env-manager local --experiment-name ichflow-pipeline -P quick=tiny
echo "[browser-check] tiny main job: $(( $(date +%s) - t0 )) s"
python scripts/browser_check.py --tracking-uri "${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" --out work/browser-check
