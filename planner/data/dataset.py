"""Training data as a token budget: how many tokens, how long the examples are, what padding costs.

Reads JSONL with `text`, `prompt`/`completion` or chat `messages` (planner/data/jsonl.py: one line at a
time, so memory does not grow with the file). Tokens are counted with the model's tokenizer when one is
available locally (a tokenizer.json, read with the `tokenizers` package, in batches), otherwise
approximated from the character count - and the report says which. A large file is sampled
(planner/data/sampling.py) with the estimated error stated, unless an exact count is asked for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Literal

from pydantic import BaseModel, Field, PrivateAttr

from ftplan.data import chat
from ftplan.data.jsonl import example_parts, example_text, iter_records, open_dataset, record_kind
from ftplan.errors import PlannerError

__all__ = ["TokenBudget", "LengthStats", "from_token_count", "from_dataset", "example_text", "read_records",
           "iter_records", "check_training_data", "is_saved_dataset", "find_tokenizer", "padded_tokens",
           "tokens_counter", "expected_max"]

Counting = Literal["auto", "exact", "sample"]
EXACT_UP_TO_BYTES = 64 * 2**20  # `auto` counts every line of files up to this size, samples larger ones
BATCH_CHARS = 2**20           # texts handed to the tokenizer at once: amortises the call, bounds what it returns


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
    counting: str = Field(description="how tokens were counted (tokenizer, approximation, or given; sampled or "
                                      "every line)")
    seq_len: int
    packing: bool
    examples: int = Field(description="examples in the file (for --tokens: packed sequences)")
    tokens: int = Field(description="tokens trained on per epoch, after truncation to seq_len")
    truncated_examples: int = 0
    dropped_examples: int = Field(0, description="examples the trainer leaves out, with nothing to learn once "
                                                 "truncated to seq_len (a prompt as long as the sequence); not in "
                                                 "`examples` (counted every line; a sample leaves them out of its "
                                                 "estimate)")
    lengths: LengthStats | None = None
    padded_tokens_unpacked: int | None = Field(None, description="tokens processed without packing when each "
                                                                  "shuffled micro-batch of 8 is padded to its "
                                                                  "longest example (expected value)")
    sampled: bool = Field(False, description="tokens estimated from a sample of the file's lines")
    error_percent: float | None = Field(None, description="sampled: the 95% confidence half-width of `tokens`, "
                                                          "in percent")
    # kept (truncated) length -> number of examples (or, sampled, estimated share): padding needs only this
    _histogram: dict[int, float] = PrivateAttr(default_factory=dict)
    _padded: dict[int, int] = PrivateAttr(default_factory=dict)

    def sequences(self) -> int:
        """Sequences per epoch: packed ones fill seq_len; otherwise one per example."""
        return math.ceil(self.tokens / self.seq_len) if self.packing else self.examples

    def processed_tokens(self, micro_batch: int) -> int:
        """Tokens the GPUs process per epoch, padding included (the compute is spent on pads too)."""
        if self.packing or not self._histogram:
            return self.sequences() * self.seq_len if self.packing else self.tokens
        if micro_batch not in self._padded:
            self._padded[micro_batch] = round(self.examples * expected_max(self._histogram, micro_batch,
                                                                           exact=not self.sampled))
        return max(self.tokens, self._padded[micro_batch])

    def padding_waste(self, micro_batch: int) -> float:
        processed = self.processed_tokens(micro_batch)
        return 1 - self.tokens / processed if processed else 0.0


def padded_tokens(lengths: list[int], micro_batch: int) -> int:
    """Tokens after padding each micro-batch (in the given order) to its longest example."""
    return sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
               for i in range(0, len(lengths), micro_batch))


def expected_max(histogram: dict[int, float], draws: int, *, exact: bool = True) -> float:
    """The expected longest of `draws` examples drawn at random (training shuffles them): without
    replacement from these counts when `exact`, else with replacement from this distribution (a sample)."""
    total = sum(histogram.values())
    if total <= 0:
        return 0.0
    draws = max(1, min(draws, int(total))) if exact else max(1, draws)
    expected, below, previous = 0.0, 0.0, 0.0
    for length in sorted(histogram):
        below += histogram[length]
        if exact:  # P(all draws <= length) = C(below, draws) / C(total, draws)
            p = 1.0
            for j in range(draws):
                p *= max(0.0, below - j) / (total - j)
        else:
            p = (below / total) ** draws
        expected += length * (p - previous)
        previous = p
    return expected


def from_token_count(tokens: int, seq_len: int) -> TokenBudget:
    """A budget of `tokens` packed into full sequences."""
    if tokens <= 0:
        raise PlannerError(f"--tokens must be a positive number of tokens, got {tokens}")
    return TokenBudget(source="--tokens", counting="given", seq_len=seq_len, packing=True,
                       examples=math.ceil(tokens / seq_len), tokens=tokens)


def read_records(path: Path) -> list[dict]:
    """Every record of a JSONL file, each checked to hold a training format; PlannerError naming the
    line for anything malformed. Holds the whole file: for small files - iterate `iter_records` otherwise."""
    records = [record for _, record, _ in iter_records(path)]
    if not records:
        raise PlannerError(f"dataset {path} is empty; it needs one JSON object per line")
    return records


def is_saved_dataset(path: Path) -> bool:
    """A directory written by Hugging Face datasets' save_to_disk."""
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def check_training_data(path: Path) -> int:
    """Validate training data before anything is written: every JSONL line (read one at a time), or a saved
    datasets directory. Returns the number of JSONL examples (0 for a datasets directory)."""
    if path.is_dir():
        if not is_saved_dataset(path):
            raise PlannerError(f"{path} is a directory but not a saved Hugging Face dataset (no dataset_info.json); "
                               "pass a .jsonl file or a save_to_disk directory")
        return 0
    count = sum(1 for _ in iter_records(path))
    if not count:
        raise PlannerError(f"dataset {path} is empty; it needs one JSON object per line")
    return count


def find_tokenizer(*candidates: Path | None) -> Path | None:
    """The first tokenizer.json among `candidates` (files or directories holding one)."""
    for c in candidates:
        if c is None:
            continue
        path = c / "tokenizer.json" if c.is_dir() else c
        if path.name == "tokenizer.json" and path.is_file():
            return path
    return None


Example = tuple[dict, str]  # a record and its example text, as jsonl.parse_line gives them


def tokens_counter(tokenizer: Path | None, seq_len: int | None = None) -> tuple[TokenCounter, str]:
    """A callable giving the token count of each example of a batch (None for one the trainer leaves out:
    nothing to learn once truncated to `seq_len`), and how it counts. With a tokenizer it counts what the hf
    backend trains on: a text, or a prompt with special tokens and its completion without, plus the
    end-of-sequence token it appends; chat messages through the tokenizer's chat template."""
    from ftplan.data import catalog

    per_token = catalog.planning().dataset.chars_per_token
    # approximate counts leave every example in: whether one is too short to learn from is the tokenizer's call
    approximate = TokenCounter(lambda texts, specials: [math.ceil(len(t) / per_token) for t in texts], None, 0, None)
    if tokenizer is None:
        return approximate, f"approximate: 1 token per {per_token:g} characters (no tokenizer available locally)"
    try:
        from tokenizers import Tokenizer  # a Rust library, no torch; present with transformers
    except ImportError:
        return approximate, (f"approximate: 1 token per {per_token:g} characters (no tokenizer available locally; "
                             "install tokenizers)")
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as exc:  # the Rust error types are not importable; any failure is unreadable input
        raise PlannerError(f"cannot read tokenizer {tokenizer}: {str(exc).splitlines()[0][:200]}") from None
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips the offsets nobody reads here
    eos = 1 if _eos_token(tokenizer) is not None else 0
    render = chat.renderer(tokenizer)
    how = f"tokenizer {tokenizer}" + (", +1 end-of-sequence token per example (the hf backend appends it)" if eos
                                      else "")
    lengths = lambda texts, specials: [len(e) for e in encode(texts, add_special_tokens=specials)]  # noqa: E731
    return TokenCounter(lengths, render, eos, seq_len, tokenizer), how


class TokenCounter:
    """count(batch): each example's token count, or None for one the trainer leaves out, from a function giving
    texts' token lengths with or without special tokens. What it had to approximate goes into `notes`."""

    def __init__(self, lengths: Callable[[list[str], bool], list[int]], render, eos: int, seq_len: int | None,
                 tokenizer: Path | None = None) -> None:
        self.lengths, self.render, self.eos, self.seq_len, self.tokenizer = lengths, render, eos, seq_len, tokenizer
        self.notes: set[str] = set()

    def __call__(self, batch: list[Example]) -> list[int | None]:
        firsts, rest, shapes = [], [], []  # shape: (has a part with special tokens, parts without, EOS added)
        for record, text in batch:
            if record_kind(record) == "chat" and self._chat(record, rest):
                shapes.append((False, 1, 0))
                continue
            parts = example_parts(record, text)
            firsts.append(parts[0])
            rest.extend(parts[1:])
            shapes.append((True, len(parts) - 1, self.eos))
        with_specials = iter(self.lengths(firsts, True) if firsts else [])
        without = iter(self.lengths(rest, False) if rest else [])
        out = []
        for first, n, extra in shapes:
            prompt = next(with_specials) if first else 0
            total = prompt + sum(next(without) for _ in range(n)) + extra
            # the hf backend keeps an example only if a label after the first survives truncation; a pair's
            # prompt is not learned from
            kept = min(total, self.seq_len or total)
            out.append(total if kept > max(1, prompt if n and first else 1) else None)
        return out

    def _chat(self, record: dict, rest: list[str]) -> bool:
        """Queue a chat record rendered by the chat template (which writes every special token itself) and say
        so; False when it is counted as plain text instead (no tokenizer, or no jinja2)."""
        if self.tokenizer is not None and self.render is None:
            raise PlannerError(f"chat 'messages' need a tokenizer with a chat template; {self.tokenizer} has none "
                               "(add chat_template to tokenizer_config.json, or use text or prompt+completion)")
        if callable(self.render):
            rest.append(self.render(record["messages"]))
            return True
        if self.render == chat.NO_JINJA:
            self.notes.add("chat messages counted as 'role: content' lines (rendering the chat template needs "
                           "jinja2)")
        return False


def _eos_token(tokenizer: Path) -> str | None:
    """The end-of-sequence token transformers gives the tokenizer beside `tokenizer` (the hf backend appends it
    to every text and completion): tokenizer_config.json's, else special_tokens_map.json's, else its
    tokenizer_class's default (catalogs/planning.json). A token the vocabulary lacks is added by transformers,
    so it counts as well."""
    from ftplan.data import catalog

    configs = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            loaded = json.loads((tokenizer.parent / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(loaded, dict):
            configs.append(loaded)
    for config in configs:
        if "eos_token" in config:
            eos = config["eos_token"]
            eos = eos.get("content") if isinstance(eos, dict) else eos
            return eos if isinstance(eos, str) and eos else None
    cls = next((c.get("tokenizer_class") for c in configs if isinstance(c.get("tokenizer_class"), str)), "")
    return catalog.planning().dataset.default_eos_tokens.get(cls.removesuffix("Fast"))


def _batches(path: Path) -> Iterable[list[Example]]:
    """The examples of every line, in batches of about BATCH_CHARS characters."""
    batch, size = [], 0
    for _, record, text in iter_records(path):
        batch.append((record, text))
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _percentile(histogram: dict[int, float], q: float) -> int:
    total, seen = sum(histogram.values()), 0.0
    for length in sorted(histogram):
        seen += histogram[length]
        if seen > q * total:
            return length
    return max(histogram)


def _stats(raw: dict[int, float]) -> LengthStats:
    total = sum(raw.values())
    return LengthStats(min=min(raw), p50=_percentile(raw, 0.5), p90=_percentile(raw, 0.9),
                       p99=_percentile(raw, 0.99), max=max(raw), mean=sum(k * v for k, v in raw.items()) / total)


def exact_histogram(path: Path, count: Callable[[list[Example]], list[int | None]]) -> tuple[dict[int, float], int]:
    """(token length -> number of examples, examples left out), over every line (read and tokenized in
    batches)."""
    raw: dict[int, float] = {}
    dropped = 0
    for batch in _batches(path):
        for n in count(batch):
            if n is None:
                dropped += 1
            else:
                raw[n] = raw.get(n, 0) + 1
    return raw, dropped


def from_dataset(path: Path, seq_len: int, *, packing: bool = False, tokenizer: Path | None = None,
                 counting: Counting = "auto") -> TokenBudget:
    """The token budget of a JSONL dataset, truncating each example to `seq_len`: every line counted, or
    (`sample`, or `auto` above EXACT_UP_TO_BYTES) a sample of lines with the error it implies."""
    with open_dataset(path) as handle:  # a FIFO, device or directory is refused here, before anything is read
        size = handle.seek(0, 2)
    count, how = tokens_counter(tokenizer, seq_len)
    sampled = counting == "sample" or (counting == "auto" and size > EXACT_UP_TO_BYTES)
    error = tokens = None
    if sampled:
        from ftplan.data.sampling import sample_histogram

        raw, examples, tokens, error, note = sample_histogram(path, count, seq_len)  # left out = blank lines
        how += f"; {note}"
        dropped = 0
    else:
        raw, dropped = exact_histogram(path, count)
        examples = int(sum(raw.values()))
        how += "; every line counted"
    how += "".join(f"; {note}" for note in sorted(count.notes))
    if (not examples or not raw) and dropped:
        raise PlannerError(f"dataset {path}: no example has tokens to train on after truncation to {seq_len} (every "
                           "prompt fills the sequence); raise --seq-len or shorten the prompts")
    if not examples or not raw:
        raise PlannerError(f"dataset {path} is empty; it needs one JSON object per line")
    share = examples / sum(raw.values())  # 1 when exact; sampled weights scale to the examples in the file
    kept: dict[int, float] = {}
    for n, weight in raw.items():
        kept[min(n, seq_len)] = kept.get(min(n, seq_len), 0) + weight * share
    if tokens is None:  # every line counted; a sample's total comes from its own (lower-variance) estimator
        tokens = round(sum(k * v for k, v in kept.items()))
    if tokens <= 0:
        raise PlannerError(f"dataset {path}: its examples hold no tokens; check the file and the tokenizer")
    budget = TokenBudget(source=str(path), counting=how, seq_len=seq_len, packing=packing, examples=examples,
                         tokens=tokens, truncated_examples=round(sum(v for n, v in raw.items() if n > seq_len) * share),
                         lengths=_stats(raw), sampled=sampled, error_percent=error, dropped_examples=dropped)
    budget._histogram = kept
    budget.padded_tokens_unpacked = budget.processed_tokens(8)
    return budget
