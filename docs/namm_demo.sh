#!/usr/bin/env bash
# NAMM demonstration on a CPU (docs/namm.md): evolve a NAMM for the tiny passkey model, then compare
# full cache, NAMM, H2O and StreamingLLM at NAMM's kept share on passkey and perplexity.
#
#   bash docs/namm_demo.sh MODEL_HF_DIR VAL_DATA WORK [STAGE ...]
#
# MODEL_HF_DIR  the passkey-fine-tuned export of docs/passkey_demo.sh (WORK/ft_short/hf: 96-256 tokens)
# VAL_DATA      held-out text for perplexity, e.g. demo/data/val (`make demo`)
# WORK          output folder
# STAGE         any of: evolve passkey ppl summary (default: all, in order)
#
# Stages:
#   evolve   longcpt namm train recipes/namm_passkey_tiny.yaml (40 generations of 32, evictions every
#            32 tokens, passkey prompts of 256 tokens with keys of seed 1)    -> WORK/namm/namm/policy.pt
#   passkey  256-token prompts, 11 depths x 5 keys of seed 0 (held out): full, namm, then h2o and
#            streaming with cache_size = NAMM's kept share x 256               -> WORK/pk_KIND/passkey.json
#   ppl      the first 256 tokens of 32 validation documents, same four kinds -> WORK/ppl_KIND/ppl.json
#   summary  one table                                                       -> WORK/summary.json
set -euo pipefail
MODEL=$1 VAL=$2 WORK=$3
shift 3
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(evolve passkey ppl summary)
PY=${PYTHON:-python}
GENERATIONS=${GENERATIONS:-40}
EVERY=32
POLICY="$WORK/namm/namm/policy.pt"
mkdir -p "$WORK"

kept_cache_size() {  # NAMM's kept share on the passkey prompts x 256 tokens
  $PY -c "import json; print(max(8, round(json.load(open('$WORK/pk_namm/passkey.json'))['kv_kept'] * 256)))"
}

options() {  # options KIND -> the --attention-options JSON of that kind
  case $1 in
    full) echo '{}' ;;
    namm) echo "{\"policy\": \"$POLICY\"}" ;;
    *) echo "{\"cache_size\": $(kept_cache_size), \"update_every\": $EVERY}" ;;
  esac
}

for stage in "${STAGES[@]}"; do
  case $stage in
    evolve)
      $PY -m longcpt namm train recipes/namm_passkey_tiny.yaml model.pretrained="$MODEL" \
          trainer.out_dir="$WORK/namm" namm.generations="$GENERATIONS" 2>&1 | tee -a "$WORK/evolve.log" ;;
    passkey)
      for kind in full namm h2o streaming; do
        $PY -m longcpt eval passkey --model "$MODEL" --split-digits --lengths 256 \
            --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 --trials 5 --seed 0 --output "$WORK/pk_$kind" \
            --attention "$kind" --attention-options "$(options $kind)"
      done ;;
    ppl)
      for kind in full namm h2o streaming; do
        $PY -m longcpt eval ppl --model "$MODEL" --data "$VAL" --seq-len 256 --bucket 32 --max-docs 32 \
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
    pk = json.load(open(work / f"pk_{kind}" / "passkey.json"))
    ppl = json.load(open(work / f"ppl_{kind}" / "ppl.json"))
    rows[kind] = {"passkey": pk["accuracy"], "passkey_kv_kept": pk["kv_kept"], "ppl": ppl["ppl"],
                  "ppl_kv_kept": ppl["kv_kept"], "options": pk["attention_options"]}
history = state["history"]
summary = {"rows": rows, "generations": state["generation"], "evolution_seconds": round(state["seconds"]),
           "examples_used": len(state["used"]), "history": history}
(work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for kind, r in rows.items():
    print(f"{kind:<10} passkey {r['passkey']:.1%} (kv_kept {r['passkey_kv_kept'] or 1:.3f})  "
          f"ppl {r['ppl']:.3f} (kv_kept {r['ppl_kv_kept'] or 1:.3f})")
print(f"{state['generation']} generations, {state['seconds']:.0f} s of evolution")
PYEOF
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
