#!/usr/bin/env bash
# The passkey demonstration of the README ("Passkey demonstration on a CPU"): fine-tune the
# demo's tiny pretrained model (4 layers x 128, `make demo`) on passkey prompts of at most 1K
# tokens (Infini: then 2K-4K, then 8K-16K), and evaluate it far beyond, as an AnchorAttention/full model and as
# an Infini-attention model. The README's run had the anchor and Infini branches side by side,
# one thread each (OMP_NUM_THREADS=1) after `data warm short` on both cores.
#
#   experiments/passkey_demo.sh BASE_HF_DIR WORK_DIR [STAGE ...]
#
# BASE_HF_DIR  the tiny model `make demo` exported (with its tokenizer), e.g. demo/pretrain/hf
# WORK_DIR     everything is written here; WORK_DIR/times.txt gets the wall time of every stage
# STAGE        any of: data warm short anchor infini infini_4k infini_16k eval_anchor eval_anchor_ntk eval_infini eval_infini_short eval_infini_16k eval_anchor_infllm (default: all, in order)
#
# Stages (the steps and lengths below are what the README reports; override with the variables):
#   data         passkey prompts with the key one digit per token (--split-digits):
#                short.jsonl 96..256 tokens, long.jsonl 384..1016 tokens, xlong.jsonl 2048..4080
#                tokens, x16k.jsonl 8192..16368 tokens, needle at random depths
#   warm         short prompts with the loss on every token (data.train_on_input=true), ${WARM_STEPS}
#                steps: the cyclic filler and the twice-written key teach the 200-step model to copy
#                (induction), which answer-only loss alone does not reach in minutes -> WORK/warm/hf
#   short        warm -> short prompts, loss on the answer only, ${SHORT_STEPS} steps -> WORK/ft_short/hf
#   anchor       ft_short -> prompts up to 1K tokens, anchor kind, ${ANCHOR_STEPS} steps -> WORK/ft_anchor/hf
#   infini       ft_short -> the short prompts again, now as an Infini-attention model with
#                ${SEGMENT}-token segments (up to 5 per prompt, backprop through all of them), so the
#                needle mostly sits in an earlier segment and must come back through the memory;
#                ${INFINI_STEPS} steps -> WORK/ft_infini/hf
#   infini_4k    ft_infini -> prompts of 2K..4K tokens (up to 64 segments, backprop through all of
#                them), ${INFINI_4K_STEPS} steps -> WORK/ft_infini_4k/hf (the README's run was
#                scheduled for 300 steps and stopped at step 100, exported from step-00000100.ckpt)
#   infini_16k   ft_infini_4k -> prompts of 8K..16K tokens (256 segments), ${INFINI_16K_STEPS} steps at
#                lr 5e-4 -> WORK/ft_infini_16k/hf
#   eval_anchor  1K..32K (the export runs as full attention)      -> WORK/eval_anchor/passkey.{json,png}
#   eval_anchor_ntk    the same with dynamic-NTK RoPE (training-free; one call per prompt, so every
#                key is rotated with the base of the whole prompt) -> WORK/eval_anchor_ntk/passkey.{json,png}
#   eval_infini  ft_infini_4k at 1K..128K, streamed segment by segment -> WORK/eval_infini/passkey.{json,png}
#   eval_infini_short  ft_infini at 256..16K                    -> WORK/eval_infini_short/passkey.{json,png}
#   eval_infini_16k    ft_infini_16k at 4K..256K                -> WORK/eval_infini_16k/passkey.{json,png}
#   eval_anchor_infllm ft_anchor with InfLLM (training-free context memory, sizes ${INFLLM_OPTIONS})
#                at ${INFLLM_LENGTHS}, ${INFLLM_TRIALS} trials    -> WORK/eval_anchor_infllm/passkey.{json,png}
set -euo pipefail

BASE=${1:?usage: experiments/passkey_demo.sh BASE_HF_DIR WORK_DIR [STAGE ...]}
WORK=${2:?usage: experiments/passkey_demo.sh BASE_HF_DIR WORK_DIR [STAGE ...]}
shift 2
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(data warm short anchor infini infini_4k infini_16k eval_anchor eval_anchor_ntk eval_infini eval_infini_short eval_infini_16k eval_anchor_infllm)

PY=${PYTHON:-python}
WARM_STEPS=${WARM_STEPS:-500}
SHORT_STEPS=${SHORT_STEPS:-800}
ANCHOR_STEPS=${ANCHOR_STEPS:-300}
INFINI_STEPS=${INFINI_STEPS:-800}
INFINI_4K_STEPS=${INFINI_4K_STEPS:-300}
INFINI_16K_STEPS=${INFINI_16K_STEPS:-80}
SEGMENT=${SEGMENT:-64}
TRIALS=${TRIALS:-3}
DEPTHS=${DEPTHS:-0,0.25,0.5,0.75,1}
ANCHOR_LENGTHS=${ANCHOR_LENGTHS:-1024,2048,4096,8192,16384,32768}
INFINI_LENGTHS=${INFINI_LENGTHS:-1024,2048,4096,8192,16384,32768,65536,131072}
INFLLM_LENGTHS=${INFLLM_LENGTHS:-4096,16384,65536,262144,1048576}
INFLLM_TRIALS=${INFLLM_TRIALS:-$TRIALS}
# What one query attends (n_init + topk * block_size + n_local) stays within the 1K fine-tuning length.
INFLLM_OPTIONS=${INFLLM_OPTIONS:-'{"n_init": 32, "n_local": 256, "block_size": 32, "topk": 8, "repr_topk": 4, "exc_block_size": 32, "max_cached_block": 16}'}
mkdir -p "$WORK"

timed() {  # timed NAME command...: run, then append "NAME seconds" to WORK/times.txt
  local name=$1 start=$SECONDS
  shift
  "$@" 2>&1 | tee "$WORK/$name.log"
  echo "$name $((SECONDS - start))" >> "$WORK/times.txt"
}

train() {  # train OUT_DIR key=value...: a passkey fine-tune on the CPU, fp32, exported at the end
  local out=$1
  shift
  $PY -m longcpt train recipes/passkey_ft.yaml trainer.out_dir="$out" trainer.accelerator=cpu \
      trainer.devices=1 trainer.precision=32-true trainer.export_hf=true trainer.log_every_n_steps=25 \
      trainer.save_every_n_steps=100 strategy.name=auto data.num_workers=1 optim.weight_decay=0.0 "$@"
}

infini_longer() {  # infini_longer NAME FROM DATA SEQ_LEN BATCH LR WARMUP STEPS [key=value ...]
  local name=$1 from=$2 data=$3 seq=$4 batch=$5 lr=$6 warmup=$7 steps=$8
  shift 8
  timed "$name" train "$WORK/$name" model.pretrained="$from" attention.kind=infini \
      attention.segment_len="$SEGMENT" attention.bptt_segments=$((seq / SEGMENT)) attention.memory_update=delta \
      attention.gate_lr=2.0e-2 data.train="$data" data.seq_len="$seq" data.micro_batch_size="$batch" \
      optim.lr="$lr" optim.warmup_steps="$warmup" trainer.max_steps="$steps" "$@"
}

evaluate() {  # evaluate NAME MODEL LENGTHS [flag ...]: a passkey sweep -> WORK/NAME/passkey.{json,png}
  local name=$1 model=$2 lengths=$3
  shift 3
  timed "$name" $PY -m longcpt eval passkey --model "$model" --split-digits --lengths "$lengths" \
      --depths "$DEPTHS" --trials "$TRIALS" --output "$WORK/$name" "$@"
}

for stage in "${STAGES[@]}"; do
  case $stage in
    data)
      timed data_short $PY data_prep/make_passkey.py --tokenizer "$BASE" --split-digits --depths random \
          --lengths 96,112,128,144,160,176,192,208,224,240,256 --n 1000 --seed 1 --output "$WORK/short.jsonl"
      timed data_long $PY data_prep/make_passkey.py --tokenizer "$BASE" --split-digits --depths random \
          --lengths 384,512,640,768,896,1016 --n 1000 --seed 2 --output "$WORK/long.jsonl"
      timed data_xlong $PY data_prep/make_passkey.py --tokenizer "$BASE" --split-digits --depths random \
          --lengths 2048,2560,3072,3584,4080 --n 600 --seed 3 --output "$WORK/xlong.jsonl"
      timed data_x16k $PY data_prep/make_passkey.py --tokenizer "$BASE" --split-digits --depths random \
          --lengths 8192,10240,12288,14336,16368 --n 60 --seed 4 --output "$WORK/x16k.jsonl" ;;
    warm)
      timed warm train "$WORK/warm" model.pretrained="$BASE" attention.kind=anchor data.train_on_input=true \
          data.train="$WORK/short.jsonl" data.seq_len=264 data.micro_batch_size=16 \
          optim.lr=2.0e-3 optim.warmup_steps=30 trainer.max_steps="$WARM_STEPS" ;;
    short)
      timed ft_short train "$WORK/ft_short" model.pretrained="$WORK/warm/hf" attention.kind=anchor \
          data.train="$WORK/short.jsonl" data.seq_len=264 data.micro_batch_size=32 \
          optim.lr=2.0e-3 optim.warmup_steps=30 trainer.max_steps="$SHORT_STEPS" ;;
    anchor)
      timed ft_anchor train "$WORK/ft_anchor" model.pretrained="$WORK/ft_short/hf" attention.kind=anchor \
          data.train="$WORK/long.jsonl" data.seq_len=1024 data.micro_batch_size=8 \
          optim.lr=1.0e-3 optim.warmup_steps=20 trainer.max_steps="$ANCHOR_STEPS" ;;
    infini)
      timed ft_infini train "$WORK/ft_infini" model.pretrained="$WORK/ft_short/hf" attention.kind=infini \
          attention.segment_len="$SEGMENT" attention.bptt_segments=$(((264 + SEGMENT - 1) / SEGMENT)) \
          attention.memory_update=delta attention.gate_init=-1.0 attention.gate_lr=5.0e-2 \
          data.train="$WORK/short.jsonl" data.seq_len=264 data.micro_batch_size=32 \
          optim.lr=2.0e-3 optim.warmup_steps=30 trainer.max_steps="$INFINI_STEPS" ;;
    infini_4k)
      infini_longer ft_infini_4k "$WORK/ft_infini/hf" "$WORK/xlong.jsonl" 4096 2 1.0e-3 20 "$INFINI_4K_STEPS" \
          trainer.save_every_n_steps=50 ;;
    infini_16k)
      infini_longer ft_infini_16k "$WORK/ft_infini_4k/hf" "$WORK/x16k.jsonl" 16384 1 5.0e-4 10 "$INFINI_16K_STEPS" \
          trainer.save_every_n_steps=20 trainer.log_every_n_steps=10 ;;
    eval_anchor)
      evaluate eval_anchor "$WORK/ft_anchor/hf" "$ANCHOR_LENGTHS" ;;
    eval_anchor_ntk)
      evaluate eval_anchor_ntk "$WORK/ft_anchor/hf" "$ANCHOR_LENGTHS" --prefill-chunk 32768 \
          --rope-scaling '{"rope_type": "dynamic", "factor": 1.0}' ;;
    eval_infini)
      evaluate eval_infini "$WORK/ft_infini_4k/hf" "$INFINI_LENGTHS" ;;
    eval_infini_short)
      evaluate eval_infini_short "$WORK/ft_infini/hf" 256,512,1024,2048,4096,8192,16384 ;;
    eval_infini_16k)
      evaluate eval_infini_16k "$WORK/ft_infini_16k/hf" 4096,16384,65536,131072,262144 ;;
    eval_anchor_infllm)
      TRIALS=$INFLLM_TRIALS evaluate eval_anchor_infllm "$WORK/ft_anchor/hf" "$INFLLM_LENGTHS" \
          --attention infllm --attention-options "$INFLLM_OPTIONS" ;;
    *)
      echo "passkey_demo.sh: unknown stage '$stage' (data warm short anchor infini infini_4k infini_16k eval_anchor eval_anchor_ntk eval_infini eval_infini_short eval_infini_16k eval_anchor_infllm)" >&2
      exit 2 ;;
  esac
done
