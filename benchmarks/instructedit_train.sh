#!/bin/bash
# Issue #16's editors: InstructEdit on CounterFact + zsRE (default and varied instructions), the
# same tasks without instructions, and one MEND editor per task — one preset
# (smollm2-135m-instructedit), the same seed and steps — then
# benchmarks/instructedit.py on the held-out cases (KnowEdit: unseen; also through CounterFact's
# instruction). Sequential and resumable (rerun continues); pinned to core ${CORE:-1}.
#     CORE=1 STEPS=300 bash benchmarks/instructedit_train.sh
set -e
cd "$(dirname "$0")/.."
D=../shared/data
CF=$D/counterfact/counterfact-train.json
ZS=$D/zsre/zsre_mend_train-1k.json
STEPS=${STEPS:-300}
PY="taskset -c ${CORE:-1} nice -n 5 .venv/bin/python"
LOG=runs/instructedit
mkdir -p $LOG
COMMON="--hparams smollm2-135m-instructedit --steps $STEPS --val-every 100 --val-size 32 --patience 100 --resume --no-progress --json"
train() {  # name, args...
  local name=$1; shift
  echo "== $name $(date +%T)" >> $LOG/times.log
  /usr/bin/time -f "$name wall %e s" -a -o $LOG/times.log \
    $PY -m jaxedit mend-train "$@" $COMMON --out editors/$name > $LOG/$name.json
}
train ie-cf-zsre --data $CF,$ZS --instructions default
train mend-cf --data $CF
train mend-zsre --data $ZS
train mt-cf-zsre --data $CF,$ZS
train ie-varied-cf-zsre --data $CF,$ZS --instructions varied   # four training descriptions per task
$PY benchmarks/instructedit.py \
  --editor instructedit=editors/ie-cf-zsre --editor multitask=editors/mt-cf-zsre \
  --editor mend-cf=editors/mend-cf:counterfact --editor mend-zsre=editors/mend-zsre:zsre \
  --editor ie-as-cf=editors/ie-cf-zsre:knowedit@counterfact \
  --editor ie-varied=editors/ie-varied-cf-zsre
