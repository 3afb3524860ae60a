"""A tiny Llama-architecture model, a tokenizer trained on its own text, and datasets - everything
`ftplan run` needs, made locally in seconds (nothing is downloaded). The README's loop and the tests
use it.

Usage: python examples/tiny_model.py DIR   (writes DIR/tiny/ and DIR/train.jsonl)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the cat sat on the mat and the dog ran to the park while a bird sang in the tree "
         "one two three four five six seven eight nine ten red green blue yellow").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ eos_token }}{% endfor %}")


def sentences(n: int, seed: int = 0) -> list[str]:
    """Repetitive text a tiny model learns quickly: counting runs and fixed phrases."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, 8)
        out.append(" ".join(WORDS[start:start + rng.randrange(6, 14)]))
    return out


def make_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|user|>",
                                                                  "<|assistant|>"])
    tok.train_from_iterator(sentences(200) + [" ".join(WORDS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def make_model(directory: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors (random weights) + tokenizer in `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    make_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def text_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    return write_jsonl(path, [{"text": s} for s in sentences(n, seed)])


def prompt_data(path: Path, n: int = 32) -> Path:
    return write_jsonl(path, [{"prompt": s[:12], "completion": s[12:]} for s in sentences(n, 1)])


def chat_data(path: Path, n: int = 32) -> Path:
    return write_jsonl(path, [{"messages": [{"role": "user", "content": s[:10]},
                                            {"role": "assistant", "content": s[10:]}]} for s in sentences(n, 2)])


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python examples/tiny_model.py DIR")
    root = Path(sys.argv[1])
    make_model(root / "tiny")
    text_data(root / "train.jsonl", n=64)
    print(f"wrote {root / 'tiny'} (tiny Llama, random weights, BPE tokenizer) and {root / 'train.jsonl'}")
