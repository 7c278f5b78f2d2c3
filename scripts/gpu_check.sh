#!/usr/bin/env bash
# Check the GPU paths in one go, on a machine with NVIDIA GPUs:
#   setup            scripts/setup_env.sh (the CUDA build of FBGEMM where nvidia-smi works)
#   cuda             nvidia-smi, torch's CUDA build, its device count and GPU names, fbgemm_gpu
#   gpu-tests        pytest -m gpu (training, batch inference and a Serve replica on GPUs)
#   bench-train      a short bench/train.py --gpu
#   bench-inference  a short bench/inference.py --gpu
# Each step runs under its own timeout; a failing step does not stop the others. After setup
# (seconds when .venv is up to date, minutes when it installs) the steps share a budget of
# GPU_CHECK_BUDGET_S seconds (480): about 8 minutes in all. Everything printed also goes to
# .bench/gpu/gpu-check-<time>.log; the last line sums up which steps passed, with the two
# benchmarks' JSON lines. Exit code: 0 when every step passed, 1 otherwise, 2 (at once, with
# one line on stderr) where there is no working nvidia-smi.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found): nothing to check" >&2
  exit 2
fi
if ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi fails): nothing to check" >&2
  exit 2
fi

PY=.venv/bin/python
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
SETUP_S=600  # a fresh install takes minutes; a pip killed half-way helps nobody
export PYTHONUNBUFFERED=1  # the benchmarks' lines reach the log as they are printed

results=()  # "name status" per step
failed=0
deadline=0

# step NAME LIMIT_S COMMAND...: run COMMAND under a timeout (capped by the budget left),
# its output shown and kept in $tmp/NAME.out; records the outcome, never stops the script.
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$deadline" -gt 0 ]; then
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 10 ]; then
      echo "== $name: skipped, the ${BUDGET_S}s budget is spent"
      results+=("$name skipped")
      failed=1
      return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$tmp/$name.out" || rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    results+=("$name ok")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    results+=("$name TIMEOUT(${limit}s)")
    failed=1
  else
    results+=("$name FAIL(rc=$rc)")
    failed=1
  fi
  echo "== $name: ${results[-1]#"$name "} in ${took}s"
}

# the cuda step's check, written to $tmp/cuda_check.py
write_cuda_check() {
  cat > "$tmp/cuda_check.py" <<'PYEOF'
import importlib.metadata as md
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
n = torch.cuda.device_count()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): "
      f"torch.cuda.device_count() = {n}")
for i in range(n):
    print(f"  cuda:{i}: {torch.cuda.get_device_name(i)}")
assert float((torch.ones(4, device="cuda") * 2).sum()) == 8.0
# distribution names as pip spells them (fbgemm_gpu-cpu -> fbgemm-gpu-cpu)
have = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
assert "fbgemm-gpu-cpu" not in have, "fbgemm-gpu-cpu (the CPU build) is installed"
assert "fbgemm-gpu" in have, "fbgemm-gpu (the CUDA build) is not installed"
import fbgemm_gpu  # noqa: F401  (the CUDA build loads only beside a driver)
version = md.version("fbgemm-gpu")
print(f"fbgemm-gpu {version} loads")
if n < 2:
    print("note: bench/train.py runs a 2-worker group, one GPU per worker; with one GPU "
          "it can wait for a second")
PYEOF
}

# the last JSON line a benchmark step printed, or "-"
json_of() {
  local line
  line=$(grep '^{' "$tmp/$1.out" 2>/dev/null | tail -n 1 || true)
  echo "${line:--}"
}

main() {
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), log: $log"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

  step setup "$SETUP_S" bash scripts/setup_env.sh
  deadline=$((SECONDS + BUDGET_S))
  write_cuda_check
  step cuda 30 "$PY" "$tmp/cuda_check.py"
  # pytest.ini's addopts say -m "not gpu": the later -m wins
  step gpu-tests 180 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider
  step bench-train 150 "$PY" bench/train.py --gpu --rows 300000 --repeats 2 --steps 30 \
    --objective-items 50000 --objective-steps 20
  step bench-inference 120 "$PY" bench/inference.py --gpu --users 50000 --items 50000 \
    --rated 5 --actors 1 --repeats 1

  local verdict="all steps passed" steps="" r
  [ "$failed" -eq 0 ] || verdict="FAILED"
  for r in "${results[@]}"; do steps+="${steps:+, }$r"; done
  echo "gpu_check: $verdict: $steps; train $(json_of bench-train);" \
    "inference $(json_of bench-inference)"
  return "$failed"
}

mkdir -p .bench/gpu
log=.bench/gpu/gpu-check-$(date -u +%Y%m%d-%H%M%S).log
rc=0
main 2>&1 | tee "$log" || rc=$?
exit "$rc"
