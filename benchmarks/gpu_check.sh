#!/usr/bin/env bash
# The GPU check, in one go (under 10 minutes on one GPU): the tests marked `cuda`, vitkit against
# timm in bf16 and fp32 (training and inference throughput), and Fashion-MNIST's time to 93%.
#
#   bash benchmarks/gpu_check.sh prepare   # here, with the network: wheels + Fashion-MNIST into .gpu_check/
#   bash benchmarks/gpu_check.sh [OUT]     # on the GPU machine (default OUT: gpu_check_out)
#
# `prepare` is for a GPU machine without network access: it downloads the wheels of vitkit's
# dependencies that such an image may lack (for Python 3.12) and copies the Fashion-MNIST IDX files;
# the check installs those wheels into /tmp/site when it finds them. Results: OUT/pytest.txt,
# OUT/throughput.json, OUT/fashion.json, OUT/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.gpu_check
if [ "${1:-}" = "prepare" ]; then
  mkdir -p "$cache/wheels" "$cache/fashion-mnist"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d "$cache/wheels" \
    jsonargparse docstring-parser mlxtend typeshed-client
  cp /usr/share/datasets/fashion-mnist/*.gz "$cache/fashion-mnist/"
  echo "prepared $cache (add it to .git/info/exclude and carry it to the GPU machine)"
  exit 0
fi
out=${1:-gpu_check_out}
py=${PYTHON:-python3}
if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; run it on a machine with one" >&2
  exit 2
fi
mkdir -p "$out"
if ls "$cache"/wheels/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$cache"/wheels/*.whl
  export PYTHONPATH=/tmp/site
fi
$py -c "import vitkit" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
data=fashion-mnist
[ -d "$cache/fashion-mnist" ] && data="$cache/fashion-mnist"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/summary.txt" || true
status=0
$py -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest.txt" || status=1
$py benchmarks/gpu_check.py throughput --json "$out/throughput.json" 2>&1 | tee -a "$out/summary.txt" || status=1
$py benchmarks/gpu_check.py fashion --data "$data" --budget 4m --out "$out/fashion_run" \
  --json "$out/fashion.json" 2>&1 | grep -v "^epoch " | tee -a "$out/summary.txt" || status=1
exit $status
