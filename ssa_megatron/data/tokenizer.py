"""Tokenizer: a Hugging Face ``tokenizer.json`` behind a small interface, and deterministic byte-level BPE training.

The data pipeline needs three things from a tokenizer: ids for a batch of documents, the end-of-sequence id
that separates packed documents, and the vocabulary size (which picks the on-disk token dtype). A content hash
ties shards to the tokenizer that made them, so the loader can refuse shards from a different one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

# Special tokens looked up, in this order, when the caller names no end-of-sequence token. The first is what
# train_bpe writes (GPT-2's convention); the others cover Llama/Mistral/T5-style tokenizer.json files.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def tokenizer_hash(path: Union[str, Path]) -> str:
    """sha256 (hex) of a tokenizer.json's canonical JSON, so re-saving the same tokenizer keeps its hash."""
    text = Path(path).read_text(encoding="utf-8")
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Tokenizer:
    """A loaded ``tokenizer.json`` (HF tokenizers) with the end-of-sequence id the packer appends to documents.

    Attributes:
        path: the tokenizer.json file.
        eos_id: id appended after every document when packing.
        eos_token: its string form.
        vocab_size: number of ids, added tokens included (every id is < vocab_size).
        hash: :func:`tokenizer_hash` of the file; recorded in the shards' meta.json.
    """

    def __init__(self, path: Union[str, Path], eos_token: Optional[str] = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {str(self.path)!r} does not exist (expected a tokenizer.json file)")
        try:
            self._tokenizer = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"tokenizer {str(self.path)!r} is not a valid HF tokenizer.json: {err}") from err
        self.eos_token = eos_token or self._find_eos_token()
        eos_id = self._tokenizer.token_to_id(self.eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {str(self.path)!r}: end-of-sequence token {self.eos_token!r} is not in "
                             "its vocabulary; pass eos_token= one of its special tokens")
        self.eos_id = int(eos_id)
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self.hash = tokenizer_hash(self.path)

    def _find_eos_token(self) -> str:
        # A tokenizer_config.json beside the file (transformers' save_pretrained layout) names it authoritatively.
        config = self.path.with_name("tokenizer_config.json")
        if config.is_file():
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and self._tokenizer.token_to_id(eos) is not None:
                return eos
        for candidate in EOS_CANDIDATES:
            if self._tokenizer.token_to_id(candidate) is not None:
                return candidate
        raise ValueError(f"tokenizer {str(self.path)!r}: found none of the end-of-sequence tokens "
                         f"{', '.join(EOS_CANDIDATES)}; pass eos_token= explicitly")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (the packer adds the EOS)."""
        # encode_batch_fast skips character offsets, which the pipeline never needs (tokenizers >= 0.21).
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


def load_tokenizer(path: Union[str, Path], eos_token: Optional[str] = None) -> Tokenizer:
    """Loads a ``tokenizer.json`` (a directory holding one is accepted too)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    return Tokenizer(path, eos_token=eos_token)


def _iter_training_texts(files_or_texts: Iterable[Union[str, os.PathLike]], max_bytes: Optional[int]) -> Iterator[str]:
    """Yields texts: ``os.PathLike`` items are read as UTF-8 files, ``str`` items are texts themselves."""
    seen_bytes = 0
    for item in files_or_texts:
        if isinstance(item, os.PathLike):
            try:
                text = Path(item).read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise FileNotFoundError(f"tokenizer training input {str(item)!r} cannot be read: {err}") from err
        elif isinstance(item, str):
            text = item
        else:
            raise TypeError(f"tokenizer training input {item!r}: expected a str (a text) or a pathlib.Path "
                            f"(a file), got {type(item).__name__}")
        if max_bytes is not None and seen_bytes >= max_bytes:
            return
        seen_bytes += len(text.encode("utf-8"))
        yield text


def train_bpe(
    files_or_texts: Iterable[Union[str, os.PathLike]],
    vocab_size: int,
    output_path: Optional[Union[str, Path]] = None,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    max_bytes: Optional[int] = None,
    show_progress: bool = False,
) -> Path:
    """Trains a byte-level BPE (GPT-2 pre-tokenization, all 256 bytes in the base alphabet) and saves it.

    Deterministic: the same texts in the same order give a byte-identical tokenizer.json, whatever the number
    of threads (HF tokenizers breaks merge ties by pair, not by hash order; checked in the tests).

    Args:
        files_or_texts: ``pathlib.Path`` items are files (read whole, UTF-8), ``str`` items are texts.
        vocab_size: ids in the result, special tokens and the 256 byte tokens included.
        output_path: where to write tokenizer.json; None: the system temp dir, named by the content hash.
        min_frequency: pairs seen fewer times are never merged.
        special_tokens: added first (ids 0, 1, ...); the first is the end-of-sequence token.
        max_bytes: stop reading input after this many bytes (None: all).
    Returns:
        The path of the written tokenizer.json.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 byte tokens + "
                         f"{len(special_tokens)} special tokens = {minimum}")
    if not special_tokens:
        raise ValueError("special_tokens is empty: the first special token is the end-of-sequence token")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_iter_training_texts(files_or_texts, max_bytes), trainer)
    serialized = tokenizer.to_str(pretty=True)
    if output_path is None:
        digest = hashlib.sha256(serialized.encode("utf-8")).hexdigest()[:16]
        output_path = Path(tempfile.gettempdir()) / f"ssa_megatron-bpe-{digest}.json"
    output_path = Path(output_path).expanduser()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a reader never sees half a file (several ranks may share the path).
    tmp = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}")
    tmp.write_text(serialized, encoding="utf-8")
    os.replace(tmp, output_path)
    return output_path
