"""Training FLOPs, step time and communication against hand-computed cases."""

import math

import pytest

from ftplan.data import catalog
from ftplan.estimate.compute import allreduce_seconds, dequant_seconds, flops_per_token, network_gbytes_per_s, step_time
from ftplan.estimate.params import count_params
from ftplan.estimate.settings import LoraSettings, SetupChoices, resolve
from ftplan.model.architectures import build_layout
from ftplan.model.resolve import from_catalog
from ftplan.model.spec import spec_from_config

# Llama, hidden 64, MLP 128, 2 layers, 4 heads of 16 with 4 KV heads, vocab 100, untied.
H, I, L, V, S = 64, 128, 2, 100, 32
CONFIG = {"model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": V, "tie_word_embeddings": False}
LAYER_MATMUL = 4 * H * H + 3 * H * I
MATMUL = L * LAYER_MATMUL + V * H          # the head is a matmul, the embedding is a lookup
ATTENTION = 2 * L * S * H                  # QK^T and AV, causal half of 4 * L * S * H


def setup_and_counts(method, **kw):
    layout = build_layout(spec_from_config(CONFIG, name="tiny", source="test"))
    setup = resolve(method, SetupChoices(**kw))
    return layout, setup, count_params(layout, method, setup.lora)


def test_full_fine_tuning_is_six_flops_per_weight_plus_attention():
    layout, setup, counts = setup_and_counts("full")
    f = flops_per_token(layout, setup, counts, S)
    assert f.forward == 2 * MATMUL + ATTENTION
    assert f.backward == 4 * MATMUL + 2 * ATTENTION
    assert f.recompute == 0
    assert f.total == 6 * MATMUL + 3 * ATTENTION


def test_lora_skips_weight_gradients_of_frozen_layers_but_pays_for_adapters():
    layout, setup, counts = setup_and_counts("lora", lora=LoraSettings(r=4, targets=["q_proj", "v_proj"]))
    adapter = 2 * (L * 2 * 4 * (H + H))    # q and v: r x (in + out) each, 2 FLOPs per weight
    f = flops_per_token(layout, setup, counts, S)
    assert f.forward == 2 * MATMUL + ATTENTION + adapter
    assert f.backward == 2 * MATMUL + 2 * ATTENTION + 2 * adapter


def test_checkpointing_recomputes_the_layers_but_not_the_head():
    layout, setup, counts = setup_and_counts("qlora", lora=LoraSettings(r=4, targets=["q_proj"]))
    assert setup.grad_ckpt
    f = flops_per_token(layout, setup, counts, S)
    assert f.recompute == f.forward - 2 * V * H


def test_moe_counts_only_the_active_experts():
    spec = from_catalog(catalog.find_model("mixtral-8x7b"))
    layout = build_layout(spec)
    setup = resolve("full", SetupChoices())
    f = flops_per_token(layout, setup, count_params(layout, "full"), 0)
    total = layout.total_params()
    # about 13B of Mixtral's 47B parameters are active per token
    assert 2 * 12e9 < f.forward < 2 * 14e9 < 2 * total


def test_step_time_is_flops_over_peak_times_utilisation_plus_dequantization():
    layout, setup, counts = setup_and_counts("qlora")
    gpu = catalog.get_gpu("A100-80GB")
    t = step_time(layout, setup, counts, gpu, micro_batch=2, tokens_per_sequence=S, utilization=(0.5, "test"))
    f = flops_per_token(layout, setup, counts, S)
    assert t.compute_seconds == pytest.approx(f.total * 2 * S / (312e12 * 0.5))
    quantized = L * LAYER_MATMUL           # every nn.Linear but the head
    assert t.dequant_seconds == pytest.approx(3 * quantized * 2.5 / (gpu.memory_bandwidth_gbps * 1e9 * 0.6))
    assert dequant_seconds(layout, setup.model_copy(update={"method": "lora"}), gpu) == 0


def test_fp16_gpus_use_their_fp16_peak():
    layout, setup, counts = setup_and_counts("lora")
    t = step_time(layout, setup.model_copy(update={"precision": "fp16-mixed"}), counts, catalog.get_gpu("T4"),
                  micro_batch=1, tokens_per_sequence=S)
    assert t.peak_flops == 65e12
    assert t.utilization_source.startswith("default for turing")


@pytest.mark.parametrize("text, gbytes", [("4x100 Gb", 50), ("up to 25 Gb", 3.125), ("3200 Gb", 400),
                                          ("100 Gb", 12.5), ("garbage", 1.25)])
def test_network_strings(text, gbytes):
    assert network_gbytes_per_s(text) == gbytes


def test_allreduce_inside_and_across_instances():
    grads = 10**9
    p4d = catalog.get_instance("p4d.24xlarge")     # 8 x A100 on NVSwitch, EFA 4 x 100 Gb
    inside = 2 * 7 / 8 * grads / (300e9 * 0.8)
    assert allreduce_seconds(grads, p4d, 1) == pytest.approx(inside)
    across = 2 * 1 / 2 * grads / (50e9 * 0.8)
    assert allreduce_seconds(grads, p4d, 2) == pytest.approx(inside + across)
    g5 = catalog.get_instance("g5.xlarge")         # one A10G, no EFA, up to 10 Gb: half of it without EFA
    assert allreduce_seconds(grads, g5, 1) == 0
    assert allreduce_seconds(grads, g5, 4) == pytest.approx(2 * 3 / 4 * grads / (1.25 / 2 * 1e9 * 0.8))
    assert math.isfinite(allreduce_seconds(grads, catalog.get_instance("g4dn.12xlarge"), 1))
