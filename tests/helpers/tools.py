"""The command-line tools loaded in-process (their ``main(argv)`` called directly) and a word-level tokenizer for
held-out text in tool tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parent.parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def word_tokenizer(path: Path) -> Path:
    """A word-level ``tokenizer.json`` at ``path``: ``<|endoftext|>`` (id 0, also the unknown word) and w0..w99."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path
