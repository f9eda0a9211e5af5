#!/usr/bin/env bash
# The CPU continual-pretraining study (docs/cpt_study.md): a small Llama pretrained at a short
# context, then continual-pretrained to 8x that context four times from the same weights, with the
# same tokens, seed and steps: attention `full`, `intra_doc`, `anchor` and `infini`; every model is
# evaluated with `longcpt eval ppl` (perplexity by position to 2x the new context) and
# `longcpt eval ruler` (niah tasks and vt at 1x-8x the base context). Two CPT seeds per arm.
#
#   experiments/cpt_study.sh WORK_DIR [STAGE ...]
#
# WORK_DIR  everything is written here; WORK_DIR/times.txt gets the wall time of every stage
# STAGE     any of: corpus tokenizer prepare synth mix base cpt eval report, or one run such as
#           cpt_anchor_s1, eval_base, eval_full_s0 (default: all, in order)
#
# Every stage is resumable: a training run continues from its last checkpoint, an evaluation
# continues its predictions file, and a stage whose output exists is skipped.
#
# Stages (the numbers are what docs/cpt_study.md reports; override with the variables):
#   corpus     the demo corpus from the whole standard library (sources and docstrings)
#   tokenizer  byte-level BPE, ${VOCAB} tokens
#   prepare    tokenized, ${VAL_FRACTION} of the documents held out (their long ones are the ppl set)
#   synth      RULER-format training documents (niah x4, vt) of ${SYNTH_LENGTHS} tokens, i.e. at
#              most the base context, with the answer appended; seed ${SYNTH_SEED} (the evaluation
#              uses seed 0, so no training prompt is an evaluation prompt). A model of this size
#              trained for minutes on code has no retrieval skill to extend; these documents give
#              the base model the skill at 1x, and the study asks how far each CPT arm carries it.
#   mix        base mix: corpus ${BASE_SYNTH_SHARE} synthetic; CPT mix: the same sources with long
#              corpus documents upsampled (${UPSAMPLE}) and ${CPT_SYNTH_SHARE} synthetic
#   base       ${LAYERS} layers x ${HIDDEN}, full attention, ${BASE_LEN}-token windows, rope_theta
#              ${BASE_THETA}, ${BASE_STEPS} steps of ${BASE_BATCH} windows -> WORK/base/hf
#   cpt        for arm in full intra_doc anchor infini, seed in ${SEEDS}: WORK/base/hf ->
#              ${CPT_LEN}-token windows, rope_theta ${CPT_THETA}, ${CPT_STEPS} steps of
#              ${CPT_BATCH} windows (same tokens for every arm of a seed) -> WORK/cpt_ARM_sSEED/hf;
#              infini: segments of ${SEGMENT} tokens (1/8 of the window), backprop through all of them
#   eval       for the base and every CPT model: ppl at ${PPL_LEN} tokens on ${PPL_DOCS} held-out
#              documents (WORK/eval_NAME/ppl) and RULER ${RULER_TASKS} at ${RULER_LENGTHS},
#              ${RULER_SAMPLES} samples each (WORK/eval_NAME/ruler)
#   report     the table and figures of docs/cpt_study.md from the eval outputs
#              (python experiments/cpt_study_report.py WORK_DIR experiments docs)
#
# JOBS=N runs up to N training runs (stage cpt) or model evaluations (stage eval) side by side.
# The reported run: 2-core machine shared with other jobs, every process `nice -n 10` with
# OMP_NUM_THREADS=1, JOBS=4 (docs/cpt_study.md lists the stages as they ran and times.txt).
set -euo pipefail

WORK=${1:?usage: experiments/cpt_study.sh WORK_DIR [STAGE ...]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(corpus tokenizer prepare synth mix base cpt eval report)

PY=${PYTHON:-python}
VOCAB=${VOCAB:-2048}
VAL_FRACTION=${VAL_FRACTION:-0.1}
SYNTH_TASKS=${SYNTH_TASKS:-niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt}
SYNTH_LENGTHS=${SYNTH_LENGTHS:-320,384,448,512}
SYNTH_N=${SYNTH_N:-400}
SYNTH_SEED=${SYNTH_SEED:-1000}
BASE_SYNTH_SHARE=${BASE_SYNTH_SHARE:-0.4}
CPT_SYNTH_SHARE=${CPT_SYNTH_SHARE:-0.2}
UPSAMPLE=${UPSAMPLE:-"2048:2 4096:4"}
LAYERS=${LAYERS:-4}
HIDDEN=${HIDDEN:-128}
INTERMEDIATE=${INTERMEDIATE:-352}
HEADS=${HEADS:-4}
KV_HEADS=${KV_HEADS:-2}
BASE_LEN=${BASE_LEN:-512}
BASE_THETA=${BASE_THETA:-10000.0}
BASE_STEPS=${BASE_STEPS:-600}
BASE_BATCH=${BASE_BATCH:-8}
BASE_LR=${BASE_LR:-2.0e-3}
CPT_LEN=${CPT_LEN:-4096}
CPT_THETA=${CPT_THETA:-100000.0}
CPT_STEPS=${CPT_STEPS:-30}
CPT_BATCH=${CPT_BATCH:-1}
CPT_LR=${CPT_LR:-1.0e-3}
SEGMENT=${SEGMENT:-512}
ARMS=${ARMS:-"full intra_doc anchor infini"}
SEEDS=${SEEDS:-"0 1"}
PPL_LEN=${PPL_LEN:-8192}
PPL_DOCS=${PPL_DOCS:-6}
RULER_TASKS=${RULER_TASKS:-niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt}
RULER_LENGTHS=${RULER_LENGTHS:-512,1024,2048,4096}
RULER_SAMPLES=${RULER_SAMPLES:-5}
JOBS=${JOBS:-1}  # runs of the cpt and eval stages side by side (one process each)
mkdir -p "$WORK"

timed() {  # timed NAME command...: run, then append "NAME seconds" to WORK/times.txt
  local name=$1 start=$SECONDS
  shift
  "$@" 2>&1 | tee -a "$WORK/$name.log"
  echo "$name $((SECONDS - start)) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$WORK/times.txt"
}

train() {  # train OUT_DIR key=value...: fp32 on one CPU process, exported to OUT_DIR/hf at the end
  local out=$1
  shift
  [ -f "$out/hf/config.json" ] && { echo "$out/hf exists: skipped"; return 0; }
  $PY -m longcpt train recipes/tiny_cpu.yaml trainer.out_dir="$out" trainer.accelerator=cpu \
      trainer.devices=1 trainer.precision=32-true trainer.export_hf=true trainer.log_every_n_steps=10 \
      trainer.save_every_n_steps=10 trainer.val_every_n_steps=100000 strategy.name=auto data.num_workers=1 \
      model.tokenizer="$WORK/tokenizer" data.val=null data.packing=chunk optim.weight_decay=0.1 "$@"
}

cpt() {  # cpt ARM SEED: one continual-pretraining run from the base model
  local arm=$1 seed=$2 extra=()
  [ "$arm" = infini ] && extra=(attention.segment_len="$SEGMENT" attention.bptt_segments=$((CPT_LEN / SEGMENT)))
  timed "cpt_${arm}_s${seed}" train "$WORK/cpt_${arm}_s${seed}" model.pretrained="$WORK/base/hf" \
      rope.theta="$CPT_THETA" attention.kind="$arm" "${extra[@]}" \
      data.train="$WORK/mix_cpt" data.seq_len="$CPT_LEN" data.micro_batch_size="$CPT_BATCH" \
      optim.lr="$CPT_LR" optim.warmup_steps=5 trainer.max_steps="$CPT_STEPS" trainer.seed="$seed"
}

evaluate() {  # evaluate NAME MODEL: ppl + RULER -> WORK/eval_NAME/{ppl,ruler}
  local name=$1 model=$2
  [ -f "$WORK/eval_$name/ppl/ppl.json" ] || timed "eval_${name}_ppl" $PY -m longcpt eval ppl --model "$model" \
      --data "$WORK/data/val" --seq-len "$PPL_LEN" --max-docs "$PPL_DOCS" --bucket 512 --chunk 4096 \
      --output "$WORK/eval_$name/ppl"
  [ -f "$WORK/eval_$name/ruler/ruler.json" ] || timed "eval_${name}_ruler" $PY -m longcpt eval ruler \
      --model "$model" --tasks "$RULER_TASKS" --lengths "$RULER_LENGTHS" --samples "$RULER_SAMPLES" \
      --output "$WORK/eval_$name/ruler"
}

limited() {  # limited command...: run in the background, at most JOBS at a time
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  "$@" &
}

for stage in "${STAGES[@]}"; do
  case $stage in
    corpus)
      [ -f "$WORK/corpus/corpus.jsonl" ] || timed corpus $PY -m longcpt.data.demo_corpus --output "$WORK/corpus" \
          --max-docs 100000 --max-bytes 100000000 ;;
    tokenizer)
      [ -f "$WORK/tokenizer/tokenizer.json" ] || timed tokenizer $PY data_prep/train_tokenizer.py \
          --input "$WORK/corpus/corpus.jsonl" --vocab-size "$VOCAB" --output "$WORK/tokenizer" ;;
    prepare)
      [ -d "$WORK/data/train" ] || timed prepare $PY data_prep/prepare_corpus.py --input "$WORK/corpus/corpus.jsonl" \
          --tokenizer "$WORK/tokenizer" --output "$WORK/data" --val-fraction "$VAL_FRACTION" --seed 0 ;;
    synth)
      [ -f "$WORK/synth.jsonl" ] || timed synth $PY data_prep/make_ruler.py --tokenizer "$WORK/tokenizer" \
          --tasks "$SYNTH_TASKS" --lengths "$SYNTH_LENGTHS" --n "$SYNTH_N" --seed "$SYNTH_SEED" \
          --output "$WORK/synth.jsonl"
      [ -d "$WORK/synth_data" ] || timed synth_prepare $PY data_prep/prepare_corpus.py --input "$WORK/synth.jsonl" \
          --tokenizer "$WORK/tokenizer" --output "$WORK/synth_data" ;;
    mix)
      [ -d "$WORK/mix_base" ] || timed mix_base $PY data_prep/mix.py --input "$WORK/data/train:$(awk "BEGIN{print 1 - $BASE_SYNTH_SHARE}")" \
          "$WORK/synth_data:$BASE_SYNTH_SHARE" --output "$WORK/mix_base" --seed 0
      # shellcheck disable=SC2086
      [ -d "$WORK/mix_cpt" ] || timed mix_cpt $PY data_prep/mix.py --input "$WORK/data/train:$(awk "BEGIN{print 1 - $CPT_SYNTH_SHARE}")" \
          "$WORK/synth_data:$CPT_SYNTH_SHARE" --upsample-long $UPSAMPLE --output "$WORK/mix_cpt" --seed 0 ;;
    base)
      timed base train "$WORK/base" model.config.hidden_size="$HIDDEN" model.config.intermediate_size="$INTERMEDIATE" \
          model.config.num_hidden_layers="$LAYERS" model.config.num_attention_heads="$HEADS" \
          model.config.num_key_value_heads="$KV_HEADS" model.config.max_position_embeddings="$BASE_LEN" \
          model.config.rope_theta="$BASE_THETA" attention.kind=full data.train="$WORK/mix_base" \
          data.seq_len="$BASE_LEN" data.micro_batch_size="$BASE_BATCH" optim.lr="$BASE_LR" optim.warmup_steps=50 \
          trainer.max_steps="$BASE_STEPS" trainer.seed=0 ;;
    cpt)
      for seed in $SEEDS; do for arm in $ARMS; do limited cpt "$arm" "$seed"; done; done
      wait ;;
    cpt_*_s*)
      run=${stage#cpt_}; cpt "${run%_s*}" "${run##*_s}" ;;
    eval)
      limited evaluate base "$WORK/base/hf"
      for seed in $SEEDS; do for arm in $ARMS; do limited evaluate "${arm}_s${seed}" "$WORK/cpt_${arm}_s${seed}/hf"; done; done
      wait ;;
    eval_base)
      evaluate base "$WORK/base/hf" ;;
    eval_*_s*)
      run=${stage#eval_}; evaluate "$run" "$WORK/cpt_${run}/hf" ;;
    report)
      timed report $PY experiments/cpt_study_report.py "$WORK" experiments docs ;;
    *)
      echo "cpt_study.sh: unknown stage '$stage' (corpus tokenizer prepare synth mix base cpt eval report, cpt_ARM_sSEED, eval_base, eval_ARM_sSEED)" >&2
      exit 2 ;;
  esac
done
