"""The hf backend's training data: indexed once, read on demand, and exactly what tokenizing everything up
front gives - padded or packed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from examples import tiny_model  # noqa: E402
from ftplan.backends.hf import data  # noqa: E402
from ftplan.errors import PlannerError  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    tiny_model.make_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def mixed(path, n=40):
    rows = []
    for i, s in enumerate(tiny_model.sentences(n, seed=4)):
        if i % 3 == 0:
            rows.append({"text": s})
        elif i % 3 == 1:
            rows.append({"prompt": s * 3, "completion": " ok"})  # long prompts: some lose every label to truncation
        else:
            rows.append({"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": "yes"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def eager(rows, tokenizer, seq_len):
    """What the backend did before it streamed: every record tokenized, the unlearnable dropped."""
    out = [data.encode(r, tokenizer, seq_len, "x") for r in rows]
    return [(i, lab) for i, lab in out if any(x != data.IGNORE for x in lab[1:])]


def eager_pack(examples, seq_len):
    ids, labels = [], []
    for i, lab in examples:
        ids += i
        labels += lab
    return [(ids[k:k + seq_len], labels[k:k + seq_len]) for k in range(0, len(ids), seq_len)
            if any(x != data.IGNORE for x in labels[k + 1:k + seq_len])]


@pytest.mark.parametrize("seq_len", [12, 64])
def test_indexed_examples_equal_tokenizing_everything_up_front(tmp_path, tokenizer, seq_len):
    rows = mixed(tmp_path / "d.jsonl")
    reference = eager(rows, tokenizer, seq_len)
    examples = data.Examples(tmp_path / "d.jsonl", tokenizer, seq_len)
    assert len(examples) == len(reference) and (seq_len > 20 or len(reference) < len(rows))
    order = list(range(len(examples)))[::-1]
    assert examples.take(order) == [reference[i] for i in order]
    packed = data.Packed(examples, seq_len)
    expected = eager_pack(reference, seq_len)
    assert packed.take(list(range(len(packed)))) == expected


def test_the_index_holds_no_text(tmp_path, tokenizer):
    mixed(tmp_path / "d.jsonl")
    examples = data.Examples(tmp_path / "d.jsonl", tokenizer, 64)
    held = [v for v in vars(examples).values() if isinstance(v, (list, dict, str, bytes))]
    assert held == [str(tmp_path / "d.jsonl")]  # arrays of offsets and lengths, the path, nothing else


def test_data_edited_during_a_run_is_noticed(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one two three"}\n{"text": "four five"}\n')
    examples = data.Examples(path, tokenizer, 64)
    path.write_text('{"text": "one two three four five six seven"}\n{"text": "four five"}\n')
    with pytest.raises(PlannerError, match="changed while"):
        examples.take([0, 1])
