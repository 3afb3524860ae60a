"""Token budgets from --tokens and from JSONL datasets: counting, lengths, padding, packing, errors."""

import json

import pytest

from ftplan.data.dataset import find_tokenizer, from_dataset, from_token_count, padded_tokens
from ftplan.errors import PlannerError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_token_count_is_packed_into_full_sequences():
    b = from_token_count(10_000, 1024)
    assert (b.sequences(), b.processed_tokens(4), b.packing) == (10, 10 * 1024, True)


def test_padding_to_the_longest_of_each_micro_batch():
    assert padded_tokens([1, 5, 2, 2, 3], 2) == 10 + 4 + 3
    assert padded_tokens([1, 5, 2, 2, 3], 1) == 13


def test_approximate_counting_from_all_three_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "a" * 40},
        {"prompt": "b" * 20, "completion": "c" * 20},
        {"messages": [{"role": "user", "content": "x" * 10}, {"role": "assistant", "content": "y" * 10}]},
        "",
    ])
    b = from_dataset(path, seq_len=8)
    assert b.examples == 3
    assert b.counting.startswith("approximate")
    # 10 + 10 + ceil(len("user: xxxxxxxxxx\nassistant: yyyyyyyyyy\n") / 4) = 10 + 10 + 10; truncated to 8 each
    assert b.lengths.max == 10 and b.truncated_examples == 3 and b.tokens == 24
    assert b.processed_tokens(2) == 24 and b.padding_waste(2) == 0


def test_packing_and_padding_waste(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a" * 4 * n} for n in (2, 8, 2, 8)])
    unpacked = from_dataset(path, seq_len=8)
    assert unpacked.processed_tokens(2) == 32 and unpacked.padding_waste(2) == pytest.approx(1 - 20 / 32)
    packed = from_dataset(path, seq_len=8, packing=True)
    assert packed.sequences() == 3 and packed.processed_tokens(2) == 24


def test_counts_with_a_local_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world hello"}, {"text": "world"}])
    b = from_dataset(path, seq_len=16, tokenizer=find_tokenizer(tmp_path))
    assert b.counting.startswith("tokenizer") and b.tokens == 4


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ('{"text": "ok"}\n{"text": \n', "line 2: invalid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"body": "x"}\n', "line 1: no 'text'"),
    ('{"messages": [{"role": "user"}]}\n', "messages\\[0\\] needs string 'role' and 'content'"),
    (b'{"text": "ok"}\n{"text": "\xff"}\n', "line 2: not UTF-8"),
])
def test_bad_datasets_name_the_problem(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PlannerError, match=message):
        from_dataset(path, seq_len=8)


def test_a_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(PlannerError, match="is a directory"):
        from_dataset(tmp_path, seq_len=8)
