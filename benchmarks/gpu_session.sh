#!/usr/bin/env bash
# The GPU checks of issue 13 as one prepared run, for a lent GPU machine
# (one H200; nothing can be fetched there, and its python3 holds torch,
# numba, scipy and pyarrow but not dask).
#
# Here, once, fetch the pure-Python wheels the cluster test needs into an
# ignored folder:
#
#   echo /.wheels/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .wheels \
#       dask distributed partd locket zict tblib tornado
#
# then run it there, carrying that folder, within one command's 10 minutes:
#
#   device run: command "bash benchmarks/gpu_session.sh", carry [".wheels"], timeout_s 590
#
# Each step has its own time limit, so a slow step cannot take the rest with
# it; logs and the benchmark's json come back under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
OUT="${OUT:-/tmp/allknn-gpu}"
mkdir -p "$OUT"

step() {  # step SECONDS NAME COMMAND...: run a command with a limit, its log in $OUT/NAME.log
  local limit=$1 name=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
  echo "== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'numba', numba.__version__, \
'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
if compgen -G ".wheels/*.whl" > /dev/null; then
  python3 -m pip install --no-index --no-deps -q .wheels/*.whl 2>&1 | tail -3
fi

step 200 cuda-tests python3 -m pytest -q -p no:cacheprovider -m cuda -rs tests/engines/test_torch.py
step 120 cluster-cuda-tests python3 -m pytest -q -p no:cacheprovider -rs tests/engines/test_dask.py \
  -k "cuda_workers or torch_device or sharing_a_gpu"
step 240 bench-1m-768 python3 benchmarks/bench_gpu.py --n 1000000 --d 768 --k 10 --repeats 2
cp benchmarks/results/gpu-*.json "$OUT"/ 2>/dev/null || true
