#!/usr/bin/env bash
# The GPU check: one script for an H100 or H200 machine (its stage time limits add
# up to 8 min 40 s: 240 + 70 + 40 + 80 + 90), most wanted figures first:
#
#   1. the train-step benchmark at 512x512, float32 and bfloat16 (batch 8 by default);
#   2. the forward-only benchmark at 512x512 (batch 32), bfloat16 and float32;
#   3. `python -m scoat_jax.predict` on a 300-slice 512x512 phantom scan, timed;
#   4. the GPU-relevant tests (model, conv, losses, schedule, data parallel).
#
# Compiling the full-size train step takes 60-190 s on an H200 (benchmarks/README.md),
# so by default it runs batch 8; SCOAT_CHECK_BATCHES=8,16,32 asks for the grid.
# SCOAT_CHECK_XLA_FLAGS is passed as XLA_FLAGS to the benchmarks (e.g.
# --xla_gpu_autotune_level=0, to see what the compile time is made of).
#
# $OUT receives summary.txt, the two benchmarks' JSON lines (*.jsonl) and logs.tgz
# (every log, refreshed after each step, so a run cut off by its limit still leaves
# what finished). A step that fails or runs out of its time slot is recorded in
# summary.txt and the next one runs. The packages beyond jax, flax, optax, orbax,
# absl, scipy and matplotlib are installed from wheels in .whl/ when present.
#
# Tried end to end on a CPU with tiny sizes:
#   OUT=/tmp/check SCOAT_CHECK_TINY=1 SCOAT_CHECK_TIME_SCALE=4 bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/scoat_device_check}
WORK=$(mktemp -d /tmp/scoat_check.XXXXXX)   # logs and the scan; only a digest goes to $OUT
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "${SCOAT_CHECK_TINY:-0}" = 1 ]; then
  SIZE=64; BATCHES=2,4; WIDTHS=4,8,16,32,64; SCAN=8,64,64; PBATCH=4; WORKERS=2
else
  SIZE=512; BATCHES=${SCOAT_CHECK_BATCHES:-8}; WIDTHS=32,64,128,256,512; SCAN=300,512,512; PBATCH=32
  WORKERS=8
fi
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
bundle() { tar czf "$OUT/logs.tgz" -C "$WORK" --exclude=vol . 2>/dev/null; }
SCALE=${SCOAT_CHECK_TIME_SCALE:-1}   # multiplies every time limit (a CPU trial needs ~4)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record the outcome
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log"
  summary "$name: exit $? in $(( $(date +%s) - t0 )) s (limit $limit s)"
  bundle
}

: >"$OUT/summary.txt"
nvidia-smi >"$WORK/nvidia_smi.txt" 2>&1 || echo "no nvidia-smi" >"$WORK/nvidia_smi.txt"
summary "jax: $($PY -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tail -1)"

BENCH_ENV=(env XLA_FLAGS="${SCOAT_CHECK_XLA_FLAGS:-${XLA_FLAGS:-}}")
step train_step 240 "${BENCH_ENV[@]}" $PY benchmarks/train_step.py --size=$SIZE --batch=$BATCHES \
    --widths=$WIDTHS --dtype=float32,bfloat16 --repeats=5 --json
cp "$WORK/train_step.out" "$OUT/train_step.jsonl"
step predict_bench 70 "${BENCH_ENV[@]}" $PY benchmarks/predict.py --size=$SIZE --batch=$PBATCH \
    --widths=$WIDTHS --dtype=bfloat16,float32 --repeats=5 --json
cp "$WORK/predict_bench.out" "$OUT/predict_bench.jsonl"

# A whole scan through the CLI: an untrained full-size checkpoint (speed does
# not depend on the weights; initialised on the CPU, where it takes seconds rather
# than a GPU compile) and a phantom scan written as NIfTI.
step volume_setup 40 $PY - "$WORK/vol" "$SCAN" "$WIDTHS" "$SIZE" <<'EOF'
import json, pathlib, sys, time, types
import jax, jax.numpy as jnp, numpy as np
from scoat_jax import checkpoints, models
from scoat_jax.configs import default
from scoat_jax.data import phantom
root, scan, widths, size = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
shape = tuple(int(s) for s in scan.split(","))
c = default.get_config()
c.model.widths, c.data.image_size = tuple(int(w) for w in widths.split(",")), size
model = models.create_model(c)
with jax.default_device(jax.devices("cpu")[0]):
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 1)), train=False),
                      compiler_options={"xla_backend_optimization_level": 0})(jax.random.key(0))
for dtype in ("float32", "bfloat16"):  # parameters stay float32; the config sets the compute
  c.dtype = dtype
  work = root / f"ckpt_{dtype}"
  work.mkdir(parents=True)
  (work / "config.json").write_text(json.dumps(checkpoints.config_to_dict(c)))
  state = types.SimpleNamespace(step=np.int32(1), params=variables["params"], opt_state={},
                                batch_stats=variables["batch_stats"])
  checkpoints.save(checkpoints.make_manager(work), state,
                   meta={"config": checkpoints.config_to_dict(c), "step": 1},
                   metrics={checkpoints.BEST_METRIC: 0.0})
t = time.time()
s = phantom.generate_scan(0, 0, 1, shape=shape)
(root / "scan").mkdir()
paths = phantom.write_scan(s, root / "scan", fmt="nifti")
print(json.dumps({"scan": str(paths["image"]), "shape": shape, "generate_s": time.time() - t}))
EOF
TIME_V=(); [ -x /usr/bin/time ] && TIME_V=(/usr/bin/time -v)   # peak RSS, where installed
SCAN_FILE=$($PY -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["scan"])' \
    "$WORK/volume_setup.out" 2>/dev/null)
for dtype in ${SCOAT_CHECK_VOLUME_DTYPES:-bfloat16}; do
  step "predict_volume_$dtype" 80 "${TIME_V[@]}" $PY -m scoat_jax.predict \
      --checkpoint="$WORK/vol/ckpt_$dtype" --input="$SCAN_FILE" \
      --output="$WORK/vol/out_$dtype" --batch_size=$PBATCH
  # The report (per-stage seconds, volumes) is small; the masks stay behind.
  find "$WORK/vol/out_$dtype" -name '*.json' -exec cp {} "$WORK/report_$dtype.json" \; 2>/dev/null
done
bundle
rm -rf "$WORK/vol"

# conftest.py defaults JAX_PLATFORMS to cpu; empty means "best available" (the GPU).
# 144 tests; one at a time they compile too slowly on a GPU (23 in 60 s), so eight
# workers share it, each allocating as it goes instead of taking 75% up front.
step tests 90 env JAX_PLATFORMS= XLA_PYTHON_CLIENT_PREALLOCATE=false \
    $PY -m pytest -q -x -n $WORKERS -p no:cacheprovider tests/test_models.py tests/test_conv.py \
    tests/test_losses.py tests/test_schedule.py tests/test_data_parallel.py
rm -rf "$WORK"
summary "done"
