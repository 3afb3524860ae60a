"""What a run's data says about its plan: another file, another token count, examples the plan's sequence
length truncates. ftplan shows these with every run's start, whatever the backend, and the summary keeps them:
the plan's time and cost were worked out for the data it was made with."""

from __future__ import annotations

from pathlib import Path

from ftplan.data import dataset
from ftplan.errors import PlannerError
from ftplan.plan import Plan
from ftplan.run.backend import RunRequest

# Counting a large file takes a while; the run's start and execute() both ask, so each file is counted once
# (keyed by its path, size and modification time, and what the count depends on).
_COUNTED: dict[tuple, dataset.TokenBudget] = {}


def _tokenizer(plan: Plan, request: RunRequest) -> Path | None:
    """The tokenizer the plan counted with where it is here: --model-path's, else the plan's local model's."""
    candidates = [Path(p).expanduser() for p in (request.model_path, plan.model.local_dir) if p]
    return dataset.find_tokenizer(*(c for c in candidates if c.exists()))


def _budget(plan: Plan, request: RunRequest) -> dataset.TokenBudget:
    t, path = plan.training, request.data
    tokenizer = _tokenizer(plan, request)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, t.setup.seq_len, t.packing, str(tokenizer))
    if key not in _COUNTED:
        _COUNTED[key] = dataset.from_dataset(path, t.setup.seq_len, packing=t.packing, tokenizer=tokenizer)
    return _COUNTED[key]


def _same_file(planned: str, data: Path) -> bool:
    try:
        return Path(planned).expanduser().resolve() == data.resolve()
    except OSError:
        return False


def data_notes(plan: Plan, request: RunRequest) -> list[str]:
    """The differences between `request.data` and the data the plan was made for, and the examples the plan's
    sequence length truncates; empty when there is nothing to say (or the data is a saved dataset folder)."""
    t, data = plan.training, request.data
    if data is None or not data.is_file():
        return []
    try:
        budget = _budget(plan, request)
    except PlannerError as exc:  # the backend reads the data its own way and refuses what it cannot train on
        return [f"ftplan could not count {data} as the plan did: {exc}"]
    notes = []
    if t.data_source == "--tokens":
        if budget.tokens != t.data_tokens:
            notes.append(f"the plan was made for --tokens {t.data_tokens:,}; {data} holds {budget.tokens:,} tokens "
                         f"({budget.counting}): the plan's time and cost are for {t.data_tokens:,}")
    else:
        if not _same_file(t.data_source, data):
            notes.append(f"the plan was made with {t.data_source}; this run trains on {data}")
        if budget.tokens != t.data_tokens:
            notes.append(f"{data} holds {budget.tokens:,} tokens after truncation ({budget.counting}); the plan's "
                         f"time and cost are for {t.data_tokens:,}")
    if budget.truncated_examples:
        longest = budget.lengths.max if budget.lengths else 0
        notes.append(f"{budget.truncated_examples:,} of {budget.examples:,} examples are longer than the plan's "
                     f"sequence length {t.setup.seq_len} and are truncated (longest {longest:,} tokens)")
    if budget.dropped_examples:
        notes.append(f"{budget.dropped_examples:,} examples have nothing to learn once truncated to "
                     f"{t.setup.seq_len} tokens (the prompt fills the sequence) and are left out")
    return notes
