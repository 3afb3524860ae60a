"""Training data as a token budget: how many tokens, how long the examples are, what padding costs.

Reads JSONL with `text`, `prompt`/`completion` or chat `messages`. Tokens are counted with the
model's tokenizer when one is available locally (a tokenizer.json, read with the `tokenizers`
package), otherwise approximated from the character count - and the report says which.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, Field, PrivateAttr

from ftplan.errors import PlannerError


def _approximate(texts: list[str], why: str = "no tokenizer available locally") -> tuple[list[int], str]:
    """Token counts from characters, at catalogs/planning.json's characters per token, labelled as approximate."""
    from ftplan.data import catalog

    per_token = catalog.planning().dataset.chars_per_token
    return [math.ceil(len(t) / per_token) for t in texts], f"approximate: 1 token per {per_token:g} characters ({why})"


class LengthStats(BaseModel):
    """Distribution of example lengths in tokens (before truncation)."""

    min: int
    p50: int
    p90: int
    p99: int
    max: int
    mean: float


class TokenBudget(BaseModel):
    """The data one epoch trains on, in sequences and tokens."""

    source: str = Field(description="'--tokens' or the dataset path")
    counting: str = Field(description="how tokens were counted (tokenizer, approximation, or given)")
    seq_len: int
    packing: bool
    examples: int = Field(description="examples in the file (for --tokens: packed sequences)")
    tokens: int = Field(description="tokens trained on per epoch, after truncation to seq_len")
    truncated_examples: int = 0
    lengths: LengthStats | None = None
    padded_tokens_unpacked: int | None = Field(None, description="tokens processed with padding to the longest "
                                                                  "example of each micro-batch of 8, without packing")
    _lengths: list[int] = PrivateAttr(default_factory=list)

    def sequences(self) -> int:
        """Sequences per epoch: packed ones fill seq_len; otherwise one per example."""
        return math.ceil(self.tokens / self.seq_len) if self.packing else self.examples

    def processed_tokens(self, micro_batch: int) -> int:
        """Tokens the GPUs process per epoch, padding included (the compute is spent on pads too)."""
        if self.packing or not self._lengths:
            return self.sequences() * self.seq_len if self.packing else self.tokens
        return padded_tokens(self._lengths, micro_batch)

    def padding_waste(self, micro_batch: int) -> float:
        processed = self.processed_tokens(micro_batch)
        return 1 - self.tokens / processed if processed else 0.0


def padded_tokens(lengths: list[int], micro_batch: int) -> int:
    """Tokens after padding each micro-batch (in file order) to its longest example."""
    return sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
               for i in range(0, len(lengths), micro_batch))


def from_token_count(tokens: int, seq_len: int) -> TokenBudget:
    """A budget of `tokens` packed into full sequences."""
    if tokens <= 0:
        raise PlannerError(f"--tokens must be a positive number of tokens, got {tokens}")
    return TokenBudget(source="--tokens", counting="given", seq_len=seq_len, packing=True,
                       examples=math.ceil(tokens / seq_len), tokens=tokens)


def example_text(record: object, where: str) -> str:
    """The text an example trains on: `text`, `prompt` + `completion`, or the `messages` contents."""
    if not isinstance(record, dict):
        raise PlannerError(f"{where}: expected a JSON object with 'text', 'prompt'/'completion' or 'messages', "
                           f"got {type(record).__name__}")
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record["prompt"] + record["completion"]
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        parts = []
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise PlannerError(f"{where}: messages[{i}] needs string 'role' and 'content'")
            parts.append(f"{m['role']}: {m['content']}\n")
        return "".join(parts)
    raise PlannerError(f"{where}: no 'text', 'prompt'+'completion' or 'messages' field (keys: "
                       f"{', '.join(sorted(record)) or 'none'}); use one of those formats")


def read_records(path: Path) -> list[dict]:
    """Every record of a JSONL file, each checked to hold a training format; PlannerError naming the
    line for anything malformed."""
    if path.is_dir():
        raise PlannerError(f"dataset {path} is a directory; pass a .jsonl file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PlannerError(f"dataset {path} does not exist; check the path") from None
    except OSError as exc:
        raise PlannerError(f"cannot read dataset {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise PlannerError(f"dataset {path}, line {line}: not UTF-8 text; re-encode the file as UTF-8") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlannerError(f"dataset {path}, line {number}: invalid JSON ({exc.msg}); "
                               "each line must be one JSON object") from None
        example_text(record, f"dataset {path}, line {number}")  # raises for a record with no known format
        records.append(record)
    if not records:
        raise PlannerError(f"dataset {path} is empty; it needs one JSON object per line")
    return records


def read_examples(path: Path) -> list[str]:
    """Every example's text from a JSONL file."""
    return [example_text(r, str(path)) for r in read_records(path)]


def is_saved_dataset(path: Path) -> bool:
    """A directory written by Hugging Face datasets' save_to_disk."""
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def check_training_data(path: Path) -> None:
    """Validate training data before anything is written: every JSONL line, or a saved datasets directory."""
    if path.is_dir():
        if not is_saved_dataset(path):
            raise PlannerError(f"{path} is a directory but not a saved Hugging Face dataset (no dataset_info.json); "
                               "pass a .jsonl file or a save_to_disk directory")
        return
    read_records(path)


def find_tokenizer(*candidates: Path | None) -> Path | None:
    """The first tokenizer.json among `candidates` (files or directories holding one)."""
    for c in candidates:
        if c is None:
            continue
        path = c / "tokenizer.json" if c.is_dir() else c
        if path.name == "tokenizer.json" and path.is_file():
            return path
    return None


def count_tokens(texts: list[str], tokenizer: Path | None) -> tuple[list[int], str]:
    """Token count of each text, and how it was counted."""
    if tokenizer is not None:
        try:
            from tokenizers import Tokenizer  # a Rust library, no torch; present with transformers
        except ImportError:
            return _approximate(texts, "no tokenizer available locally; install tokenizers")
        try:
            tok = Tokenizer.from_file(str(tokenizer))
        except Exception as exc:  # the Rust error types are not importable; any failure is unreadable input
            raise PlannerError(f"cannot read tokenizer {tokenizer}: {exc}") from None
        return [len(e.ids) for e in tok.encode_batch(texts)], f"tokenizer {tokenizer}"
    return _approximate(texts)


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def from_dataset(path: Path, seq_len: int, *, packing: bool = False, tokenizer: Path | None = None) -> TokenBudget:
    """The token budget of a JSONL dataset, truncating each example to `seq_len`."""
    lengths, counting = count_tokens(read_examples(path), tokenizer)
    kept = [min(n, seq_len) for n in lengths]
    ordered = sorted(lengths)
    budget = TokenBudget(
        source=str(path), counting=counting, seq_len=seq_len, packing=packing, examples=len(lengths),
        tokens=sum(kept), truncated_examples=sum(n > seq_len for n in lengths),
        lengths=LengthStats(min=ordered[0], p50=_percentile(ordered, 0.5), p90=_percentile(ordered, 0.9),
                            p99=_percentile(ordered, 0.99), max=ordered[-1], mean=sum(lengths) / len(lengths)),
        padded_tokens_unpacked=padded_tokens(kept, 8),
    )
    budget._lengths = kept
    return budget
