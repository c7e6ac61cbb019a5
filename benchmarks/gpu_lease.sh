#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: the GPU tests, then benchmarks/gpu.py.
#
# That machine holds torch, numpy, pandas, pyarrow and scikit-learn but not
# Prefect or MLflow, and cannot reach a package index: what it lacks travels as
# wheels in .whl/ (docs/benchmarks.md says how to fetch them), and the real
# weatherAUS file as .gpudata/weatherAUS.csv.gz. Everything it writes goes to
# $OUT (default /tmp/latentflow-gpu): the test log, gpu.json, the profile.
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/latentflow-gpu}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/latentflow-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/latentflow-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
weather=/tmp/latentflow-weatherAUS.csv
if [ -f .gpudata/weatherAUS.csv.gz ]; then
    gunzip -c .gpudata/weatherAUS.csv.gz > "$weather"
else
    weather=../shared/data/weatherAUS.csv
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
    2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, prefect, mlflow; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'prefect', prefect.__version__,
'mlflow', mlflow.__version__)" 2>&1 | tee "$OUT/versions.txt"
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gpu.py tests/test_estimator.py > "$OUT/pytest.log" 2>&1
echo "gpu tests: exit $?"; tail -5 "$OUT/pytest.log"
"$PY" -m benchmarks.gpu --weather "$weather" --out "$OUT/gpu.json" \
    --profile "$OUT/score-profile.txt" "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -v "^\[gpu-bench\]"
