"""`ftplan measure`: the live-bytes tracker, and estimate vs measurement on tiny models.

The issue asks for <= 10% on this fast subset; the model lands within 0.3% here, so the bound
is the 5% target the real-width benchmark is held to (benchmarks/ACCURACY.md).
"""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from ftplan.estimate.settings import LoraSettings, SetupChoices  # noqa: E402
from ftplan.measure.memtrack import LiveBytes  # noqa: E402
from ftplan.measure.runner import measure  # noqa: E402
from ftplan.model.spec import spec_from_config  # noqa: E402

from .conftest import run_cli  # noqa: E402

# Small, but with the proportions of a real decoder (GQA, gated MLP, vocabulary >> hidden).
TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}
TINY_QWEN = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8192,
             "max_position_embeddings": 1024, "tie_word_embeddings": True}


def test_live_bytes_counts_each_storage_once_and_releases_it():
    tracker = LiveBytes()
    with tracker:
        a = torch.ones(1024, dtype=torch.float32)
        view = a[:10]  # a view shares the storage: not counted again
        b = a * 2
        assert tracker.current == 2 * 4096
        del b
        assert tracker.current == 4096
    assert tracker.peak == 2 * 4096
    del a, view
    assert tracker.current == 0


CASES = [
    (TINY, "full", {}),
    (TINY, "full", {"precision": "bf16", "grad_ckpt": True}),
    (TINY, "lora", {}),
    (TINY, "lora", {"lora": LoraSettings(targets=["all-linear"]), "optimizer": "adamw_8bit"}),
    (TINY, "lora", {"attention": "eager"}),
    (TINY, "qlora", {}),
    (TINY_QWEN, "lora", {"batch_size": 2, "seq_len": 128}),
    (TINY_QWEN, "qlora", {"lora": LoraSettings(targets=["all-linear"])}),
]


@pytest.mark.parametrize("config, method, settings", CASES,
                         ids=[f"{c['model_type']}-{m}-{'-'.join(s) or 'defaults'}" for c, m, s in CASES])
def test_estimate_within_ten_percent_of_measured(config, method, settings):
    spec = spec_from_config(config, name="tiny", source="test")
    report = measure(spec, method, SetupChoices(**{"seq_len": 256, **settings}))
    assert abs(report.error_percent) <= 5, report.model_dump_json(indent=1)
    assert report.measured.loss > 0


def test_measure_cli_json(write_config):
    result = run_cli("measure", str(write_config(TINY)), "--method", "lora", "--seq-len", "128", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["measured"]["peak_allocated_bytes"] > 0
    assert data["setup"]["method"] == "lora"


@pytest.mark.parametrize("args, expected", [
    (["--steps", "0"], "--steps"),
    (["--device", "cuda"], "cuda"),
    (["--layers", "0"], "--layers"),
])
def test_measure_bad_input_is_one_line(args, expected, write_config):
    if expected == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("measure", str(write_config(TINY)), *args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_build_model_loads_local_safetensors(tmp_path):
    """The shared builder loads real weights from a local directory (safetensors only)."""
    from transformers import AutoModelForCausalLM

    from ftplan.estimate.settings import SetupChoices, resolve
    from ftplan.train.build import build_model, hf_config

    spec = spec_from_config(TINY, name="tiny", source="test")
    setup = resolve("lora", SetupChoices())
    saved = AutoModelForCausalLM.from_config(hf_config(spec, setup))
    saved.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.glob("*.bin"))
    model = build_model(spec, setup, pretrained=str(tmp_path))
    loaded = dict(model.base_model.model.named_parameters())["model.embed_tokens.weight"]
    assert torch.equal(loaded.float(), saved.model.embed_tokens.weight.to(loaded.dtype).float())
    assert loaded.dtype == torch.bfloat16 and not loaded.requires_grad
