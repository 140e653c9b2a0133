#!/bin/bash
# One device call (session 27): a CUDA run of the sample data beside the simulation of 8000
# training scenes (seed 13), then ONE fine-tune of the shipped stage 10 with peak proposals in
# training, the whole GPU to itself. Sizes come from the environment so it smoke-tests on a CPU.
# It ran as .devrun/gpu19.sh (an ignored folder carried to the device) beside device_sim19.py as
# .devrun/sim19.py and the validation cache .devrun/val_1_100.npz (validation seed 1, 100 scenes).
set -u
export PYTHONUNBUFFERED=1
N_TRAIN=${N_TRAIN:-8000}; MINUTES=${MINUTES:-9}; WORKERS=${WORKERS:-15}; BATCH=${BATCH:-32}; LR=${LR:-1.5e-4}
PY=${PY:-python3}
LOG=$OUT/log.txt
t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 )) s: $*" >> $LOG; }
if [ -d .whl ] && [ "${SKIP_WHEELS:-0}" = 0 ]; then
  mkdir -p /tmp/site; for w in .whl/*.whl; do $PY -m zipfile -e "$w" /tmp/site; done
  export PYTHONPATH=/tmp/site:$PWD
fi
stamp start
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; $PY -c "import torch, torchvision, galsim; print(torch.__version__, torchvision.__version__, galsim.__version__, torch.cuda.is_available())"; } >> $LOG 2>&1
DEV=cuda; $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || DEV=cpu
if [ "${SAMPLE:-1}" = 1 ]; then
  ( { time timeout 150 $PY -m deblend.cli run data/ -o /tmp/sample_out --overwrite --device $DEV; } > $OUT/sample.log 2>&1;
    ls /tmp/sample_out >> $OUT/sample.log 2>&1 ) &
fi
stamp simulate
mkdir -p /tmp/w /tmp/ck /tmp/cache; cp .devrun/val_1_100.npz /tmp/cache/
timeout 240 $PY .devrun/sim19.py $N_TRAIN $WORKERS >> $LOG 2>&1
ls -la /tmp/cache >> $LOG
wait
# Finish by END_S seconds after the start, allowing 45 s to start and save.
END_S=${END_S:-575}; left=$(( END_S - ($(date +%s) - t0) - 45 ))
MINUTES=$($PY -c "print(round(max(0.2, min($MINUTES, $left / 60)), 2))")
stamp "train for $MINUTES min"
OMP_NUM_THREADS=8 timeout $($PY -c "print(int($MINUTES * 60 + 60))") $PY pipelines/train_mask_rcnn.py \
  --init-from deblend/weights/mask_rcnn_small.pt --n-train $N_TRAIN --train-seed 13 \
  --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 --blend-fraction 0.35,0.85 --density 60,400 \
  --train-peak-proposals --batch-size $BATCH --lr $LR --steps 100000 --max-minutes $MINUTES --workers 2 \
  --cache /tmp/cache --checkpoints /tmp/ck/gpu19 --out /tmp/w/stage14g.pt > $OUT/train.log 2>&1
stamp "trained rc $?"
cp /tmp/w/stage14g.pt /tmp/w/stage14g.json $OUT/ 2>> $LOG
nvidia-smi --query-gpu=name,memory.used --format=csv >> $LOG 2>&1
stamp end
