"""Token budgets from --tokens and from JSONL datasets: counting, lengths, padding, packing, errors."""

import json
from pathlib import Path

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
    # training shuffles: of the 6 equally likely pairs only {2, 2} pads to 2, so E[longest] = (2 + 5 x 8) / 6 = 7
    assert unpacked.processed_tokens(2) == 28 and unpacked.padding_waste(2) == pytest.approx(1 - 20 / 28)
    assert unpacked.padded_tokens_unpacked == 32  # a micro-batch of 8 holds all four: 4 x 8
    packed = from_dataset(path, seq_len=8, packing=True)
    assert packed.sequences() == 3 and packed.processed_tokens(2) == 24


def test_counts_with_a_local_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world hello"}, {"text": "world world"},
                                              {"text": "world"}])  # one token: nothing to learn, left out
    b = from_dataset(path, seq_len=16, tokenizer=find_tokenizer(tmp_path))
    assert b.counting.startswith("tokenizer") and b.tokens == 5 and b.examples == 2 and b.dropped_examples == 1


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


def test_expected_padding_is_the_mean_over_every_shuffle():
    from itertools import permutations

    from ftplan.data.dataset import expected_max

    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    histogram = {n: lengths.count(n) for n in set(lengths)}
    for micro in (1, 2, 3, 4, 8):
        orders = list(permutations(lengths))[::97]  # every 97th of the 40320 orders: an unbiased spread
        brute = sum(max(order[:micro]) for order in orders) / len(orders)
        assert expected_max(histogram, micro) == pytest.approx(brute, rel=0.02), micro
    assert expected_max(histogram, 1) == pytest.approx(sum(lengths) / len(lengths))


def test_lines_are_split_on_newline_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two\x85three\u2029four"}, ensure_ascii=False) + "\n"
                    + json.dumps({"text": "five six seven"}) + "\n", encoding="utf-8")
    budget = from_dataset(path, seq_len=64)
    assert budget.examples == 2


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_files_that_are_not_regular_are_refused_without_reading(tmp_path, kind):
    import os
    import socket
    import threading

    path = tmp_path / "data.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path = Path("/dev/zero")
    outcome = {}

    def attempt():
        try:
            from_dataset(path, seq_len=8)
        except PlannerError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "reading a non-regular file blocked"
    assert "not a regular file" in outcome["error"]


def test_a_line_beyond_the_cap_is_refused_before_it_is_held(tmp_path, monkeypatch):
    from ftplan.data import jsonl

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "x" * 5000}])
    with pytest.raises(PlannerError, match="line 2: longer than"):
        from_dataset(path, seq_len=8)


@pytest.mark.parametrize("order", ["shuffled", "sorted by length"])
def test_a_sample_estimates_the_tokens_within_its_stated_error(tmp_path, order):
    import random

    rng = random.Random(3)
    rows = [{"text": "w" * rng.randrange(10, 1000)} for _ in range(20000)]
    if order != "shuffled":
        rows.sort(key=lambda r: len(r["text"]))  # neighbours alike: sampling "the next line" would be biased
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    exact = from_dataset(path, seq_len=128, counting="exact")
    sampled = from_dataset(path, seq_len=128, counting="sample")
    assert sampled.sampled and "sampled" in sampled.counting and "95% confidence" in sampled.counting
    assert 0 < sampled.error_percent <= 1.0
    assert abs(sampled.tokens - exact.tokens) / exact.tokens < 0.01
    assert sampled.examples == exact.examples == 20000
    assert abs(sampled.truncated_examples - exact.truncated_examples) / exact.truncated_examples < 0.05
    assert not exact.sampled and exact.error_percent is None


@pytest.mark.parametrize("seq_len", [8, 512])
def test_planned_tokens_are_the_tokens_the_hf_backend_trains_on(tmp_path, seq_len):
    """The plan counts with tokenizers alone (no torch); the backend encodes with transformers and appends the
    EOS the tokenizer names: both must give the same total, truncation included."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from examples import tiny_model
    from ftplan.backends.hf.data import encode_batch

    tiny_model.make_tokenizer(tmp_path / "tok")
    for make in (tiny_model.text_data, tiny_model.prompt_data):
        path = make(tmp_path / f"{make.__name__}.jsonl")
        planned = from_dataset(path, seq_len=seq_len, tokenizer=find_tokenizer(tmp_path / "tok"))
        assert "+1 end-of-sequence" in planned.counting
        records = [json.loads(line) for line in path.read_text().splitlines()]
        trained = encode_batch(records, AutoTokenizer.from_pretrained(tmp_path / "tok"), seq_len,
                               [str(i) for i in range(len(records))])
        assert planned.tokens == sum(len(ids) for ids, _ in trained), make.__name__


CHATML = ("{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role') }}{% endif %}{% if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' }}{% generation %}{{ message['content'] | trim }}"
          "{% endgeneration %}{{ '<|im_end|>' + '\\n' }}{% endfor %}{{ eos_token }}")


@pytest.mark.parametrize("template", ["tiny", "chatml"])
def test_planned_chat_tokens_are_the_tokens_the_hf_backend_trains_on(tmp_path, template):
    """Chat examples are counted through the tokenizer's own template, rendered as transformers renders it."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from examples import tiny_model
    from ftplan.backends.hf.data import encode_batch

    tiny_model.make_tokenizer(tmp_path / "tok")
    if template == "chatml":
        (tmp_path / "tok" / "chat_template.jinja").write_text(CHATML)
    path = tiny_model.chat_data(tmp_path / "chat.jsonl")
    for seq_len in (16, 4096):
        planned = from_dataset(path, seq_len=seq_len, tokenizer=find_tokenizer(tmp_path / "tok"))
        assert "role: content" not in planned.counting
        records = [json.loads(line) for line in path.read_text().splitlines()]
        trained = encode_batch(records, AutoTokenizer.from_pretrained(tmp_path / "tok"), seq_len,
                               [str(i) for i in range(len(records))])
        assert planned.tokens == sum(len(ids) for ids, _ in trained), seq_len


def test_a_chat_template_that_refuses_an_example_is_one_clear_error(tmp_path):
    pytest.importorskip("jinja2")
    from examples import tiny_model

    tiny_model.make_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(CHATML)
    path = tiny_model.write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(PlannerError, match="refuses an example: unknown role"):
        from_dataset(path, seq_len=64, tokenizer=find_tokenizer(tmp_path / "tok"))


def _rewrite_config(folder: Path, variant: str) -> None:
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if variant == "special_tokens_map":  # the older layout: the EOS named only there
        (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": config.pop("eos_token")}))
    elif variant == "class_default":  # GPT-2's Hub files name no EOS; transformers takes the class's
        config.pop("eos_token")
        config["tokenizer_class"] = "GPT2TokenizerFast"
        tok = json.loads((folder / "tokenizer.json").read_text())
        tok["added_tokens"].append({"id": len(tok["model"]["vocab"]), "content": "<|endoftext|>", "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False, "special": True})
        tok["model"]["vocab"]["<|endoftext|>"] = len(tok["model"]["vocab"])
        (folder / "tokenizer.json").write_text(json.dumps(tok))
    elif variant == "none":
        config["eos_token"] = None
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("variant", ["special_tokens_map", "class_default", "none"])
def test_the_eos_is_found_where_transformers_finds_it(tmp_path, variant):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from examples import tiny_model
    from ftplan.backends.hf.data import encode_batch

    tiny_model.make_tokenizer(tmp_path / "tok")
    _rewrite_config(tmp_path / "tok", variant)
    path = tiny_model.text_data(tmp_path / "text.jsonl", n=16)
    planned = from_dataset(path, seq_len=512, tokenizer=find_tokenizer(tmp_path / "tok"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tokenizer.eos_token_id is None) == (variant == "none")
    trained = encode_batch(records, tokenizer, 512, [str(i) for i in range(len(records))])
    assert planned.tokens == sum(len(ids) for ids, _ in trained)


def test_examples_the_backend_leaves_out_are_not_planned(tmp_path):
    """A prompt as long as the sequence leaves nothing to learn: the hf backend drops the example, and so
    does the plan (tokens and examples), saying how many."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from examples import tiny_model
    from ftplan.backends.hf.data import Examples

    tiny_model.make_tokenizer(tmp_path / "tok")
    path = tiny_model.prompt_data(tmp_path / "pairs.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for seq_len in (4, 6, 64):
        planned = from_dataset(path, seq_len=seq_len, tokenizer=find_tokenizer(tmp_path / "tok"))
        trained = Examples(path, tokenizer, seq_len)
        assert planned.examples == len(trained) and planned.tokens == sum(trained.lengths), seq_len
        assert planned.dropped_examples == 32 - len(trained)
    assert planned.dropped_examples == 0 and from_dataset(path, seq_len=4, tokenizer=find_tokenizer(
        tmp_path / "tok")).dropped_examples > 0


def test_chat_data_with_a_tokenizer_without_a_template_is_refused_as_the_backend_refuses_it(tmp_path):
    from examples import tiny_model

    tiny_model.make_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").unlink()
    path = tiny_model.chat_data(tmp_path / "chat.jsonl")
    with pytest.raises(PlannerError, match="need a tokenizer with a chat template"):
        from_dataset(path, seq_len=64, tokenizer=find_tokenizer(tmp_path / "tok"))
