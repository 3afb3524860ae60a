"""The CLI as a user meets it: output, --json schema, and one clear line for every bad input."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import TINY_LLAMA, run_cli


def test_estimate_all_methods_json_schema():
    result = run_cli("estimate", "llama2-7b", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert data["model"]["name"] == "llama2-7b" and data["model"]["counting"] == "analytic"
    assert [e["method"] for e in data["estimates"]] == ["full", "lora", "qlora"]
    for e in data["estimates"]:
        assert set(e) >= {"method", "total_params", "trainable_params", "memory", "setup", "cheapest_instances"}
        mem = e["memory"]
        assert isinstance(mem["peak_allocated_bytes"], int) and isinstance(mem["required_bytes"], int)
        assert mem["required_bytes"] > mem["peak_allocated_bytes"]
    assert data["estimates"][0]["total_params"] == 6_738_415_616


def test_estimate_table_shows_assumptions_and_prices():
    result = run_cli("estimate", "llama2-7b", "--method", "qlora")
    assert result.returncode == 0, result.stderr
    for text in ("6,738,415,616", "paged_adamw_32bit", "gradient checkpointing on", "2026-07-20", "g6.xlarge"):
        assert text in result.stdout


def test_sync_each_batch_shards_fsdp_gradients_under_accumulation():
    args = ("estimate", "llama2-7b", "--method", "full", "--gpus", "8", "--sharding", "fsdp", "--grad-accum", "4",
            "--json")
    trainer, synced = run_cli(*args), run_cli(*args, "--sync-each-batch")
    assert trainer.returncode == synced.returncode == 0, trainer.stderr + synced.stderr
    t, s = json.loads(trainer.stdout), json.loads(synced.stdout)
    assert (t["settings"]["sync_each_batch"], s["settings"]["sync_each_batch"]) == (False, True)
    held, shard = t["estimates"][0]["sharded"], s["estimates"][0]["sharded"]
    total = t["estimates"][0]["total_params"]
    # bf16 whole under no_sync; with sync_each_batch fp32 / 8, and this micro-batch's head gradient whole in bf16
    # at the peak (the layers' backward: the embeddings and head reduce last)
    head = 32000 * 4096 + 4096
    assert held["gradients_bytes"] == 2 * total and shard["gradients_bytes"] == 4 * total // 8 + 2 * head
    assert any("no_sync" in n for n in held["notes"]) and not any("no_sync" in n for n in shard["notes"])
    table = run_cli(*args[:-1])
    assert "no_sync" in table.stdout and "--sync-each-batch" in table.stdout
    moot = run_cli("estimate", "llama2-7b", "--method", "full", "--gpus", "8", "--sync-each-batch", "--json")
    assert any("--sync-each-batch changes nothing here" in a for a in json.loads(moot.stdout)["assumptions"])
    assert not any("changes nothing" in a for a in s["assumptions"])


def test_unquantized_layers_are_called_out_only_where_they_exist():
    falcon = run_cli("estimate", "falcon-7b", "--method", "qlora")
    assert "stay unquantized" in falcon.stdout
    llama = run_cli("estimate", "llama3-8b", "--method", "qlora")
    assert llama.returncode == 0 and "stay unquantized" not in llama.stdout


def test_hf_id_resolves_offline_from_catalog():
    result = run_cli("estimate", "meta-llama/Llama-2-7b-hf", "--method", "lora", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["source"] == "catalog"


def test_local_config_dir_and_file(write_config):
    directory = write_config(TINY_LLAMA)
    for arg in (str(directory), str(directory / "config.json")):
        result = run_cli("estimate", arg, "--method", "full", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["estimates"][0]["total_params"] > 0


def test_instance_verdict():
    fits = run_cli("estimate", "llama2-7b", "--method", "qlora", "--instance", "g5.xlarge")
    assert fits.returncode == 0 and "fits on g5.xlarge" in fits.stdout
    short = run_cli("estimate", "llama2-7b", "--method", "full", "--instance", "g5.xlarge")
    assert "does not fit on g5.xlarge" in short.stdout and "short by" in short.stdout


def test_layers_keeps_widths():
    data = json.loads(run_cli("estimate", "llama2-7b", "--layers", "2", "--method", "full", "--json").stdout)
    assert data["model"]["layers"] == 2 and data["model"]["hidden_size"] == 4096


def test_models_and_instances_lists():
    models = run_cli("models", "qwen", "--json")
    assert models.returncode == 0 and all("qwen" in m["name"] for m in json.loads(models.stdout))
    inst = run_cli("instances", "--gpu", "H100", "--json")
    rows = json.loads(inst.stdout)
    assert {r["type"] for r in rows} == {"p5.4xlarge", "p5.48xlarge"}
    assert all(p["date"] and p["source"] for r in rows for p in r["prices"])


BAD_CONFIGS = {
    "malformed JSON": ("{not json", "not valid JSON"),
    "JSON list": ("[1, 2]", "JSON object"),
    "missing model_type": (json.dumps({k: v for k, v in TINY_LLAMA.items() if k != "model_type"}), "model_type"),
    "zero layers": (json.dumps({**TINY_LLAMA, "num_hidden_layers": 0}), "num_hidden_layers"),
    "heads do not divide": (json.dumps({**TINY_LLAMA, "num_attention_heads": 5, "num_key_value_heads": 5}),
                            "not divisible"),
    "kv heads do not divide": (json.dumps({**TINY_LLAMA, "num_key_value_heads": 3}), "multiple"),
    "string width": (json.dumps({**TINY_LLAMA, "hidden_size": "64"}), "hidden_size"),
    "no vocab": (json.dumps({k: v for k, v in TINY_LLAMA.items() if k != "vocab_size"}), "vocab_size"),
    # counted by transformers, whose config warnings (default token ids beyond this vocabulary) must not show
    "speech model": (json.dumps({**TINY_LLAMA, "model_type": "whisper"}), "'whisper' is an encoder-decoder model"),
    "vision-language model": (json.dumps({**TINY_LLAMA, "model_type": "qwen2_vl"}), "'qwen2_vl' is not a causal"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line(case, write_config):
    text, expected = BAD_CONFIGS[case]
    result = run_cli("estimate", str(write_config(text)))
    assert_one_line_error(result, expected)


BAD_ARGS = {
    "unknown model": (["estimate", "llama2-7x"], "Did you mean: llama2-7b"),
    "missing file": (["estimate", "./nope/config.json"], "no such file"),
    "dir without config": (["estimate", "."], "no config.json"),
    "uncached hub id offline": (["estimate", "someorg/some-model-xyz"], "connect to the network"),
    "bad target": (["estimate", "llama2-7b", "--lora-targets", "c_attn"], "q_proj"),
    "empty targets": (["estimate", "llama2-7b", "--lora-targets", ","], "empty"),
    "rank zero": (["estimate", "llama2-7b", "--lora-r", "0"], "positive"),
    "negative rank": (["estimate", "llama2-7b", "--lora-r", "-4"], "positive"),
    "batch zero": (["estimate", "llama2-7b", "--batch-size", "0"], "batch-size"),
    "seq negative": (["estimate", "llama2-7b", "--seq-len", "-1"], "seq-len"),
    "batch not a number": (["estimate", "llama2-7b", "--batch-size", "two"], "batch-size"),
    "unknown precision": (["estimate", "llama2-7b", "--precision", "int3"], "precision"),
    "unknown optimizer": (["estimate", "llama2-7b", "--optimizer", "lion"], "optimizer"),
    "unknown method": (["estimate", "llama2-7b", "--method", "dora"], "method"),
    "unknown gpu": (["estimate", "llama2-7b", "--gpu", "H1000"], "Did you mean: H100"),
    "unknown instance": (["estimate", "llama2-7b", "--instance", "g5.xlarg"], "g5.xlarge"),
    "gpu and instance": (["estimate", "llama2-7b", "--gpu", "H100", "--instance", "g5.xlarge"], "either"),
    "dropout out of range": (["estimate", "llama2-7b", "--lora-dropout", "1.5"], "dropout"),
    "layers zero": (["estimate", "llama2-7b", "--layers", "0"], "--layers"),
    "unknown command": (["estimat", "llama2-7b"], "No such command"),
    "instances unknown gpu": (["instances", "--gpu", "K80"], "unknown GPU"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments_are_one_line(case):
    args, expected = BAD_ARGS[case]
    assert_one_line_error(run_cli(*args), expected)


def assert_one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected.lower() in lines[0].lower(), lines[0]
    assert result.stdout == ""


def test_json_stdout_holds_only_the_json_whatever_the_libraries_print():
    # what training libraries do: print, a logger bound to stdout before or during the run, native code writing
    # to descriptor 1 directly or through C's buffered stdio; stdout a pipe, so Python buffers it too
    script = """
import ctypes, json, logging, os, sys
from ftplan.cli.json_stdout import stdout_kept_for_json
early = logging.getLogger("early")
early.addHandler(logging.StreamHandler(sys.stdout))
with stdout_kept_for_json():
    print("a library's print")
    early.warning("a logger bound before")
    logger = logging.getLogger("noisy")
    logger.addHandler(logging.StreamHandler(sys.stdout))
    logger.warning("a logger on stdout")
    os.write(1, b"native code\\n")
    ctypes.CDLL(None).printf(b"C stdio\\n")
print(json.dumps({"ok": True}))
logger.warning("the logger later")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert result.stdout == '{"ok": true}\n'
    assert sorted(result.stderr.splitlines()) == sorted(["a library's print", "a logger bound before",
                                                         "a logger on stdout", "native code", "C stdio",
                                                         "the logger later"])


def test_json_output_survives_a_closed_stdout_or_stderr():
    script = "from ftplan.cli.json_stdout import stdout_kept_for_json\nwith stdout_kept_for_json():\n    print('x')\n"
    for closed in (">&-", "2>&-"):  # the shell starts python without that descriptor: sys.stdout/stderr is None
        result = subprocess.run(["bash", "-c", f'"$0" -c "$1" {closed}', sys.executable, script], capture_output=True,
                                text=True)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (closed, result.stderr)


def test_tf32_is_a_visible_setting_kept_only_with_fp32():
    result = run_cli("estimate", "llama2-7b", "--method", "lora", "--precision", "fp32", "--tf32", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["estimates"][0]["setup"]["tf32"] is True
    assert any("fp32 (matmuls on TF32 tensor cores)" in a for a in data["assumptions"])
    mixed = json.loads(run_cli("estimate", "llama2-7b", "--method", "lora", "--tf32", "--json").stdout)
    assert mixed["estimates"][0]["setup"]["tf32"] is False and not any("TF32" in a for a in mixed["assumptions"])
