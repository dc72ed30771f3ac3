#!/usr/bin/env bash
# vitkit's set-up, in one command: the system packages the tests and the offline data sets use
# (Debian's Chromium + ChromeDriver for the web-page test, dataset-fashion-mnist for Fashion-MNIST),
# a virtual environment in .venv, PyTorch, and vitkit with its dev extra. Run it again at will.
set -euo pipefail
cd "$(dirname "$0")"
need=()
command -v chromedriver >/dev/null || need+=(chromium chromium-driver)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install torch==2.14.1 torchvision==0.29.1   # or any torch>=2.4 with its torchvision
pip install -e ".[dev]"                         # the dev extra: pytest, and timm/transformers as test references
