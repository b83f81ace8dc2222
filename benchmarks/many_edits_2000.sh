#!/bin/bash
# Issue #14's lifelong comparison: 2,000 known CounterFact edits in rounds of 100, every edit
# measured after the last round, a curve point every 2 rounds, the general block on by default.
#     CORE=0 bash benchmarks/many_edits_2000.sh alphaedit     # also: ft-l, memit, rome,
#                                                             # alphaedit-mpes(-wiki)
# alphaedit-mpes: AlphaEdit with ENCORE's most-probable early stopping of z (MPES);
# alphaedit-mpes-wiki: MPES and C (hence the null space) from 131k tokens of WikiText-2
# validation instead of self-sampled text.
# Resumable: rerun the same line and it continues from the last finished round
# (runs/many/<name>-2000/lifelong). Pinned to core ${CORE:-0}, niced.
set -e
cd "$(dirname "$0")/.."
name=${1:?usage: many_edits_2000.sh alphaedit|alphaedit-mpes|alphaedit-mpes-wiki|ft-l|memit|rome}
case $name in
  alphaedit) args="--method alphaedit" ;;
  alphaedit-mpes) args="--method alphaedit --set early_stop_argmax=true" ;;
  alphaedit-mpes-wiki) args="--method alphaedit --set early_stop_argmax=true
    --set mom2_corpus=../shared/data/wikitext/wiki.valid.raw --set mom2_n_tokens=131072" ;;
  ft-l) args="--method ft --set objective=prompt_last" ;;  # the 100-edit FT-L row's setting
  memit) args="--method memit" ;;
  rome) args="--method rome" ;;
  *) echo "unknown method $name" >&2; exit 2 ;;
esac
out=runs/many/$name-2000
resume=""; [ -d "$out" ] && resume="--resume"
exec taskset -c "${CORE:-0}" nice -n 10 .venv/bin/python -m jaxedit eval $args \
  --data ../shared/data/counterfact/counterfact-edit.json --n 2960 --known-only --max-cases 2000 \
  --mode sequential --batch-size 100 --every 2 --no-progress --out "$out" $resume
