"""Parameter counts against hand-computed figures and PEFT's target semantics."""

import pytest

from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.estimate.params import count_params, fit_dropout, folds_parameters, lora_params, resolve_targets
from ftplan.estimate.settings import LoraSettings
from ftplan.model.architectures import build_layout
from ftplan.model.resolve import from_catalog
from ftplan.model.spec import spec_from_config

from .conftest import TINY_LLAMA


def layout_of(name: str):
    return build_layout(from_catalog(catalog.find_model(name)))


def test_brief_example_square_matrix_rank_4():
    """A 2048x2048 weight with rank 4 trains 2 x 2048 x 4 = 16,384 numbers."""
    group = next(g for g in layout_of("llama3.2-1b").modules if g.leaf == "q_proj")
    assert (group.in_features, group.out_features) == (2048, 2048)
    assert lora_params(group, 4) == 16_384


@pytest.mark.parametrize("name, total", [
    ("llama2-7b", 6_738_415_616),     # the published Llama-2-7B figure
    ("gpt2", 124_439_808),            # tied head counted once
    ("mistral-7b", 7_241_732_096),
    ("qwen2.5-0.5b", 494_032_768),    # tied, qkv bias
])
def test_known_totals(name, total):
    assert layout_of(name).total_params() == total


def test_llama2_7b_default_lora_by_hand():
    # q_proj and v_proj: 32 layers x 2 modules x r(4096 + 4096)
    counts = count_params(layout_of("llama2-7b"), "lora", LoraSettings(r=8))
    assert counts.trainable_params == 32 * 2 * 8 * (4096 + 4096)
    assert counts.targets.source == "peft-default"


def test_gqa_shapes_change_lora_counts():
    # Llama-3-8B: v_proj is 4096 -> 1024 (8 KV heads of 128)
    counts = count_params(layout_of("llama3-8b"), "lora", LoraSettings(r=8))
    assert counts.trainable_params == 32 * 8 * ((4096 + 4096) + (4096 + 1024))


def test_full_trains_everything_and_qlora_equals_lora():
    layout = layout_of("qwen2.5-7b")
    assert count_params(layout, "full").trainable_params == layout.total_params()
    lora = count_params(layout, "lora", LoraSettings(targets=["all-linear"]))
    qlora = count_params(layout, "qlora", LoraSettings(targets=["all-linear"]))
    assert lora.trainable_params == qlora.trainable_params > 0


def test_all_linear_excludes_head_and_phi3_has_no_peft_default():
    layout = layout_of("phi3-mini")
    resolution = resolve_targets(layout, None)
    assert resolution.source == "all-linear (no PEFT default)"
    assert "lm_head" not in resolution.names
    assert set(resolution.names) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_suffix_matching_covers_both_gpt2_c_proj():
    layout = layout_of("gpt2")
    counts = count_params(layout, "lora", LoraSettings(r=1, targets=["c_proj"]))
    # attn.c_proj (768 -> 768) and mlp.c_proj (3072 -> 768) in 12 layers
    assert counts.trainable_params == 12 * ((768 + 768) + (3072 + 768))
    dotted = count_params(layout, "lora", LoraSettings(r=1, targets=["attn.c_proj"]))
    assert dotted.trainable_params == 12 * (768 + 768)


def test_unknown_target_lists_the_real_ones():
    with pytest.raises(PlannerError, match="no module 'q_proj'.*c_attn"):
        count_params(layout_of("gpt2"), "lora", LoraSettings(targets=["q_proj"]))


def test_norm_target_is_rejected():
    with pytest.raises(PlannerError, match="norm layer"):
        count_params(layout_of("llama2-7b"), "lora", LoraSettings(targets=["input_layernorm"]))


def test_moe_experts_only_through_all_linear():
    with pytest.raises(PlannerError, match="all-linear"):
        count_params(layout_of("mixtral-8x7b"), "lora", LoraSettings(targets=["gate_up_proj"]))


def test_all_linear_cannot_mix():
    with pytest.raises(PlannerError, match="cannot be combined"):
        count_params(layout_of("llama2-7b"), "lora", LoraSettings(targets=["all-linear", "q_proj"]))


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        LoraSettings(r=0)


def test_head_dim_differs_from_hidden_over_heads():
    # Gemma-7B: 16 heads x 256 = 4096 wide attention on a 3072 hidden size
    q = next(g for g in layout_of("gemma-7b").modules if g.leaf == "q_proj")
    assert (q.in_features, q.out_features) == (3072, 4096)


def test_tiny_config_counts_by_hand():
    spec = spec_from_config(TINY_LLAMA, name="tiny", source="test")
    h, i, v, kv = 64, 176, 320, 32
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    assert build_layout(spec).total_params() == 2 * v * h + 2 * per_layer + h


def test_fused_experts_take_no_lora_dropout():
    """PEFT's ParamWrapper, which adapts Mixtral's router and fused experts under all-linear, refuses
    lora_dropout != 0: a default dropout is fitted to 0, one the user set is refused by name."""
    layout = layout_of("mixtral-8x7b")
    default = LoraSettings(targets=["all-linear"])
    assert folds_parameters(layout, default) and fit_dropout(layout, default).dropout == 0
    assert count_params(layout, "lora", fit_dropout(layout, default)).trainable_params > 0
    with pytest.raises(PlannerError, match="--lora-dropout 0.05: PEFT adapts mixtral's fused MoE parameters"):
        count_params(layout, "lora", LoraSettings(targets=["all-linear"], dropout=0.05))
    subset = LoraSettings(targets=["q_proj", "v_proj"])  # linear layers keep the default dropout
    assert not folds_parameters(layout, subset) and fit_dropout(layout, subset).dropout == 0.05
    dense = LoraSettings(targets=["all-linear"])
    assert fit_dropout(layout_of("llama2-7b"), dense).dropout == 0.05
