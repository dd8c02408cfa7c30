#!/usr/bin/env bash
# One GPU, under 8 minutes: versions, `pytest -m cuda`, GPTQ timings (per width / prepared once / widths stacked),
# a data folder made on the machine (no network), the golf preset trained for 60 s, GPTQ compress with model,
# Hessians and quantizers on CUDA, then sliding + mixer + TTT eval on CUDA; each stage's wall time at the end
# (also in $CHECK_OUT/stages.tsv).
#
#   bash benchmarks/gpu/check.sh                 # on the GPU machine, from the repository root
#   CHECK_DRY=1 bash benchmarks/gpu/check.sh     # the same stages on the CPU with cpu-smoke and a few steps
#
# Settings (environment): CHECK_OUT (default runs/gpu-check, or $OUT/gpu-check when OUT is set), PYTHON (default
# python3), CHECK_TRAIN_SECONDS (60), CHECK_BUDGET (16MB), CHECK_EVAL_TOKENS (32768), CHECK_COMPILE (false:
# torch.compile would spend part of the 60 s compiling), CHECK_WHEELS (.whl: wheels of packages missing there,
# made here by benchmarks/gpu/fetch_wheels.sh).
set -uo pipefail

cd "$(dirname "$0")/../.."
REPO=$PWD
PY=${PYTHON:-python3}
DRY=${CHECK_DRY:-0}
if [ -n "${OUT:-}" ]; then DEFAULT_OUT=$OUT/gpu-check; else DEFAULT_OUT=runs/gpu-check; fi
WORK=${CHECK_OUT:-$DEFAULT_OUT}
WHEELS=${CHECK_WHEELS:-.whl}
rm -rf "$WORK"
mkdir -p "$WORK"
STAGES=$WORK/stages.tsv
: >"$STAGES"
FAILED=0

now() { date +%s.%N; }

# stage NAME COMMAND...: run it, log to $WORK/NAME.log (and the terminal), record its wall time and exit code.
stage() {
  local name=$1
  shift
  echo "=== $name: $*"
  local t0 t1 rc
  t0=$(now)
  # Not a pipeline: the command runs in this shell, so what `setup` exports stays set for later stages.
  "$@" > >(tee "$WORK/$name.log") 2>&1
  rc=$?
  t1=$(now)
  printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')" "$rc" >>"$STAGES"
  if [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED (exit $rc)"
    FAILED=1
  fi
  return "$rc"
}

summary() {
  echo
  echo "stage            seconds  exit"
  echo "---------------  -------  ----"
  awk -F'\t' '{printf "%-15s  %7.1f  %4s\n", $1, $2, $3; s += $2} END {printf "%-15s  %7.1f\n", "total", s}' "$STAGES"
  [ "$FAILED" -eq 0 ] && echo "gpu check: all stages passed" || echo "gpu check: some stages FAILED"
}
trap summary EXIT

export PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# Packages the GPU image lacks come as wheels. qpack runs from this checkout (PYTHONPATH); arch "gpt" is built in
# (qpack.models.gpt), so no package metadata is needed.
SITE=/tmp/qpack-site
setup() {
  mkdir -p "$SITE"
  export PYTHONPATH=$PYTHONPATH:$SITE
  if ! "$PY" -c "import zstandard, brotli, constriction" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      echo "missing zstandard/brotli/constriction and no wheels in $WHEELS (make them with benchmarks/gpu/fetch_wheels.sh)"
      return 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || return 2
  fi
  "$PY" -c "import qpack; from qpack.models import model_names; print('qpack', qpack.__version__, 'from', qpack.__file__, 'models', model_names())"
}

# When training fails, a randomly initialised checkpoint of the preset's shape still lets compress and eval check
# their device paths (the train stage stays marked FAILED).
random_ckpt() {
  "$PY" - "$1" "$2" <<'EOF'
import sys, torch
from qpack.models.gpt import build_from_config
from trainers.gpt.presets import preset_config
cfg = preset_config(sys.argv[2])
torch.manual_seed(0)
model = build_from_config(cfg.model.to_dict())
torch.save({"model": model.state_dict(), "config": cfg.model.to_dict(), "seq_len": cfg.seq_len}, sys.argv[1])
print(f"random {sys.argv[2]} checkpoint: {sum(p.numel() for p in model.parameters()):,} parameters")
EOF
}

versions() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
for name in ("numpy", "sentencepiece", "zstandard", "brotli", "constriction", "flash_attn", "triton"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except ImportError:
        print(name, "not installed")
EOF
}

# A data folder without the network: text that ships with Python (pydoc topics, standard-library sources) as a
# .jsonl corpus, then the ordinary `qpack data build --corpus` (tokenizer + golf shards + manifest).
make_data() {
  "$PY" - "$WORK/corpus.jsonl" "$1" <<'EOF'
import json, sys
from qpack.data.corpus import python_corpus
docs = python_corpus(int(sys.argv[2])).docs
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for d in docs:
        f.write(json.dumps({"text": d.text}) + "\n")
print(f"corpus: {len(docs)} documents, {sum(len(d.text.encode()) for d in docs):,} bytes")
EOF
  [ $? -eq 0 ] || return 2
  "$PY" -m qpack.cli data build --corpus "$WORK/corpus.jsonl" --out "$WORK/data"
}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  PRESET=cpu-smoke
  TRAIN_ARGS=(--max_steps=5 --max_seconds=0 --val_every=0 --val_tokens=4096 --ckpt_every=0 --log_every=1)
  CORPUS_BYTES=2000000
  EVAL_TOKENS=${CHECK_EVAL_TOKENS:-2048}
  BUDGET=${CHECK_BUDGET:-350KB}
  CALIB_TOKENS=2048
  SPEED_REPEAT=1
  SPEED_DIV=4
  PYTEST_MARK=cuda  # skipped without a GPU: checks that the tests collect
else
  DEVICE=cuda
  PRESET=golf
  TRAIN_ARGS=(--max_seconds="${CHECK_TRAIN_SECONDS:-60}" --compile="${CHECK_COMPILE:-false}" --val_tokens=262144
              --ckpt_every=0)
  CORPUS_BYTES=12000000
  EVAL_TOKENS=${CHECK_EVAL_TOKENS:-32768}
  BUDGET=${CHECK_BUDGET:-16MB}
  CALIB_TOKENS=16384
  SPEED_REPEAT=3
  SPEED_DIV=1
  PYTEST_MARK=cuda
fi

stage setup setup || exit 2
stage versions versions
# tests/test_cuda.py and any other test file that marks tests `cuda`
mapfile -t CUDA_TESTS < <(grep -l "mark.cuda" tests/test_*.py)
stage pytest_cuda "$PY" -m pytest -q -m "$PYTEST_MARK" -p no:cacheprovider "${CUDA_TESTS[@]}"
gptq_speed() {  # the golf MLP's two shapes (fc: 1024x512, proj: 512x1024) scaled by $1
  "$PY" benchmarks/gpu/gptq_speed.py --device "$DEVICE" --rows $((1024 / $1)) --cols $((512 / $1)) --repeat "$2" &&
    "$PY" benchmarks/gpu/gptq_speed.py --device "$DEVICE" --rows $((512 / $1)) --cols $((1024 / $1)) --repeat "$2"
}
stage gptq_speed gptq_speed "$SPEED_DIV" "$SPEED_REPEAT"
stage data make_data "$CORPUS_BYTES" || exit 2
stage train "$PY" -m qpack.cli train --preset "$PRESET" --data "$WORK/data" --out "$WORK/run" "${TRAIN_ARGS[@]}" \
  || { mkdir -p "$WORK/run" && stage random_ckpt random_ckpt "$WORK/run/final.pt" "$PRESET"; } || exit 2
stage compress "$PY" benchmarks/gpu/compress_device.py "$WORK/run/final.pt" --calib "$WORK/data" \
  --calib-tokens "$CALIB_TOKENS" --budget "$BUDGET" -o "$WORK/model.qpk" --device "$DEVICE" \
  --json "$WORK/compress.json" || exit 2
stage eval "$PY" -m qpack.cli eval "$WORK/model.qpk" --data "$WORK/data" --device "$DEVICE" --mixer --ttt \
  --max-tokens "$EVAL_TOKENS"
exit $FAILED
