#!/usr/bin/env bash
# GPU recipe: segmentation, classification and detection on the real PHE-SICH-CT-IDS data, AMP, <= 8 min.
#
# Before (on a machine that has ../shared and PyPI):
#   python benchmarks/gpu_pack_phe.py pack --src ../shared/phe-sich-ct-ids --out .gpu/phe_half.tar.xz   # 40 MB
#   benchmarks/gpu_wheels.sh            # the packages the GPU image lacks, as py3.12 wheels in .whl/ (26 MB)
# Then on the GPU machine (no network; its python3 has torch, timm, pandas, sklearn, opencv, ...):
#   OUT=/some/folder benchmarks/gpu_full_run.sh
# Results: $OUT/gpu_results.json (machine, per task: wall time, images/s, test metrics) and $OUT/gpu_run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_run.log") 2>&1
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ichflow-site .whl/*.whl \
  || { echo "error: .whl/: installing the carried wheels failed"; exit 2; }
export PYTHONPATH=/tmp/ichflow-site:$PWD/src
DATA=${DATA:-/tmp/phe-half}
python3 benchmarks/gpu_pack_phe.py unpack --pack .gpu/phe_half.tar.xz --dest "$DATA" || { echo "error: .gpu/phe_half.tar.xz: unpacking failed"; exit 2; }
export ICHFLOW_WORK_DIR=${ICHFLOW_WORK_DIR:-/tmp/ichflow-work}
mkdir -p "$ICHFLOW_WORK_DIR"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$ICHFLOW_WORK_DIR/mlflow.db}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "setup: $(( $(date +%s) - t0 )) s"
status=0
# each task in its own process with its own deadline, so one failure or hang costs only its own result
for item in segmentation:170 classification:130 detection:200; do
  task=${item%%:*}
  ts=$(date +%s)
  timeout "${item##*:}" python3 benchmarks/gpu_full_run.py --task "$task" --data "$DATA" --out "$OUT" || status=1
  echo "== $task: $(( $(date +%s) - ts )) s"
done
echo "total: $(( $(date +%s) - t0 )) s"
exit $status
