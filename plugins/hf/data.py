"""Training data for the Hugging Face backend: records -> token ids and labels, packed or padded.

Formats: JSONL (or a `datasets` directory) with `text`; `prompt`/`completion` (loss on the
completion only); chat `messages` rendered by the tokenizer's chat template (loss on the whole
conversation). Examples are truncated to the plan's sequence length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftplan.api import PlannerError, check_training_data
from ftplan.api import read_records as read_jsonl

IGNORE = -100  # label value the loss skips


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records from a JSONL file or a Hugging Face `datasets` directory (saved with save_to_disk)."""
    check_training_data(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise PlannerError("reading a datasets directory needs the datasets package: "
                               "pip install 'ftplan[train]'") from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise PlannerError(f"{path}: the dataset has no 'train' split (splits: {', '.join(loaded)})")
            loaded = loaded["train"]
        records = [dict(r) for r in loaded]
        if not records:
            raise PlannerError(f"dataset {path} is empty")
        return records
    return read_jsonl(path)


def encode(record: dict[str, Any], tokenizer, seq_len: int, where: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record, truncated to `seq_len`, ending with EOS when it fits."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(record.get("text"), str):
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos
        labels = list(ids)
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
    elif isinstance(record.get("messages"), list):
        if not getattr(tokenizer, "chat_template", None):
            raise PlannerError(f"{where}: chat 'messages' need a tokenizer with a chat template; this one has "
                               "none (add chat_template to tokenizer_config.json or use text/prompt+completion)")
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = list(ids)
    else:
        raise PlannerError(f"{where}: no 'text', 'prompt'+'completion' or 'messages' field")
    return ids[:seq_len], labels[:seq_len]


def tokenize(records: list[dict[str, Any]], tokenizer, seq_len: int, source: str) -> list[tuple[list[int], list[int]]]:
    """Every record encoded; records with nothing to learn from (all labels ignored) are dropped."""
    out = []
    for i, record in enumerate(records, start=1):
        ids, labels = encode(record, tokenizer, seq_len, f"{source}, record {i}")
        if any(label != IGNORE for label in labels[1:]):
            out.append((ids, labels))
    if not out:
        raise PlannerError(f"{source}: no example has tokens to train on after truncation to {seq_len}")
    return out


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples into full sequences of `seq_len` (the last one may be shorter)."""
    ids, labels = [], []
    for i, l in examples:
        ids += i
        labels += l
    return [(ids[k:k + seq_len], labels[k:k + seq_len]) for k in range(0, len(ids), seq_len)
            if any(x != IGNORE for x in labels[k + 1:k + seq_len])]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Pad a micro-batch to its longest sequence: pads get attention 0 and label -100."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
