"""`ftplan measure`: the instruments, and estimate vs measurement on tiny models of every family, loop and
optimizer; the real-width cases are in benchmarks/accuracy.py (benchmarks/ACCURACY.md)."""

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


TINY_GPT2 = {"model_type": "gpt2", "n_embd": 256, "n_layer": 2, "n_head": 8, "vocab_size": 8192, "n_positions": 1024}
TINY_GEMMA2 = {"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192,
               "max_position_embeddings": 1024}
TINY_FALCON = {"model_type": "falcon", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
               "vocab_size": 8192, "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True,
               "bias": False}
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 1024,
                "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False}

# every case: the estimate (CPU kernels) within 3% of the allocator instrument, which sees what ops allocate
# inside themselves; the sum of the suite's cases takes about a minute on two cores
CASES = [  # a fast subset; every family, loop and optimizer at real width: benchmarks/accuracy.py
    (TINY, "full", {}),
    (TINY, "full", {"precision": "bf16", "grad_ckpt": True, "loop": "custom"}),
    (TINY, "full", {"optimizer": "adamw_bnb_8bit", "seq_len": 128}),
    (TINY, "full", {"optimizer": "adafactor", "precision": "bf16", "seq_len": 128}),
    (TINY, "lora", {"lora": LoraSettings(targets=["all-linear"]), "optimizer": "adamw_8bit", "loop": "custom"}),
    (TINY, "lora", {"attention": "eager", "precision": "bf16"}),
    (TINY, "qlora", {}),
    (TINY_QWEN, "full", {"batch_size": 2, "seq_len": 64}),
    (TINY_QWEN, "qlora", {"lora": LoraSettings(targets=["all-linear"]), "precision": "bf16", "seq_len": 128}),
    (TINY_GPT2, "full", {"batch_size": 2, "seq_len": 64}),
    (TINY_GEMMA2, "lora", {"lora": LoraSettings(targets=["all-linear"]), "batch_size": 2, "seq_len": 64}),
    (TINY_FALCON, "full", {"batch_size": 2, "seq_len": 64}),
    # fused experts: fp32 under QLoRA (grouped_mm ignores autocast); all-linear folds adapters into the weights
    (TINY_MIXTRAL, "qlora", {}),
    (TINY_MIXTRAL, "qlora", {"lora": LoraSettings(targets=["all-linear"])}),
    (TINY_MIXTRAL, "lora", {"lora": LoraSettings(targets=["all-linear"]), "loop": "custom"}),
]


def _case_id(config: dict, method: str, settings: dict) -> str:
    named = "-".join(f"{k}={v}" for k, v in settings.items() if k != "lora")
    return f"{config['model_type']}-{method}-{named or 'defaults'}"


@pytest.mark.parametrize("config, method, settings", CASES, ids=[_case_id(*case) for case in CASES])
def test_estimate_within_three_percent_of_the_allocator(config, method, settings):
    spec = spec_from_config(config, name="tiny", source="test")
    report = measure(spec, method, SetupChoices(**{"seq_len": 256, **settings}), rss=False, device="cpu")
    got = report.measured
    assert abs(report.error_percent) <= 3, report.model_dump_json(indent=1)
    assert got.peak_allocated_bytes == got.peak_allocator_bytes and report.measured.loss > 0


# gradient accumulation: the later micro-steps hold every gradient, and a tied head's new gradient waits for the
# embedding's backward (TINY_QWEN) beside the held one
ACCUM_CASES = [
    (TINY, "full", {}, 2),
    (TINY_QWEN, "full", {"batch_size": 2, "seq_len": 64}, 2),
    (TINY, "lora", {"lora": LoraSettings(targets=["all-linear"]), "loop": "custom"}, 3),
    (TINY_GPT2, "full", {"precision": "bf16", "optimizer": "sgd", "seq_len": 64}, 2),
]


@pytest.mark.parametrize("config, method, settings, accum", ACCUM_CASES,
                         ids=[f"{c['model_type']}-{m}-accum{a}" for c, m, _, a in ACCUM_CASES])
def test_accumulating_step_within_three_percent_of_the_allocator(config, method, settings, accum):
    spec = spec_from_config(config, name="tiny", source="test")
    choices = SetupChoices(**{"seq_len": 256, **settings})
    report = measure(spec, method, choices, rss=False, device="cpu", grad_accum=accum)
    assert report.grad_accum == accum and report.estimated.accumulating
    assert abs(report.error_percent) <= 3, report.model_dump_json(indent=1)
    if method == "full":  # the held gradients are not small here: one micro-batch's estimate is far below
        single = measure(spec, method, choices, rss=False, device="cpu").estimated_compared_bytes
        assert single < 0.97 * report.measured.peak_allocated_bytes


def test_the_instruments_agree_and_rss_is_the_reference():
    """Tracker, allocator and the resident set of a child process measure the same step within 2% - and where
    ops allocate inside themselves (bitsandbytes' CPU optimizer), the tracker cannot see it and says so."""
    spec = spec_from_config(TINY, name="tiny", source="test")
    report = measure(spec, "lora", SetupChoices(seq_len=128), device="cpu")
    got = report.measured
    assert got.peak_rss_bytes and got.peak_allocated_bytes == got.peak_rss_bytes
    assert got.instruments_disagree_percent <= 2 and abs(report.error_percent) <= 3
    eight = measure(spec, "full", SetupChoices(seq_len=64, optimizer="adamw_bnb_8bit"), rss=False, device="cpu")
    assert eight.measured.instruments_disagree_percent > 2  # the tracker misses the optimizer's internals
    assert "optimizer_update_8bit_blockwise" in eight.measured.allocator_peak_at


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_measure_cli_json(write_config, method):
    # QLoRA brings in accelerate, which imports DeepSpeed where it is installed, whose logger warns on stdout
    result = run_cli("measure", str(write_config(TINY)), "--method", method, "--seq-len", "64", "--no-rss", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["measured"]["peak_allocated_bytes"] > 0
    assert data["setup"]["method"] == method


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


def test_sharded_qlora_stores_its_4bit_weights_in_the_compute_dtype_from_random_weights_too():
    """FSDP shards only float tensors: for a sharded run QLoRA packs its 4-bit weights into bf16 storage
    (bnb_4bit_quant_storage), whether the weights are loaded or random - the same bytes either way."""
    from ftplan.estimate.settings import SetupChoices, resolve
    from ftplan.train.build import build_model

    spec = spec_from_config(TINY, name="tiny", source="test")
    setup = resolve("qlora", SetupChoices())
    packed = {sharded: next(p for n, p in build_model(spec, setup, sharded=sharded).named_parameters()
                            if n.endswith("q_proj.base_layer.weight")) for sharded in (False, True)}
    assert packed[False].dtype == torch.uint8 and packed[True].dtype == torch.bfloat16
    assert packed[False].numel() == 2 * packed[True].numel()


def test_a_model_is_built_with_tf32_exactly_as_its_setup_says():
    """torch keeps TF32 process-wide: each build sets it both ways, so a measurement without TF32 is not run
    with the setting an earlier one left behind."""
    from ftplan.estimate.settings import SetupChoices, resolve
    from ftplan.train.build import build_model

    spec = spec_from_config(TINY, name="tiny", source="test")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for on in (True, False):
            build_model(spec, resolve("full", SetupChoices(precision="fp32", tf32=on)))
            assert torch.backends.cuda.matmul.allow_tf32 is on
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
