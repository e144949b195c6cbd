#!/usr/bin/env bash
# Issue 16 item 4 on GPUs: a randomly initialised stock LlamaForCausalLM (125M-like shape, 4096 vocab, 1024
# context) fine-tuned into an SSA model with DeepSpeed ZeRO-2 on NGPUS GPUs, then its export loaded and scored
# with lm_eval in both modes. Usage: NGPUS=2 tests/gpu/finetune_hf_gpu.sh [OUT]   (needs .[deepspeed,eval])
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-/tmp/finetune_hf_gpu}
ngpus=${NGPUS:-2}
py=${PYTHON:-.venv/bin/python}
rm -rf "$out" && mkdir -p "$out"
# The builtin corpus's tokenizer (vocab 4096, rows of 1024) becomes the Llama folder's tokenizer.
"$py" - "$out/llama" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from ssa_megatron.data.builtin import ensure_builtin_corpus
from ssa_megatron.data.tokenizer import Tokenizer
folder = Path(sys.argv[1])
_, tok = ensure_builtin_corpus("~/.cache/ssa_megatron", 1024, 4096)
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                             tie_word_embeddings=True)).save_pretrained(folder)
PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token=Tokenizer(tok).eos_token).save_pretrained(folder)
shutil.copyfile(tok, folder / "tokenizer.json")
PY
"$py" -m deepspeed.launcher.runner --num_gpus "$ngpus" tools/finetune_hf.py "$out/llama" "$out/ft" \
    --deepspeed tools/ds_zero2.json data.train_shards=builtin:stdlib train.steps=100 train.micro_batch_size=8 \
    train.global_batch_size=$((8 * ngpus * 2)) train.log_interval=10 optim.lr=3e-4 optim.warmup_steps=10 \
    ssa.alpha=10 ssa.p_full=0.5 ssa.top_k=8 ssa.block_size=16 2>&1 | tee "$out/finetune.log"
if ! "$py" -c "import lm_eval" 2>/dev/null; then
  echo "finetune_hf_gpu: lm-eval is not installed, its step is skipped (pip install .[eval]); logs in $out"
  exit 0
fi
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
for mode in sparse full; do
  "$py" -m lm_eval --model hf --model_args "pretrained=$out/ft/step_00000100,trust_remote_code=True,ssa_mode=$mode" \
      --tasks ssa_tiny_ppl,ssa_tiny_mc --include_path tests/lm_eval_tasks --device cuda --batch_size 8 \
      --output_path "$out/lm_eval_$mode" 2>&1 | tail -8 | tee "$out/lm_eval_$mode.log"
done
echo "finetune_hf_gpu: logs and results in $out"
