#!/usr/bin/env bash
# The Python packages the GPU image (python3.12 with torch/timm/pandas/sklearn/opencv...) lacks, as wheels in
# .whl/ (ignored; carried to the GPU machine). Versions = those pinned in this project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
  mlflow-skinny==3.17.2 cachetools==7.3.3 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5 \
  pyasn1_modules==0.4.2 fastapi==0.165.0 starlette==1.10.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 \
  importlib_metadata==9.1.0 opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-dotenv==1.2.4 sqlparse==0.6.1 uvicorn==0.54.0 SQLAlchemy==2.1.9 \
  alembic==1.20.1 Mako==1.4.3 ultralytics==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99 \
  segmentation_models_pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16
# sdists only on PyPI: build pure-Python wheels
python3 -m pip wheel -q --no-deps -w .whl grad-cam==1.5.7 ttach==0.0.3
du -sh .whl
