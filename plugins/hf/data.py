"""Training data for the Hugging Face backend: records -> token ids and labels, packed or padded.

Formats: JSONL (or a `datasets` directory) with `text`; `prompt`/`completion` (loss on the
completion only); chat `messages` rendered by the tokenizer's chat template (loss on the whole
conversation). Examples are truncated to the plan's sequence length.

Memory does not hold the raw file, nor its tokens: one pass indexes the data (where each record
is, how many tokens it keeps, how many of those are prompt), tokenizing in batches; a micro-batch
then re-reads and re-tokenizes its own records when it is drawn. The index costs 16 bytes per
example, whatever the file's size; packing adds the list of packed sequences that have labels.
"""

from __future__ import annotations

import bisect
from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator

from ftplan.api import (
    PlannerError,
    check_training_data,
    example_text,
    iter_record_offsets,
    open_dataset,
    record_at,
    record_kind,
)

IGNORE = -100  # label value the loss skips
BATCH_CHARS = 1 << 20  # characters tokenized at once while indexing: bounds the lists of token ids held


class Records:
    """The records of a JSONL file (keyed by byte offset) or a saved `datasets` directory (by row)."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            check_training_data(path)  # a JSONL file is validated line by line as it is scanned
        self.path = path
        self.rows = None
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
            if not len(loaded):
                raise PlannerError(f"dataset {path} is empty")
            self.rows = loaded

    def scan(self) -> Iterator[tuple[int, dict[str, Any], str, int]]:
        """(key, record, where, characters of its text) for every record, in order."""
        if self.rows is not None:
            for i in range(len(self.rows)):
                record, where = dict(self.rows[i]), f"{self.path}, record {i + 1}"
                yield i, record, where, len(example_text(record, where))
            return
        for number, offset, record, text in iter_record_offsets(self.path):
            yield offset, record, f"{self.path}, line {number}", len(text)

    def get(self, keys: Iterable[int]) -> list[dict[str, Any]]:
        """The records at `keys` (what `scan` gave)."""
        if self.rows is not None:
            return [dict(self.rows[k]) for k in keys]
        with open_dataset(self.path) as handle:
            return [record_at(handle, self.path, k) for k in keys]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record (for small data and tests; training reads them on demand)."""
    return [record for _, record, _, _ in Records(path).scan()]


def _chat_template_problem(tokenizer, where: str) -> PlannerError:
    return PlannerError(f"{where}: chat 'messages' need a tokenizer with a chat template; this one has none (add "
                        "chat_template to tokenizer_config.json or use text/prompt+completion)")


def encode_batch(records: list[dict[str, Any]], tokenizer, seq_len: int,
                 wheres: list[str]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each record, truncated to `seq_len`, ending with EOS when it fits; the
    tokenizer is called once per kind of text, for the whole batch."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    jobs: dict[tuple[str, bool], list[str]] = {("text", True): [], ("prompt", True): [], ("completion", False): [],
                                                ("chat", False): []}
    plan = []
    for record, where in zip(records, wheres):
        kind = record_kind(record)
        if kind == "text":
            plan.append(("text", len(jobs["text", True])))
            jobs["text", True].append(record["text"])
        elif kind == "pair":
            plan.append(("pair", len(jobs["prompt", True])))
            jobs["prompt", True].append(record["prompt"])
            jobs["completion", False].append(record["completion"])
        elif kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise _chat_template_problem(tokenizer, where)
            plan.append(("chat", len(jobs["chat", False])))
            jobs["chat", False].append(tokenizer.apply_chat_template(record["messages"], tokenize=False))
        else:
            raise PlannerError(f"{where}: no 'text', 'prompt'+'completion' or 'messages' field")
    ids_of = {key: tokenizer(texts, add_special_tokens=key[1], return_attention_mask=False)["input_ids"]
              if texts else [] for key, texts in jobs.items()}
    out = []
    for kind, i in plan:
        if kind == "text":
            ids = ids_of["text", True][i] + eos
            labels = list(ids)
        elif kind == "pair":
            prompt, completion = ids_of["prompt", True][i], ids_of["completion", False][i] + eos
            ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        else:
            ids = ids_of["chat", False][i]
            labels = list(ids)
        out.append((ids[:seq_len], labels[:seq_len]))
    return out


def encode(record: dict[str, Any], tokenizer, seq_len: int, where: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record (see encode_batch)."""
    return encode_batch([record], tokenizer, seq_len, [where])[0]


def _learnable(labels: list[int]) -> bool:
    return any(label != IGNORE for label in labels[1:])


class Examples:
    """Tokenized examples, indexed once and read on demand; records with nothing to learn from (every label
    ignored after truncation) are left out."""

    def __init__(self, path: Path, tokenizer, seq_len: int) -> None:
        self.records, self.tokenizer, self.seq_len, self.source = Records(path), tokenizer, seq_len, str(path)
        self.keys, self.lengths, self.prompts = array("q"), array("i"), array("i")
        batch: list[tuple[int, dict, str]] = []
        size = 0
        for key, record, where, chars in self.records.scan():
            batch.append((key, record, where))
            size += chars
            if size >= BATCH_CHARS or len(batch) >= 4096:
                self._index(batch)
                batch, size = [], 0
        self._index(batch)
        if not self.keys:
            raise PlannerError(f"{path}: no example has tokens to train on after truncation to {seq_len}")

    def _index(self, batch: list[tuple[int, dict, str]]) -> None:
        if not batch:
            return
        encoded = encode_batch([r for _, r, _ in batch], self.tokenizer, self.seq_len, [w for _, _, w in batch])
        for (key, _, _), (ids, labels) in zip(batch, encoded):
            if _learnable(labels):
                self.keys.append(key)
                self.lengths.append(len(ids))
                self.prompts.append(next((i for i, label in enumerate(labels) if label != IGNORE), len(labels)))

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, indices: list[int]) -> list[tuple[list[int], list[int]]]:
        """The examples at `indices`, read and tokenized now."""
        keys = [self.keys[i] for i in indices]
        encoded = encode_batch(self.records.get(keys), self.tokenizer, self.seq_len,
                               [f"{self.source}, example {i + 1}" for i in indices])
        for i, (ids, _) in zip(indices, encoded):
            if len(ids) != self.lengths[i]:
                raise PlannerError(f"{self.source} changed while training read it (example {i + 1}); do not edit "
                                   "the data during a run")
        return encoded


class Packed:
    """Examples concatenated and cut into sequences of `seq_len`; sequences without a label to learn (all
    prompt) are left out. Each sequence is assembled from its examples when drawn."""

    def __init__(self, examples: Examples, seq_len: int) -> None:
        self.examples, self.seq_len = examples, seq_len
        self.starts = array("q", [0])
        for n in examples.lengths:
            self.starts.append(self.starts[-1] + n)
        total = self.starts[-1]
        marked = bytearray((total + seq_len - 1) // seq_len)
        for i, n in enumerate(examples.lengths):  # learnable positions [start + prompt, start + n)
            first, end = self.starts[i] + examples.prompts[i], self.starts[i] + n
            for chunk in range(first // seq_len, (end - 1) // seq_len + 1):
                # a label counts from the chunk's second position on, as the loss shifts by one
                if max(first, chunk * seq_len + 1) < min(end, (chunk + 1) * seq_len):
                    marked[chunk] = 1
        self.chunks = array("q", (k for k, m in enumerate(marked) if m))

    def __len__(self) -> int:
        return len(self.chunks)

    def take(self, indices: list[int]) -> list[tuple[list[int], list[int]]]:
        """The packed sequences at `indices`, assembled from the examples they overlap."""
        out = []
        for i in indices:
            a = self.chunks[i] * self.seq_len
            b = min(a + self.seq_len, self.starts[-1])
            first, last = bisect.bisect_right(self.starts, a) - 1, bisect.bisect_left(self.starts, b)
            ids, labels = [], []
            for x, y in self.examples.take(list(range(first, last))):
                ids += x
                labels += y
            offset = a - self.starts[first]
            out.append((ids[offset:offset + b - a], labels[offset:offset + b - a]))
        return out


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
