#!/usr/bin/env bash
# NAMM demonstration on a CPU (docs/namm.md): evolve a NAMM for the tiny passkey model, then compare
# full cache, NAMM, H2O and StreamingLLM at the same cache through the prompt, on prompts seen and
# unseen in evolution.
#
#   bash experiments/namm_demo.sh MODEL_HF_DIR WORK [STAGE ...]
#
# MODEL_HF_DIR  a passkey-fine-tuned export (make demo's WORK/passkey_finetune/hf: 96-128-token prompts)
# WORK          output folder
# STAGE         any of: data evolve eval ppl summary (default: all, in order)
#
# Settings (environment): LENGTHS / DEPTHS the evolution prompts (96,112,128 / 0,0.2,...,1), TRIALS (8)
# keys per evaluation cell, EVERY (32) tokens between evictions, GENERATIONS (25), WORKERS (2) evolution
# processes, PYTHON.
#
# Stages:
#   data     32 passkey texts of 128 tokens (keys of seed 2, random depths, prompt + answer) for perplexity:
#            the text this model was fine-tuned on                              -> WORK/ppl_text.jsonl
#   evolve   longcpt namm train recipes/namm_passkey_tiny.yaml on LENGTHS x DEPTHS (keys of seed 1: a
#            fresh draw every generation, a validation draw to choose the policy) -> WORK/namm/namm/policy.pt
#   eval     experiments/namm_demo_eval.py on two sets of prompts, keys of seed 0:
#              seen:   LENGTHS x DEPTHS, the evolution's layouts (only the keys differ);
#              unseen: lengths, depths and filler never used in evolution (UNSEEN_LENGTHS 104,120,
#                      UNSEEN_DEPTHS 0.1,0.3,0.5,0.7,0.9, the filler cycle started at its third sentence);
#            full and namm first; then h2o and streaming with the cache_size that holds NAMM's mean
#            share through the seen prompts (experiments/namm_demo_eval.py match)      -> WORK/eval_SET_KIND.json
#   ppl      those texts (their first 120 tokens), the same four kinds           -> WORK/ppl_KIND/ppl.json
#   summary  one table                                                          -> WORK/summary.json
set -euo pipefail
MODEL=$1 WORK=$2
shift 2
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(data evolve eval ppl summary)
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
GENERATIONS=${GENERATIONS:-25}
WORKERS=${WORKERS:-2}
EVERY=${EVERY:-32}
TRIALS=${TRIALS:-8}
LENGTHS=${LENGTHS:-96,112,128}
DEPTHS=${DEPTHS:-0,0.2,0.4,0.6,0.8,1}
UNSEEN_LENGTHS=${UNSEEN_LENGTHS:-104,120}
UNSEEN_DEPTHS=${UNSEEN_DEPTHS:-0.1,0.3,0.5,0.7,0.9}
POLICY="$WORK/namm/namm/policy.pt"
mkdir -p "$WORK"

matched_cache_size() {  # the fixed cache that holds NAMM's mean share through the seen prompts
  $PY "$HERE/namm_demo_eval.py" match "$($PY -c "import json; print(json.load(open('$WORK/eval_seen_namm.json'))['kv_mean'])")" \
      --lengths "$LENGTHS" --every "$EVERY"
}

options() {  # options KIND -> the --attention-options JSON of that kind
  case $1 in
    full) echo '{}' ;;
    namm) echo "{\"policy\": \"$POLICY\"}" ;;
    *) echo "{\"cache_size\": $(matched_cache_size), \"update_every\": $EVERY}" ;;
  esac
}

evaluate() {  # evaluate SET KIND
  local lengths=$LENGTHS depths=$DEPTHS offset=0
  [ "$1" = unseen ] && lengths=$UNSEEN_LENGTHS depths=$UNSEEN_DEPTHS offset=2
  $PY "$HERE/namm_demo_eval.py" eval "$MODEL" "$2" "$(options "$2")" "$WORK/eval_$1_$2.json" --lengths "$lengths" \
      --depths "$depths" --trials "$TRIALS" --seed 0 --filler-offset $offset --every "$EVERY"
}

for stage in "${STAGES[@]}"; do
  case $stage in
    data)
      $PY - "$MODEL" "$WORK/ppl_text.jsonl" <<'PYEOF'
import json, sys
from longcpt.data import load_tokenizer
from longcpt.data.passkey import make_passkey_examples
from longcpt.fsio import atomic_write_text
tokenizer = load_tokenizer(sys.argv[1])
rows = make_passkey_examples(tokenizer, [128], ["random"], 32, seed=2, split_digits=True)
bos = tokenizer.bos_token or ""  # eval ppl adds the BOS itself
atomic_write_text(sys.argv[2], "".join(json.dumps({"text": (r["prompt"] + r["answer"]).removeprefix(bos)}) + "\n" for r in rows))
PYEOF
      ;;
    evolve)
      $PY -m longcpt namm train recipes/namm_passkey_tiny.yaml model.pretrained="$MODEL" \
          trainer.out_dir="$WORK/namm" namm.generations="$GENERATIONS" namm.workers="$WORKERS" namm.update_every="$EVERY" \
          "namm.passkey.lengths=[$LENGTHS]" "namm.passkey.depths=[$DEPTHS]" 2>&1 | tee -a "$WORK/evolve.log" ;;
    eval)
      for set in seen unseen; do
        for kind in full namm; do evaluate $set $kind; done
      done
      for set in seen unseen; do
        for kind in h2o streaming; do evaluate $set $kind; done
      done ;;
    ppl)
      for kind in full namm h2o streaming; do
        $PY -m longcpt eval ppl --model "$MODEL" --data "$WORK/ppl_text.jsonl" --seq-len 120 --bucket 40 --max-docs 32 \
            --output "$WORK/ppl_$kind" --attention "$kind" --attention-options "$(options $kind)"
      done ;;
    summary)
      $PY - "$WORK" <<'PYEOF'
import json, pickle, sys
from pathlib import Path
work = Path(sys.argv[1])
state = pickle.load(open(work / "namm" / "namm" / "es_state", "rb"))
rows = {}
for kind in ("full", "namm", "h2o", "streaming"):
    ppl = json.load(open(work / f"ppl_{kind}" / "ppl.json"))
    row = {"ppl": ppl["ppl"], "ppl_kv_kept": ppl["kv_kept"], "options": None}
    for s in ("seen", "unseen"):
        r = json.load(open(work / f"eval_{s}_{kind}.json"))
        row["options"] = r["options"]
        row[s] = {k: r[k] for k in ("prompts", "correct", "answer_probability", "digits_right", "kv_end", "kv_mean", "kv_peak")}
    rows[kind] = row
summary = {"rows": rows, "generations": state["generation"], "evolution_seconds": round(state["seconds"]),
           "history": state["history"]}
(work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for kind, r in rows.items():
    for s in ("seen", "unseen"):
        x = r[s]
        print(f"{kind:<10} {s:<7} exact {x['correct']:.1%}  answer p {x['answer_probability']:.3f}  digits "
              f"{x['digits_right']:.1%}  cache end {x['kv_end']:.3f} mean {x['kv_mean']:.3f} peak {x['kv_peak']:.3f}")
    print(f"{kind:<10} ppl {r['ppl']:.2f} (kv_kept {r['ppl_kv_kept'] or 1:.3f})")
print(f"{state['generation']} generations, {state['seconds']:.0f} s of evolution")
PYEOF
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
