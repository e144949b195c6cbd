"""Tiny Hugging Face folders for the fine-tuning and lm-eval tests: a BPE tokenizer trained on generated text,
token shards of that text, a stock ``LlamaForCausalLM`` folder and a gated ``ssa_llama`` export."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("the a one two three red green blue cat dog bird tree river stone house city road light dark old new "
         "small large fast slow runs sees finds keeps over under near far before after and or but so").split()
VOCAB = 384
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def write_corpus(path: Path, sentences: int = 400, seed: int = 0) -> Path:
    """Generated English-like sentences, one per line (deterministic)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tokenizer(corpus: Path, folder: Path) -> Path:
    """``folder/tokenizer.json`` (the project's BPE) plus the tokenizer_config.json that AutoTokenizer reads."""
    from transformers import PreTrainedTokenizerFast

    from ssa_megatron.data.tokenizer import Tokenizer, train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    path = train_bpe([str(corpus)], VOCAB, folder / "tokenizer.json")
    PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=Tokenizer(path).eos_token).save_pretrained(folder)
    return folder / "tokenizer.json"


def stock_llama(folder: Path, tokenizer_dir: Path, seq_length: int = 64, seed: int = 0) -> Path:
    """A randomly initialised transformers ``LlamaForCausalLM`` saved with ``save_pretrained`` (no SSA anywhere),
    with the tokenizer files beside it."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=seq_length,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def gated_export(folder: Path, tokenizer_dir: Path, seq_length: int = 256, seed: int = 0) -> Path:
    """A randomly initialised gated ``SSALlamaForCausalLM`` written by the project's export (``write_export``:
    auto_map + remote code), sparse mode 2 blocks of 16 by default, with the tokenizer files beside it."""
    import shutil

    from ssa_megatron.hf import SSALlamaConfig, SSALlamaForCausalLM
    from ssa_megatron.hf.export import write_export

    torch.manual_seed(seed)
    config = SSALlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                            max_position_embeddings=seq_length, tie_word_embeddings=True, ssa_block_size=16,
                            ssa_top_k=2, ssa_mode="sparse", architectures=["SSALlamaForCausalLM"])
    model = SSALlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_export(folder, config, state)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder
