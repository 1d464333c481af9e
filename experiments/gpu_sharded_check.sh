#!/usr/bin/env bash
# The sharded mode on an accelerator: both sharding modes timed and sized, and their
# [pipeline_hash] lines compared. From the project root:
# OUT=<folder> bash experiments/gpu_sharded_check.sh. Writes into $OUT:
#   modes.json       python -m ncf_jax.benchmark --sections=modes (both modes, bytes and
#                    samples/s per device count the machine has)
#   train_<mode>.log the MLPerf config on synthetic data in each mode, seeded
#   summary.txt      whether both modes logged identical [pipeline_hash] lines
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}; SCALE=${SCALE:-1}; EPOCHS=${EPOCHS:-2}
export PYTHONUNBUFFERED=1
if ls .device/whl/*.whl >/dev/null 2>&1; then   # the kit's wheels (ml-collections, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
timeout ${MODES_S:-240} python3 -m ncf_jax.benchmark --sections=modes --scale="$SCALE" --json \
  > "$OUT/modes.log" 2>&1; echo "modes benchmark rc=$? ${SECONDS}s" | tee "$OUT/summary.txt"
grep -E '^\{' "$OUT/modes.log" | tail -n 1 > "$OUT/modes.json"
users=$(python3 -c "print(max(200, int(138493*$SCALE)))"); items=$(python3 -c "print(max(100, int(26744*$SCALE)))")
mean=$(python3 -c "print(min(144.0, $items / 3))"); negs=$(python3 -c "print(min(999, $items // 3))")
for mode in replicated sharded; do
  SECONDS=0
  timeout ${TRAIN_S:-150} python3 -m ncf_jax.train --config=configs/mlperf.py \
    --config.dataset.name=synthetic --config.dataset.synthetic_num_users=$users \
    --config.dataset.synthetic_num_items=$items --config.dataset.synthetic_mean_interactions=$mean \
    --config.dataset.data_dir=/tmp/ncf_data --config.eval_num_neg=$negs \
    --config.num_epochs=$EPOCHS --config.hr_threshold=1.0 --config.hash_pipeline=True \
    --config.seed=0 --config.sharding=$mode --workdir=/tmp/ncf_sharded_check_$mode \
    > "$OUT/train_$mode.log" 2>&1
  echo "train $mode rc=$? ${SECONDS}s" | tee -a "$OUT/summary.txt"
  grep -hoE '\[pipeline_hash\].*' "$OUT/train_$mode.log" > "/tmp/ncf_hash_$mode.txt"
  grep -hE 'Bytes per device|Iteration' "$OUT/train_$mode.log" | tail -n 4 >> "$OUT/summary.txt"
done
if [ -s /tmp/ncf_hash_replicated.txt ] && cmp -s /tmp/ncf_hash_replicated.txt /tmp/ncf_hash_sharded.txt; then
  echo "both modes: identical pipeline hashes ($(wc -l < /tmp/ncf_hash_sharded.txt) lines)" | tee -a "$OUT/summary.txt"
else
  echo "both modes: pipeline hashes DIFFER or missing" | tee -a "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
