"""Training FLOPs against hand-computed cases."""

import pytest

from ftplan.data import catalog
from ftplan.estimate.compute import flops_per_token, fp32_expert_share
from ftplan.estimate.params import count_params, fit_dropout
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


MOE = {"model_type": "mixtral", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
       "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": V, "tie_word_embeddings": False,
       "num_local_experts": 4, "num_experts_per_tok": 2}
EXPERTS_ACTIVE = L * 2 * 3 * H * I        # top-2 of the fused gate_up and down stacks, per token
MOE_MATMUL = L * (4 * H * H + 4 * H) + EXPERTS_ACTIVE + V * H  # attention, the router, the experts, the head


def moe(method, **kw):
    layout = build_layout(spec_from_config(MOE, name="tiny-moe", source="test"))
    setup = resolve(method, SetupChoices(**kw))
    return layout, setup, count_params(layout, method, fit_dropout(layout, setup.lora) if setup.lora else None)


def test_folded_expert_adapters_cost_the_experts_weight_gradients():
    """PEFT's ParamWrapper folds the adapter into the router's and experts' weights: backward computes those
    whole weights' gradients, as full fine-tuning would."""
    layout, setup, counts = moe("lora", lora=LoraSettings(targets=["all-linear"]))
    f = flops_per_token(layout, setup, counts, S)
    assert f.backward == 2 * MOE_MATMUL + 2 * (EXPERTS_ACTIVE + L * 4 * H) + 2 * ATTENTION + 2 * f.adapter_forward
    # x @ A @ B per token on q/k/v/o; the folded low-rank products once per micro-batch (rank 2r on gate_up)
    r, e, tokens = 16, 4, setup.tokens
    folded = L * 2 * (H * e * r + e * 2 * I * H * 2 * r + e * H * I * r) / tokens
    assert f.adapter_forward == pytest.approx(L * 4 * 2 * r * (H + H) + folded)
    layout, setup, counts = moe("lora")  # PEFT's default targets: attention only
    assert flops_per_token(layout, setup, counts, S).backward == 2 * MOE_MATMUL + 2 * ATTENTION + \
        2 * flops_per_token(layout, setup, counts, S).adapter_forward


def test_fp32_experts_are_the_share_of_flops_no_published_run_checks():
    layout = moe("qlora")[0]
    share = EXPERTS_ACTIVE / MOE_MATMUL
    assert fp32_expert_share(layout, resolve("qlora", SetupChoices())) == share
    assert fp32_expert_share(layout, resolve("full", SetupChoices())) == share  # fp32 masters under autocast
    assert fp32_expert_share(layout, resolve("full", SetupChoices(precision="bf16"))) == 0
    assert fp32_expert_share(layout, resolve("lora", SetupChoices())) == 0  # a bf16 base
    assert fp32_expert_share(setup_and_counts("qlora")[0], resolve("qlora", SetupChoices())) == 0  # dense
