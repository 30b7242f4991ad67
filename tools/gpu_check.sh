#!/usr/bin/env bash
# One prepared check for a CUDA machine, about 10 minutes at most, everything written to files.
#
#   OUT=gpu-check tools/gpu_check.sh            # or: the device tool's $OUT
#
# 1. machine.txt       nvidia-smi, torch and CUDA versions
# 2. cuda-tests.txt    the CUDA tests (training and resume on the GPU), which skip on a CPU machine
# 3. bench.txt         training throughput, FISOR/BC/BCQ-Lag at every preset, cuda beside cpu
#                      (compare FISOR `paper` it/s with the official JAX code's ~370 it/s on an
#                      RTX 3090, docs/algorithms.md)
# 4. paper-run/        a short FISOR `paper`-preset run (2000 iterations, evaluation every 1000)
#                      on a synthetic BallCircle dataset (the collected datasets are not in git)
# Each step has its own time limit; a failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export DSRL_SUPPRESS_IMPORT_ERROR=1 MPLBACKEND=Agg
status() { echo "$1: exit $2" | tee -a "$OUT/status.txt"; }

{ nvidia-smi; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'; } \
    > "$OUT/machine.txt" 2>&1
status machine $?

timeout 180 "$PY" -m pytest -q -p no:cacheprovider test/test_train.py -k cuda -rs \
    > "$OUT/cuda-tests.txt" 2>&1
status cuda-tests $?

timeout 180 "$PY" bench/bench_training.py --device all --seconds 8 > "$OUT/bench.txt" 2>&1
status bench $?

timeout 240 "$PY" - "$OUT" <<'PYEOF' > "$OUT/paper-run.txt" 2>&1
import sys
from pathlib import Path

from offline_training.data.dataset import write_dataset
from offline_training.data.synthetic import synthetic_dataset
from offline_training.train import train

out = Path(sys.argv[1])
data_file = out / 'synthetic-BallCircle.hdf5'
write_dataset(data_file, synthetic_dataset('BallCircle', episodes=200, seed=0), 'BallCircle')
run = train('fisor', 'BallCircle', preset='paper', seed=0, dataset=str(data_file), steps=2000,
            out=out / 'paper-run', device='cuda', log_every=100, checkpoint_every=1000,
            eval_every=1000, eval_episodes=2, progress=False)
print((run / 'summary.yaml').read_text())
PYEOF
status paper-run $?
rm -f "$OUT/synthetic-BallCircle.hdf5"
echo "wrote $OUT/"
