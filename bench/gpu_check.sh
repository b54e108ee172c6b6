#!/usr/bin/env bash
# Issue 23's GPU measurements in one call of at most 7 minutes: the before rows (the code at a base
# commit, one process) and the after rows (this tree, one process) of bench/train_step.py on the
# same machine, so machine drift cannot fake a gain.
#
#   bash bench/gpu_check.sh --prepare [BASE]   # here, once: .before/ = the code at BASE (default
#                                              # main), and .whl/ via ../shared/gpu/fetch-wheels.sh
#   bash bench/gpu_check.sh                    # on the GPU machine (carry .whl and .before)
#   bash bench/gpu_check.sh --dry-cpu          # the same commands at tiny sizes on this CPU (tests)
#
# Rows, bf16_trunk, iLCT, 256 px, ZeRO-2, one process (bench/RESULTS.md has the earlier ones):
#   before: DiT-XL/2 batch 128 eager and compiled, DiT-B/2 batch 256 eager
#   after (optim.fused=true; NsLN fused on CUDA, EMA and step sync changes always on): the same
#     rows plus DiT-B/2 compiled, then at B/2's width and depth (the ratios run on the first
#     arch) the PixArt block stack eager and compiled and EDM on the same architecture (NsLN and
#     dropout of the iLCT run); every row
#     reports the split of the step, MFU against the sheet and the measured matmul peak, and
#     (CUDA) the host syncs of one step by source line.
# Output: $OUT/<device>_<date>/ when $OUT is set (the device tool brings it back), else
# bench/results/<device>_<date>/; copy it there and write bench/RESULTS.md from it.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  --prepare)
    base=${2:-main}
    rm -rf .before && mkdir .before
    git archive "$base" | tar -x -C .before
    grep -qx '/.before/' .git/info/exclude 2>/dev/null || echo '/.before/' >> "$(git rev-parse --git-path info/exclude)"
    git rev-parse "$base" > .before/BASE_COMMIT
    [ -d .whl ] || bash ../shared/gpu/fetch-wheels.sh
    echo "prepared .before ($(cat .before/BASE_COMMIT)) and .whl: run with carry [\".whl\", \".before\"]"
    exit 0 ;;
  --dry-cpu) mode=cpu ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--prepare [BASE] | --dry-cpu]" >&2; exit 2 ;;
esac

if [ "$mode" = gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  PY=python3
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '_' | sed 's/_$//' | tr 'A-Z' 'a-z')
  # Per process: the before rows get 150 s, the after rows 255 s (compiles included); a process
  # stopped at its limit keeps the rows it finished (written after each row), most important first.
  before_limit=150 after_limit=255
  sizes=(--batch 128 256) sizes_after=(--batch 256 128)
  common=(--warmup 3 --steps 10 --workers 8 --work /tmp/bw)
else
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  PY=${PYTHON:-python}
  device=cpu
  before_limit=900 after_limit=900
  sizes=(--tiny --batch 8 8) sizes_after=(--tiny --batch 8 8)
  common=(--warmup 1 --steps 2 --work "${WORK:-$(mktemp -d)}")
fi
out=${OUT_DIR:-${OUT:+$OUT/${device}_$(date -u +%Y-%m-%d)}}
out=${out:-bench/results/${device}_$(date -u +%Y-%m-%d)}
mkdir -p "$out"
before_root=.before
if [ ! -f .before/bench/train_step.py ]; then
  [ "$mode" = gpu ] && { echo "no .before/: run 'bash bench/gpu_check.sh --prepare' here and carry .before" >&2; exit 2; }
  before_root=  # dry run without a snapshot: the before rows are main's code, nothing of ours to try
fi
{
  echo "mode $mode, device $device, $(date -u +%FT%TZ)"
  echo "after: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "before: ${before_root:-none} $(cat "${before_root:-.}/BASE_COMMIT" 2>/dev/null || echo '(no snapshot)')"
  [ "$mode" = gpu ] && nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, deepspeed, diffusers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__)" 2>/dev/null
} > "$out/env.txt"
cat "$out/env.txt"

t0=$(date +%s)
status=0
if [ -n "$before_root" ]; then
  echo "== before rows ($before_root)"
  (cd "$before_root" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$before_limit" \
     $PY bench/train_step.py --arch DiT-XL/2 DiT-B/2 "${sizes[@]}" --compile DiT-XL/2 "${common[@]}" \
     --out "$OLDPWD/$out/before") 2>&1 | tee "$out/before.log" | grep -E '^\||^==|rror' || status=1
else
  echo "== no .before snapshot: before rows skipped (dry run)"
fi
echo "== after rows (this tree), $(( $(date +%s) - t0 )) s so far"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$after_limit" \
  $PY bench/train_step.py --arch DiT-B/2 DiT-XL/2 "${sizes_after[@]}" --compile DiT-B/2 DiT-XL/2 "${common[@]}" \
  --set optim.fused=true \
  --ratios --variants pixart_block pixart_block_compiled edm_objective --out "$out/after" \
  2>&1 | tee "$out/after.log" | grep -E '^\||^==|rror' || status=1
echo "== done in $(( $(date +%s) - t0 )) s; raw output in $out"
for side in before after; do
  [ -f "$out/$side/train_step.md" ] && { echo "-- $side"; cat "$out/$side/train_step.md"; }
done
exit $status
