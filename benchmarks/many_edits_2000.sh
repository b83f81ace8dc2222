#!/bin/bash
# Issue #14's lifelong comparison: 2,000 known CounterFact edits in rounds of 100, every edit
# measured after the last round, a curve point every 2 rounds, the general block on by default.
#     CORE=0 bash benchmarks/many_edits_2000.sh alphaedit     # also: ft-l, memit, rome,
#                                                             # alphaedit-mpes(-wiki)
# alphaedit-mpes: AlphaEdit with ENCORE's most-probable early stopping of z (MPES);
# alphaedit-mpes-wiki: MPES and C (hence the null space) from 131k tokens of WikiText-2
# validation instead of self-sampled text; -ns5e-3: and a null-space threshold of 5e-3 instead
# of 2e-2 (the null space then holds 2-8 % of the keys' energy instead of 38-59 %), -ns1e-2: 1e-2
# (14-30 %); -np10: norm_penalty 10 (the accumulated change since W0 is penalised too);
# -l2-9: the residual spread over layers 2-9 instead of the preset's 2-5 (twice the key
# directions to write into, half of each z's residual per layer); -ridge1: L2 = 1 instead of the
# paper's 10 (this model's keys are small: with L2 = 10 layers 2-4 write a fraction of their
# share of the residual and the last layer takes the rest); -joint: one solve over layers 2-5
# for the sum of their writes, preserving the earlier edits' summed writes (`joint`);
# -joint-l2-9: the same over layers 2-9.
# Resumable: rerun the same line and it continues from the last finished round
# (runs/many/<name>-2000/lifelong), on the same machine: run directories do not survive a new one.
# Pinned to core(s) ${CORE:-0} (e.g. CORE=0,1), niced; EVERY=k: a curve point every k rounds;
# EXTRA="..." adds eval flags (--known-facts-unfiltered: the known-facts measure of the runs
# before that filter, to compare with them).
set -e
cd "$(dirname "$0")/.."
name=${1:?usage: many_edits_2000.sh alphaedit|alphaedit-mpes|alphaedit-mpes-wiki(-ns5e-3|-ns1e-2|-np10|-l2-9|-ridge1|-joint|-joint-l2-9)|ft-l|memit|rome}
mpes="--method alphaedit --set early_stop_argmax=true"
wiki="$mpes --set mom2_corpus=../shared/data/wikitext/wiki.valid.raw --set mom2_n_tokens=131072"
l29="--set layers=[2,3,4,5,6,7,8,9]"
case $name in
  alphaedit) args="--method alphaedit" ;;
  alphaedit-mpes) args="$mpes" ;;
  alphaedit-mpes-wiki) args="$wiki" ;;
  alphaedit-mpes-wiki-ns5e-3) args="$wiki --set nullspace_threshold=0.005" ;;
  alphaedit-mpes-wiki-ns1e-2) args="$wiki --set nullspace_threshold=0.01" ;;
  alphaedit-mpes-wiki-np10) args="$wiki --set norm_penalty=10" ;;
  alphaedit-mpes-wiki-l2-9) args="$wiki $l29" ;;
  alphaedit-mpes-wiki-ridge1) args="$wiki --set L2=1" ;;
  alphaedit-mpes-wiki-joint) args="$wiki --set joint=true" ;;
  alphaedit-mpes-wiki-joint-l2-9) args="$wiki --set joint=true $l29" ;;
  ft-l) args="--method ft --set objective=prompt_last" ;;  # the 100-edit FT-L row's setting
  memit) args="--method memit" ;;
  rome) args="--method rome" ;;
  *) echo "unknown method $name" >&2; exit 2 ;;
esac
out=runs/many/$name-2000
resume=""; [ -d "$out" ] && resume="--resume"
exec taskset -c "${CORE:-0}" nice -n 10 .venv/bin/python -m jaxedit eval $args \
  --data ../shared/data/counterfact/counterfact-edit.json --n 2960 --known-only --max-cases 2000 \
  --mode sequential --batch-size 100 --every ${EVERY:-2} --no-progress --out "$out" $resume ${EXTRA:-}
