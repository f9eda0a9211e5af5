#!/usr/bin/env bash
# NAMM demonstration on a CPU (docs/namm.md): evolve a NAMM for the tiny passkey model, then compare
# full cache, NAMM, H2O and StreamingLLM at NAMM's kept share on passkey and perplexity.
#
#   bash docs/namm_demo.sh MODEL_HF_DIR WORK [STAGE ...]
#
# MODEL_HF_DIR  the passkey-fine-tuned export of docs/passkey_demo.sh (WORK/ft_short/hf: 96-256 tokens)
# WORK          output folder
# STAGE         any of: data evolve passkey answer ppl summary (default: all, in order)
#
# Stages:
#   data     32 held-out passkey texts of 256 tokens (keys of seed 2, random depths, prompt + answer)
#            for perplexity: the text this model was fine-tuned on (a passkey fine-tune forgets
#            generic text)                                                     -> WORK/ppl_text.jsonl
#   evolve   longcpt namm train recipes/namm_passkey_tiny.yaml (GENERATIONS of 32, evictions every
#            32 tokens, passkey prompts of 128-256 tokens with keys of seed 1)    -> WORK/namm/namm/policy.pt
#   passkey  256-token prompts, 11 depths x TRIALS (8) keys of seed 0 (held out): full, namm, then h2o and
#            streaming with cache_size = NAMM's kept share x 256               -> WORK/pk_KIND/passkey.json
#   answer   the same held-out prompts read with their answer (teacher forcing), the four kinds: mean
#            answer probability (per-token geometric mean) and digits right -> WORK/answer_KIND.json
#   ppl      those texts (their first 250 tokens), the same four kinds           -> WORK/ppl_KIND/ppl.json
#   summary  one table                                                       -> WORK/summary.json
set -euo pipefail
MODEL=$1 WORK=$2
shift 2
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(data evolve passkey answer ppl summary)
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
    data)
      $PY - "$MODEL" "$WORK/ppl_text.jsonl" <<'PYEOF'
import json, sys
from longcpt.data import load_tokenizer
from longcpt.data.passkey import make_passkey_examples
from longcpt.fsio import atomic_write_text
tokenizer = load_tokenizer(sys.argv[1])
rows = make_passkey_examples(tokenizer, [256], ["random"], 32, seed=2, split_digits=True)
bos = tokenizer.bos_token or ""  # eval ppl adds the BOS itself
atomic_write_text(sys.argv[2], "".join(json.dumps({"text": (r["prompt"] + r["answer"]).removeprefix(bos)}) + "\n" for r in rows))
PYEOF
      ;;
    evolve)
      $PY -m longcpt namm train recipes/namm_passkey_tiny.yaml model.pretrained="$MODEL" \
          trainer.out_dir="$WORK/namm" namm.generations="$GENERATIONS" 2>&1 | tee -a "$WORK/evolve.log" ;;
    passkey)
      for kind in full namm h2o streaming; do
        $PY -m longcpt eval passkey --model "$MODEL" --split-digits --lengths 256 \
            --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 --trials ${TRIALS:-8} --seed 0 --output "$WORK/pk_$kind" \
            --attention "$kind" --attention-options "$(options $kind)"
      done ;;
    answer)
      for kind in full namm h2o streaming; do
        $PY - "$MODEL" "$kind" "$(options $kind)" "$WORK/answer_$kind.json" "${TRIALS:-8}" <<'PYEOF'
import json, math, sys
import torch
import longcpt
from longcpt.data import load_tokenizer
from longcpt.data.passkey import PasskeyPromptBuilder, passkey_key
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import kv_kept
model_dir, kind, options, out, trials = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], int(sys.argv[5])
model = longcpt.from_pretrained(model_dir, attention=kind, **options).eval()
builder = PasskeyPromptBuilder(load_tokenizer(model_dir), split_digits=True)
depths = [i / 10 for i in range(11)]
examples = [builder.build(256, d, passkey_key(0, 256, d, t)) for d in depths for t in range(trials)]
probs, digits, kept = [], [], []
with torch.inference_mode():
    for ex in examples:
        ids = torch.tensor([ex.input_ids + ex.answer_ids])
        state = {}
        hidden = model.hidden_states(ids[:, :-1], state=state)
        n = len(ex.answer_ids)
        logp = torch.log_softmax(model.lm_head(hidden[0, -n:]).float(), -1)
        target = ids[0, -n:]
        probs.append(math.exp(float(logp.gather(-1, target[:, None]).mean())))
        digits.append(float((logp.argmax(-1) == target).float().mean()))
        kept.append(kv_kept(state) or 1.0)
report = {"attention": kind, "attention_options": options, "prompts": len(examples),
          "answer_probability": sum(probs) / len(probs), "digits_right": sum(digits) / len(digits),
          "kv_kept": sum(kept) / len(kept)}
atomic_write_json(out, report)
print(json.dumps(report))
PYEOF
      done ;;
    ppl)
      for kind in full namm h2o streaming; do
        $PY -m longcpt eval ppl --model "$MODEL" --data "$WORK/ppl_text.jsonl" --seq-len 250 --bucket 50 --max-docs 32 \
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
    answer = json.load(open(work / f"answer_{kind}.json"))
    rows[kind] = {"passkey": pk["accuracy"], "passkey_kv_kept": pk["kv_kept"], "ppl": ppl["ppl"],
                  "ppl_kv_kept": ppl["kv_kept"], "answer_probability": answer["answer_probability"],
                  "digits_right": answer["digits_right"], "answer_kv_kept": answer["kv_kept"],
                  "options": pk["attention_options"]}
history = state["history"]
summary = {"rows": rows, "generations": state["generation"], "evolution_seconds": round(state["seconds"]),
           "examples_used": len(state["used"]), "history": history}
(work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for kind, r in rows.items():
    print(f"{kind:<10} passkey {r['passkey']:.1%} (kv_kept {r['passkey_kv_kept'] or 1:.3f})  "
          f"answer p {r['answer_probability']:.3f}, digits {r['digits_right']:.1%} (kv_kept {r['answer_kv_kept']:.3f})  "
          f"ppl {r['ppl']:.3f} (kv_kept {r['ppl_kv_kept'] or 1:.3f})")
print(f"{state['generation']} generations, {state['seconds']:.0f} s of evolution")
PYEOF
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
