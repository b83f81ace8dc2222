#!/usr/bin/env bash
# Install the PyTorch *reference* (CPU build) into the project's uv venv: it is used only by the
# parity tests (skipped without it), scripts/make_goldens.py and benchmarks/forward.py.
# jaxedit itself never imports torch.
#
# The CPU wheel index avoids the multi-GB CUDA build that plain `pip install torch` pulls.
# A local wheel is preferred when present (offline machines): set TORCH_WHEEL to point at one,
# or drop it at /opt/wheels/torch-2.13.0+cpu-*.whl.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
command -v uv >/dev/null || python -m pip install uv
uv sync --inexact --quiet  # the venv first; --inexact keeps an already installed reference

wheel="${TORCH_WHEEL:-}"
if [[ -z "$wheel" ]]; then
  wheel=$(ls /opt/wheels/torch-${TORCH_VERSION}+cpu-*.whl 2>/dev/null | head -n 1 || true)
fi

if [[ -n "$wheel" && -f "$wheel" ]]; then
  echo "installing torch from local wheel $wheel"
  # torch's own dependencies (sympy, networkx, ...) come from PyPI; torch itself from the file.
  uv pip install "$wheel" accelerate
else
  echo "installing torch==${TORCH_VERSION} (CPU) from download.pytorch.org"
  uv pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match
  uv pip install accelerate
fi

uv run --no-sync python -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
