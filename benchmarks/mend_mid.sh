#!/bin/bash
# MEND at ROME's depth (issue #16): the start step size probed, a 300-step editor with the
# smollm2-135m-mid preset, then an edit_scale sweep on the 60 known CounterFact cases of the
# README's MEND tables. Resumable (each finished part is kept); writes
# benchmarks/results/mend_mid.json. Pinned to core ${CORE:-0}.
#     CORE=1 bash benchmarks/mend_mid.sh
set -e
cd "$(dirname "$0")/.."
R=runs/mend-mid
mkdir -p $R
PY="taskset -c ${CORE:-0} nice -n 5 .venv/bin/python -m jaxedit"
CF=../shared/data/counterfact
W='[["mlp_gate",3],["mlp_up",3],["mlp_out",3],["mlp_gate",4],["mlp_up",4],["mlp_out",4],["mlp_gate",5],["mlp_up",5],["mlp_out",5]]'
for ETA in 3e-5 1e-4 3e-4 1e-3; do  # 12 steps per start eta, then 32 validation cases
  [ -s $R/probe-$ETA.json ] && continue
  rm -rf $R/probe-$ETA.dir
  $PY mend-train --data $CF/counterfact-train.json --set "weights=$W" --set edit_lr=-$ETA \
    --steps 12 --val-every 12 --val-size 32 --no-progress --json --out $R/probe-$ETA.dir \
    > $R/probe-$ETA.tmp && mv $R/probe-$ETA.tmp $R/probe-$ETA.json
done
$PY mend-train --data $CF/counterfact-train.json --hparams smollm2-135m-mid --steps 300 \
  --val-every 100 --val-size 32 --patience 100 --resume --no-progress --json \
  --out editors/smollm2-135m-mid > $R/train.json
for S in 1 3 10; do
  [ -f $R/eval-s$S/results.json ] && continue
  $PY eval --method mend --set editor=editors/smollm2-135m-mid --set edit_scale=$S \
    --data $CF/counterfact-edit.json --n 240 --known-only --max-cases 60 \
    --no-general --no-progress --force --out $R/eval-s$S > $R/eval-s$S.log
done
.venv/bin/python - <<'PY'
import json, pathlib
R = pathlib.Path("runs/mend-mid")
val = lambda d: [json.loads(l) for l in (d / "train_log.jsonl").read_text().splitlines() if '"best"' in l or "_val" in l]
keep = ("edit/acc_val", "edit/acc_inner_val", "kl/answer_val", "loss/edit_val")
out = {
    "what": "MEND editor at blocks 3-5 (preset smollm2-135m-mid), benchmarks/mend_mid.sh",
    "probe_start_eta": {e: {k: v for k, v in val(R / f"probe-{e}.dir")[-1].items() if k in keep}
                        for e in ("3e-5", "1e-4", "3e-4", "1e-3")},
    "training": {k: json.loads((R / "train.json").read_text())[k] for k in ("steps", "best_val_loss")},
    "validation": [{k: v for k, v in r.items() if k in keep + ("step",)}
                   for r in val(pathlib.Path("editors/smollm2-135m-mid"))],
    "sweep": {},
}
for s in (1, 3, 10):
    res = json.loads((R / f"eval-s{s}" / "results.json").read_text())
    pick = lambda b: {k: round(b[k]["mean"], 4) for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")}
    out["sweep"][f"edit_scale={s}"] = {"n": res["n"], "edited": pick(res["metrics"]), "unedited": pick(res["baseline"])}
pathlib.Path("benchmarks/results/mend_mid.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out["sweep"]))
PY
