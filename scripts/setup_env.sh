#!/usr/bin/env bash
# Create or reuse .venv and install the pinned stack. Picks the FBGEMM build by itself:
# the CUDA build where nvidia-smi works, the CPU build elsewhere. Reruns install nothing
# unless a requirements file or the FBGEMM flavour changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if nvidia-smi >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
stamp_value="$flavour $(cat requirements.txt requirements-$flavour.txt requirements-torchrec.txt | sha256sum | cut -c1-16)"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ -f .venv/.installed ] && [ "$(cat .venv/.installed)" = "$stamp_value" ]; then
  echo "setup: .venv is up to date ($flavour build of FBGEMM)"
  exit 0
fi
echo "setup: installing the stack into .venv ($flavour build of FBGEMM); this takes a few minutes"
.venv/bin/python -m pip install --quiet --upgrade pip
# Remove the other FBGEMM build if a previous install brought it: both provide fbgemm_gpu.
other=$([ "$flavour" = gpu ] && echo fbgemm-gpu-cpu || echo fbgemm-gpu)
.venv/bin/python -m pip uninstall --quiet --yes "$other" >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -r requirements.txt -r "requirements-$flavour.txt"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-torchrec.txt
.venv/bin/python -c "import torch, torchrec, fbgemm_gpu, streaming, ray, mlflow"
echo "$stamp_value" > .venv/.installed
echo "setup: done"
