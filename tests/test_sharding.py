"""Sharding arithmetic (DDP, ZeRO 1-3, FSDP, offload) against hand-computed cases, and the property
that more GPUs never need more per-GPU memory for the sharded parts."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.estimate import deepspeed as ds
from ftplan.estimate.memory import END_OF_BACKWARD as END
from ftplan.estimate.memory import OPTIMIZER_STEP as STEP
from ftplan.estimate.memory import estimate_memory
from ftplan.estimate.settings import LoraSettings, SetupChoices, resolve
from ftplan.estimate.sharding import _root_held_whole, shard, smallest_gpu_count
from ftplan.model.architectures import build_layout
from ftplan.model.resolve import from_catalog
from tests.conftest import run_cli

LAYOUT = build_layout(from_catalog(catalog.find_model("llama2-7b")))
TOTAL = LAYOUT.total_params()


def breakdown(method="full", **kw):
    setup = resolve(method, SetupChoices(**kw))
    return setup, estimate_memory(LAYOUT, setup)


def test_ddp_replicates_everything():
    setup, m = breakdown()
    s = shard(LAYOUT, setup, m, gpus=8, sharding="ddp")
    assert (s.weights_bytes, s.optimizer_bytes) == (4 * TOTAL, 8 * TOTAL)
    assert s.comm_buffer_bytes == 2 * 25 * 2**20 and s.gathered_bytes == 0
    assert s.peak_allocated_bytes == m.peak_allocated_bytes + s.comm_buffer_bytes


def test_zero_stages_divide_states_then_gradients_then_weights():
    setup, m = breakdown(grad_ckpt=True)
    one = shard(LAYOUT, setup, m, gpus=8, sharding="zero1")
    two = shard(LAYOUT, setup, m, gpus=8, sharding="zero2")
    three = shard(LAYOUT, setup, m, gpus=8, sharding="zero3")
    # DeepSpeed: the module in bf16 (no autocast); fp32 master weights and AdamW's two fp32 states on the flat
    # partition, 12 bytes per parameter divided over the GPUs
    assert one.optimizer_bytes == two.optimizer_bytes == three.optimizer_bytes == 12 * TOTAL // 8
    assert one.weights_bytes == two.weights_bytes == 2 * TOTAL and three.weights_bytes == 2 * TOTAL // 8
    pure = estimate_memory(LAYOUT, setup.model_copy(update={"precision": "bf16"}))
    assert pure.phase_bytes[END][0] == 2 * TOTAL
    # ZeRO-1 keeps the full gradients until a pass after the backward has reduced them into the partition's
    # buffer (with the parameters straddling its edges), so its peak is the end of the backward
    straddle = 2 * 11008 * 4096 * 2
    assert one.peak_phase == END and one.gradients_bytes == 2 * TOTAL + 2 * TOTAL // 8 + straddle
    # at the step ZeRO-1/2 hold the bf16 gradient partition twice (that buffer and its flat copy) beside its fp32
    # conversion; with checkpointing the step is ZeRO-2's peak, and less the copy it is exactly DeepSpeed's own
    # estimator's model states (estimate_zero2_model_states_mem_needs, v0.14.3 on, no offload): 2 * params
    # + 18 * params / GPUs
    assert two.peak_phase == STEP and two.gradients_bytes == 2 * (2 * TOTAL // 8) + straddle
    assert two.comm_buffer_bytes == 0  # the reduce bucket is released after the backward
    assert two.peak_allocated_bytes - 2 * TOTAL // 8 - straddle == pytest.approx(2 * TOTAL + 18 * TOTAL / 8, abs=8)
    for s in (one, two, three):
        assert s.peak_allocated_bytes == (s.weights_bytes + s.gathered_bytes + s.gradients_bytes + s.optimizer_bytes
                                          + s.comm_buffer_bytes + s.other_bytes)


def test_parameter_sharding_gathers_a_unit_and_the_next_in_the_compute_dtype():
    setup, m = breakdown(grad_ckpt=True)
    # FSDP, in bf16 (the compute dtype, as accelerate's mixed-precision policy gathers), not the fp32 storage.
    # The peak is in the first layer's backward: embeddings + head (gathered from the start of backward until
    # they reduce, last), the first layer, and the second layer's reduce-scatter input FSDP keeps until then
    layer = sum(g.params() for g in LAYOUT.modules if g.per_layer)
    root = TOTAL - 32 * layer
    s = shard(LAYOUT, setup, m, gpus=8, sharding="fsdp")
    assert s.peak_phase == "backward through the first layer" and s.gathered_bytes == root * 2 + 2 * layer * 2
    fp32_setup, fp32 = breakdown(grad_ckpt=True, precision="fp32")
    assert shard(LAYOUT, fp32_setup, fp32, gpus=8, sharding="fsdp").gathered_bytes == root * 4 + 2 * layer * 4
    # elsewhere (the forward and backward starts): the unit being computed and the next one
    from ftplan.estimate.sharding import _gathered

    assert _gathered(LAYOUT, setup, m, 8, []) == max(layer, root) * 2 + layer * 2
    # DeepSpeed clones fp32 master weights whatever the precision; FSDP keeps PyTorch's fp32 weights and states
    assert shard(LAYOUT, fp32_setup, fp32, gpus=8, sharding="zero1").optimizer_bytes == 12 * TOTAL // 8
    assert shard(LAYOUT, fp32_setup, fp32, gpus=8, sharding="fsdp").optimizer_bytes == 8 * TOTAL // 8


def test_deepspeed_zero3_keeps_what_it_will_reuse_within_1e9_parameters():
    setup, m = breakdown(grad_ckpt=False)
    layer = sum(g.params() for g in LAYOUT.modules if g.per_layer)
    head, norm = 32000 * 4096, 4096
    # Llama-2-7B: the head (reused at once), the final norm and the last two layers (2 x 333M parameters after
    # the 31st < 1e9); the 30th has 535M after it, reused beyond 1e9
    assert ds.kept_params(LAYOUT) == head + norm + 2 * layer
    # with checkpointing a layer's recomputation is in the trace too. Llama-2-13B: 2 x head + 2 x last layer
    # = 962M keeps the 39th layer, 2 x head + 3 x last layer = 1,279M does not
    l13 = build_layout(from_catalog(catalog.find_model("llama2-13b")))
    layer13 = sum(g.params() for g in l13.modules if g.per_layer)
    head13 = 32000 * 5120 + 5120
    assert ds.kept_params(l13) == head13 + 2 * layer13 and ds.kept_params(l13, grad_ckpt=True) == head13 + layer13
    three = shard(LAYOUT, setup, m, gpus=8, sharding="zero3")
    assert three.peak_phase != STEP and three.gathered_bytes == 2 * ds.kept_params(LAYOUT)
    # the reduce bucket (hidden^2 bf16 elements, the Trainer's 'auto') and the gradient partition live throughout
    hidden = 4096
    assert three.comm_buffer_bytes == hidden * hidden * 2 and three.gradients_bytes >= 2 * TOTAL // 8
    small = build_layout(from_catalog(catalog.find_model("qwen2.5-0.5b")))
    assert ds.kept_params(small) == small.total_params()  # a model under 5e8 parameters stays gathered
    # ZeRO-3 steps its partition a sub-group (1e9 elements) at a time: Llama-2-70B over 8 GPUs holds the flat
    # bf16 copy and the fp32 copy of 1e9 elements (plus one parameter's share), not of its 8.6e9
    big = build_layout(from_catalog(catalog.find_model("llama2-70b")))
    full70 = resolve("full", SetupChoices(grad_ckpt=True, precision="bf16"))
    params70, sub = big.total_params(), 10**9 + 32000 * 8192 // 8
    grads, other, gathered, bucket = ds.phase_terms(big, full70, "zero3", 8, STEP, 0, 4 * params70 // 8, 0)
    assert (grads, other, gathered) == (2 * params70 // 8 + 2 * sub, 4 * sub, 0) and bucket == 8192 * 8192 * 2
    # ZeRO-1/2 hold their bucket during the backward only
    one = shard(LAYOUT, setup, m, gpus=8, sharding="zero1")
    assert one.peak_phase != STEP and one.comm_buffer_bytes == hidden * hidden * 2


def test_deepspeed_hands_the_optimizer_one_flat_partition():
    # Adafactor cannot factor the flat 1-D partition: a full fp32 second moment, and its step temporaries scale
    # with the partition, not the largest tensor
    setup, m = breakdown(grad_ckpt=True, optimizer="adafactor")
    zero2 = shard(LAYOUT, setup, m, gpus=8, sharding="zero2")
    assert zero2.optimizer_bytes == (4 + 4) * TOTAL // 8
    assert m.optimizer_bytes < TOTAL  # factored row and column states without DeepSpeed
    # the checkpoint the hf backend writes under ZeRO: fp32 masters and AdamW's states, gathered by parameter
    # (tests/test_zero_run.py weighs the files it writes)
    setup, m = breakdown(grad_ckpt=True)
    assert shard(LAYOUT, setup, m, gpus=8, sharding="zero2").checkpoint_bytes == (4 + 8) * TOTAL
    assert shard(LAYOUT, setup, m, gpus=8, sharding="zero3").checkpoint_bytes == (4 + 8) * TOTAL
    assert shard(LAYOUT, setup, m, gpus=8, sharding="fsdp").checkpoint_bytes == (4 + 8) * TOTAL


def test_hybrid_shards_within_a_node_only():
    setup, m = breakdown(grad_ckpt=True)
    hybrid = shard(LAYOUT, setup, m, gpus=16, nodes=2, sharding="fsdp-hybrid")
    full = shard(LAYOUT, setup, m, gpus=16, nodes=2, sharding="fsdp")
    assert hybrid.shard_group == 8 and full.shard_group == 16
    assert hybrid.weights_bytes == 4 * TOTAL // 8 and full.weights_bytes == 4 * TOTAL // 16


def test_offload_moves_bytes_to_host_ram_per_node():
    setup, m = breakdown(grad_ckpt=True)
    base = shard(LAYOUT, setup, m, gpus=8, sharding="zero3")
    opt = shard(LAYOUT, setup, m, gpus=8, sharding="zero3", offload="optimizer")
    params = shard(LAYOUT, setup, m, gpus=8, sharding="zero3", offload="params")
    assert opt.optimizer_bytes == 0 and opt.host_offload_bytes_per_node == 8 * base.optimizer_bytes
    assert params.weights_bytes == params.optimizer_bytes == 0
    assert params.host_offload_bytes_per_node == 8 * (base.weights_bytes + base.optimizer_bytes)


def test_fsdp_runs_the_step_on_weights_gathered_in_bf16():
    """FSDP's mixed-precision policy gathers every weight in bf16 (measured against FSDP2 itself on the CPU:
    benchmarks/FSDP.md): autocast makes no weight copies and the embeddings hand the layers a bf16 stream, so
    the norms save less. Without the policy (no -mixed) and under DDP the step is the single GPU's."""
    setup, m = breakdown(grad_ckpt=True)
    half = estimate_memory(LAYOUT, setup, gathered_half=True)
    assert m.activation_terms["weight_copies"] > 0 and m.head_terms["head_weight_copy"] > 0
    assert half.activation_terms["weight_copies"] == 0 and half.head_terms["head_weight_copy"] == 0
    assert half.activation_terms["norms"] < m.activation_terms["norms"]
    fsdp = shard(LAYOUT, setup, m, gpus=8, sharding="fsdp")
    expected = max(g // 8 + _root_held_whole(LAYOUT, setup, m, "fsdp", 8, phase) + (other // 8 if phase == STEP
                                                                                     else other)
                   for phase, (g, other) in half.phase_bytes.items())
    assert fsdp.gradients_bytes + fsdp.other_bytes == expected
    ddp = shard(LAYOUT, setup, m, gpus=8, sharding="ddp")  # keeps the copies
    assert ddp.gradients_bytes + ddp.other_bytes == max(g + other for g, other in m.phase_bytes.values())
    assert expected < ddp.gradients_bytes + ddp.other_bytes
    pure, p = breakdown(precision="bf16", grad_ckpt=True)
    assert estimate_memory(LAYOUT, pure, gathered_half=True).phase_bytes == p.phase_bytes  # no policy: no change


@pytest.mark.parametrize("kw, message", [
    (dict(gpus=0), "must be positive"), (dict(gpus=3, nodes=2), "not a multiple of --nodes"),
    (dict(gpus=2, sharding="none"), "with several GPUs use ddp"),
    (dict(gpus=2, sharding="ddp", offload="params"), "needs parameter sharding"),
    (dict(gpus=2, sharding="fsdp", offload="optimizer"), "DeepSpeed ZeRO's"),
])
def test_impossible_layouts_are_refused(kw, message):
    setup, m = breakdown()
    with pytest.raises(PlannerError, match=message):
        shard(LAYOUT, setup, m, **{"sharding": "ddp", **kw})


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(["full", "lora", "qlora"]), scheme=st.sampled_from(["ddp", "zero1", "zero2", "zero3",
                                                                                   "fsdp"]),
       small=st.sampled_from([2, 4, 8]), factor=st.sampled_from([2, 4, 8]), ckpt=st.booleans())
def test_more_gpus_never_need_more_per_gpu_memory(method, scheme, small, factor, ckpt):
    setup, m = breakdown(method, grad_ckpt=ckpt)
    a = shard(LAYOUT, setup, m, gpus=small, sharding=scheme)
    b = shard(LAYOUT, setup, m, gpus=small * factor, sharding=scheme)
    # not the gradients at the peak: more GPUs can move the peak to a phase holding more of them (ZeRO-1: from
    # the step, where they are partitioned, to the end of the backward, where they are whole)
    for key in ("weights_bytes", "optimizer_bytes", "peak_allocated_bytes"):
        assert getattr(b, key) <= getattr(a, key), key


def test_smallest_gpu_count_per_instance_type():
    a10g = catalog.get_gpu("A10G").memory_bytes

    def required(setup, m, per_instance):
        return lambda n: shard(LAYOUT, setup, m, gpus=n, nodes=max(1, n // per_instance),
                               sharding="none" if n == 1 else "zero3").required_bytes

    setup, m = breakdown("qlora")
    assert smallest_gpu_count(a10g, 1, required(setup, m, 1)) == 1
    setup, m = breakdown("full", grad_ckpt=True)
    n = smallest_gpu_count(a10g, 4, required(setup, m, 4))
    assert n in (4, 8, 16) and required(setup, m, 4)(n) <= a10g < required(setup, m, 4)(n // 2)
    assert smallest_gpu_count(1, 8, required(setup, m, 8)) is None


def test_estimate_cli_for_a_70b_full_fine_tune_on_16_gpus():
    result = run_cli("estimate", "llama2-70b", "--method", "full", "--gpus", "16", "--nodes", "2", "--sharding",
                     "fsdp", "--grad-ckpt", "--json")
    assert result.returncode == 0, result.stderr
    e = json.loads(result.stdout)["estimates"][0]
    total = e["total_params"]
    s = e["sharded"]
    assert s["weights_bytes"] == 4 * total // 16 and s["optimizer_bytes"] == 8 * total // 16
    assert s["host_loading_bytes_per_node"] == 4 * total          # FSDP: rank 0 of a node loads, fp32
    assert s["checkpoint_bytes"] == 4 * total + 8 * total          # weights as trained + AdamW states
    assert e["smallest_gpu_counts"]["p5.48xlarge"] == 16
    table = run_cli("estimate", "llama2-70b", "--method", "full", "--gpus", "16", "--nodes", "2", "--sharding",
                    "fsdp", "--grad-ckpt")
    assert "Per GPU over 16 GPUs on 2 node(s), fsdp" in table.stdout


def test_parameter_sharding_gathers_fp32_experts_in_bf16():
    """QLoRA keeps Mixtral's fused experts in fp32, so on one GPU they compute in fp32 (grouped_mm ignores
    autocast); FSDP's mixed-precision policy gathers them in bf16, so sharded they compute in bf16."""
    layout = build_layout(from_catalog(catalog.find_model("mixtral-8x7b")))
    # four sequences: the activations make the peak (with one, the forward's start does: 3 layers gathered)
    setup = resolve("qlora", SetupChoices(seq_len=2048, batch_size=4), model_type="mixtral")
    fp32, half = estimate_memory(layout, setup), estimate_memory(layout, setup, gathered_half=True)
    assert half.activation_terms["mlp_experts"] * 2 == fp32.activation_terms["mlp_experts"]
    sharded = shard(layout, setup, fp32, gpus=8, sharding="fsdp")
    grads, other = half.phase_bytes[sharded.peak_phase]
    assert sharded.other_bytes <= other and half.activations_per_layer_bytes < fp32.activations_per_layer_bytes
    ddp = shard(layout, setup, fp32, gpus=8, sharding="ddp")  # replicas compute as one GPU does
    assert ddp.other_bytes == fp32.phase_bytes[ddp.peak_phase][1]


def test_qlora_gathers_4bit_layers_as_stored_and_fp32_embeddings_in_bf16():
    setup, m = breakdown("qlora", grad_ckpt=True)
    fsdp = shard(LAYOUT, setup, m, gpus=8, sharding="fsdp")
    layer = sum(g.params() for g in LAYOUT.modules if g.per_layer)
    root = TOTAL - 32 * layer  # embeddings and head, fp32 after prepare_model_for_kbit_training
    # the largest unit is embeddings + head at 2 bytes; a decoder layer in 4 bits (about 0.53 byte a parameter)
    assert 2 * root + 0.5 * layer < fsdp.gathered_bytes < 2 * root + 0.6 * layer + m.adapter_bytes / 32


@pytest.mark.parametrize("scheme", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_accumulation_holds_each_schemes_gradients_in_every_phase(scheme):
    """With accumulation every phase holds the gradients as the scheme keeps them between micro-steps: whole
    (DDP, ZeRO-1, which reduces only at the boundary; FSDP under the Trainer's no_sync, in bf16), or this GPU's
    partition (ZeRO-2/3). ZeRO-3 holds its gradient partition from start-up anyway."""
    setup, one = breakdown()
    acc = estimate_memory(LAYOUT, setup, accumulating=True)
    single, sharded = (shard(LAYOUT, setup, m, gpus=8, sharding=scheme) for m in (one, acc))
    if scheme == "zero3":
        assert sharded.peak_allocated_bytes == single.peak_allocated_bytes
    else:
        assert sharded.peak_allocated_bytes > single.peak_allocated_bytes
    size = 2 if scheme.startswith("zero") or scheme == "fsdp" else 4  # DeepSpeed's and FSDP's policy: bf16
    whole = scheme in ("ddp", "zero1", "fsdp")
    assert sharded.gradients_bytes >= size * TOTAL // (1 if whole else 8)
    if scheme == "fsdp":
        assert sharded.gradients_bytes == acc.gradients_bytes // 2


@pytest.mark.parametrize("precision, held", [("bf16-mixed", 2), ("fp32", 4), ("bf16", 2)])
def test_fsdp_accumulation_holds_unsharded_gradients_unless_each_batch_syncs(precision, held):
    """The Trainer runs the micro-steps before the last under no_sync: FSDP keeps every gradient unsharded, in
    the gathered dtype, until the last micro-step (measured on the CPU: benchmarks/FSDP.md). With
    sync_each_batch each micro-step reduce-scatters, and only this GPU's shard is held; the optimizer steps on
    the shard either way."""
    setup, _ = breakdown(precision=precision)
    acc = estimate_memory(LAYOUT, setup, accumulating=True)
    trainer = shard(LAYOUT, setup, acc, gpus=8, sharding="fsdp")
    synced = shard(LAYOUT, setup.model_copy(update={"sync_each_batch": True}), acc, gpus=8, sharding="fsdp")
    assert trainer.gradients_bytes == held * TOTAL
    # the earlier micro-batches' shards, and at the peak (the last layer's backward) this one's head gradient whole
    head = (32000 * 4096 + 4096) * (2 if precision != "fp32" else 4)
    assert synced.gradients_bytes == acc.gradients_bytes // 8 + head < trainer.gradients_bytes
    assert any("no_sync" in n for n in trainer.notes) and not any("no_sync" in n for n in synced.notes)
    hybrid = shard(LAYOUT, setup, acc, gpus=16, nodes=2, sharding="fsdp-hybrid")
    assert hybrid.gradients_bytes == held * TOTAL
    # one micro-batch per step, or one GPU: nothing held apart from the usual (the shard, or the one GPU's own)
    one = estimate_memory(LAYOUT, setup)
    assert shard(LAYOUT, setup, one, gpus=8, sharding="fsdp").gradients_bytes <= one.gradients_bytes // 8
    assert shard(LAYOUT, setup, acc, gpus=1, sharding="fsdp").gradients_bytes == acc.gradients_bytes


@pytest.mark.parametrize("scheme", ["zero1", "zero2", "zero3"])
def test_deepspeed_runs_lora_on_a_bf16_model_at_every_stage(scheme):
    """DeepSpeed's bf16 casts the whole module (adapters included) and accelerate turns autocast off, at every
    ZeRO stage: the step is the bf16-gathered one, as under FSDP's policy - not the single GPU's autocast step."""
    setup, m = breakdown("lora", lora=LoraSettings(targets=["all-linear"]))
    half = estimate_memory(LAYOUT, setup, gathered_half=True)
    assert m.activation_terms["weight_copies"] > 0 == half.activation_terms["weight_copies"]  # the adapters' copies
    zero, ddp = (shard(LAYOUT, setup, m, gpus=8, sharding=s) for s in (scheme, "ddp"))  # DDP: the autocast step
    assert zero.peak_phase == ddp.peak_phase
    saved = m.phase_bytes[ddp.peak_phase][1] - half.phase_bytes[ddp.peak_phase][1]
    assert saved > 0 and zero.other_bytes <= ddp.other_bytes - saved + 2 * LAYOUT.dims.hidden ** 2 * 2  # + a bucket
    assert any("DeepSpeed casts the model to bf16" in n for n in zero.notes)


def test_zero3_full_fine_tuning_of_moe_keeps_deepspeeds_own_step():
    """DeepSpeed full fine-tuning is re-modelled by deepspeed.view (a bf16 model, its optimizer's step): the MoE
    experts are already bf16 there, and no phase may lose view's optimizer step (no negative transient)."""
    layout = build_layout(from_catalog(catalog.find_model("mixtral-8x7b")))
    setup = resolve("full", SetupChoices(seq_len=256, grad_ckpt=True), model_type="mixtral")
    s = shard(layout, setup, estimate_memory(layout, setup), gpus=8, sharding="zero3")
    assert s.other_bytes >= 0 and s.peak_phase == STEP


def test_fsdp_root_unit_reduce_scatters_last_with_its_buffers():
    """FSDP2 reduce-scatters the root unit (embeddings, final norm, head) after the rest of backward, resharded
    first: its reduce-scatter input (the unit's gradients in bf16 under the policy), the head's gradient (a loop
    variable in torch's foreach_reduce keeps the unit's last one), the output shard and its fp32 cast exist
    together (a probe of the step, benchmarks/FSDP.md). Only full fine-tuning trains the root unit."""
    from ftplan.estimate.sharding import ROOT_REDUCE, _root_reduce

    layer = LAYOUT.layer_params()
    root, head = TOTAL - 32 * layer, 32000 * 4096
    setup, m = breakdown(batch_size=1, seq_len=64)
    assert _root_reduce(LAYOUT, setup, m, "fsdp", 8) == (root + head) * 2 + root // 8 * 2
    assert _root_reduce(LAYOUT, setup, m, "fsdp", 1) == 0 == _root_reduce(LAYOUT, setup, m, "zero3", 8)
    fp32, m32 = breakdown(batch_size=1, seq_len=64, precision="fp32")
    assert _root_reduce(LAYOUT, fp32, m32, "fsdp", 8) == (root + head) * 4  # no cast: the output is the shard
    acc = estimate_memory(LAYOUT, setup, accumulating=True)
    synced = setup.model_copy(update={"sync_each_batch": True})  # a later micro-batch's shard beside the held one
    assert _root_reduce(LAYOUT, synced, acc, "fsdp", 8) == (root + head) * 2 + root // 8 * (2 + 4)
    lora, ml = breakdown("lora", batch_size=1, seq_len=64)
    assert _root_reduce(LAYOUT, lora, ml, "fsdp", 8) == 0
    s = shard(LAYOUT, setup, m, gpus=2, sharding="fsdp")
    assert s.peak_phase == ROOT_REDUCE and s.other_bytes == (root + head) * 2 + root // 2 * 2  # buffers
    assert s.gradients_bytes == m.gradients_bytes // 2 and s.gathered_bytes == 0


def test_fsdp_forward_start_keeps_the_previous_all_gather_output_until_the_next_copy_out():
    """In the forward FSDP2 frees a unit's all-gather output only when the next unit's weights are copied out of
    theirs: the root unit's weights and output beside the first layer's, or a layer's beside the previous one's.
    In the backward it frees each at once; the root unit, resharded after the forward, is gathered again beside
    every activation (on the CPU gloo's all-gather also copies its output, beside the input cast to bf16)."""
    from ftplan.estimate.sharding import FORWARD_START, REGATHER, _moments, _unit_bytes

    setup, m = breakdown(batch_size=1, seq_len=64)
    layer, root = _unit_bytes(LAYOUT, setup, m)
    assert (layer, root) == (LAYOUT.layer_params() * 2, (TOTAL - 32 * LAYOUT.layer_params()) * 2)  # bf16
    s = shard(LAYOUT, setup, m, gpus=8, sharding="fsdp")
    terms = {"end of forward (activations + logits)": (0, 0, 0, 0)}
    moments = _moments(LAYOUT, setup, m, m, "fsdp", 8, "cuda", terms, 0)
    assert moments[FORWARD_START][2] == max(2 * (root + layer), root + 3 * layer)  # 70B-like: layer > root
    assert moments[REGATHER][2] == 2 * root
    assert _moments(LAYOUT, setup, m, m, "fsdp", 8, "cpu", terms, 0)[REGATHER][2] == 2 * root + root // 8
    assert _moments(LAYOUT, setup, m, m, "ddp", 8, "cuda", terms, 0) == {}
    assert _moments(LAYOUT, setup, m, m, "fsdp", 1, "cuda", terms, 0) == {}
    assert s.peak_allocated_bytes >= s.weights_bytes + s.optimizer_bytes + moments[FORWARD_START][2]


def test_fsdp_root_gradients_stay_whole_until_the_root_unit_reduces():
    """The root unit reduce-scatters only at the end of backward: until then its gradients (the head's from the
    last layer on, the embedding's at the end) are whole in the gathered dtype, not this GPU's fp32 shard. Under
    the policy on two GPUs the two weigh the same; in fp32, or over more GPUs, they do not."""
    from ftplan.estimate.memory import FIRST_LAYER, LAST_LAYER
    from ftplan.estimate.sharding import _root_held_whole

    head = 32000 * 4096 + 4096  # the head and the final norm
    root = TOTAL - 32 * LAYOUT.layer_params()
    setup, m = breakdown(batch_size=1, seq_len=64)
    assert _root_held_whole(LAYOUT, setup, m, "fsdp", 2, END) == 0  # 2 bytes whole = 4 bytes / 2
    assert _root_held_whole(LAYOUT, setup, m, "fsdp", 8, END) == root * 2 - root * 4 // 8
    for phase in (LAST_LAYER, FIRST_LAYER):
        assert _root_held_whole(LAYOUT, setup, m, "fsdp", 8, phase) == head * 2 - head * 4 // 8
    fp32, m32 = breakdown(batch_size=1, seq_len=64, precision="fp32")
    assert _root_held_whole(LAYOUT, fp32, m32, "fsdp", 2, END) == root * 4 - root * 4 // 2
    assert _root_held_whole(LAYOUT, setup, m, "fsdp", 8, STEP) == 0 == _root_held_whole(
        LAYOUT, setup, estimate_memory(LAYOUT, setup, accumulating=True), "fsdp", 8, END)  # no_sync: all whole


def test_deepspeed_zero3_fetches_module_by_module_and_drops_a_frozen_embedding_after_its_forward():
    """ZeRO-3 gathers each module's own weights (plus its prefetch bucket, 0.9 hidden^2 elements), not FSDP's
    decoder-layer units; what stays gathered is what will be reused within 1e9 parameters. A frozen embedding
    is reused only if its output requires grad, which PEFT arranges for gradient checkpointing alone (a probe of
    llama-1k-2l LoRA at the start of backward: 55.95M parameters gathered - head and layers - against 91.86M
    with checkpointing: benchmarks/DEEPSPEED.md)."""
    embedding = 32000 * 4096
    assert ds.kept_params(LAYOUT, embedding_in_backward=False) == ds.kept_params(LAYOUT)  # beyond 1e9 anyway
    small = build_layout(from_catalog(catalog.find_model("qwen2.5-0.5b")))  # tied: the head keeps the weight
    assert ds.kept_params(small, embedding_in_backward=False) == small.total_params()
    from ftplan.model.spec import spec_from_config

    untied = build_layout(spec_from_config(  # the benchmark's llama-1k-2l: everything within 1e9
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
         "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 2,
         "vocab_size": 32000, "tie_word_embeddings": False}, name="llama-1k-2l", source="test"))
    assert ds.kept_params(untied) == untied.total_params()
    assert ds.kept_params(untied, embedding_in_backward=False) == untied.total_params() - 32000 * 1024
    setup, m = breakdown("lora", batch_size=1, seq_len=64)
    s = shard(LAYOUT, setup, m, gpus=8, sharding="zero3")
    # what is kept (the head and the last two layers) outweighs one module and its prefetch bucket
    assert s.gathered_bytes == pytest.approx(2 * ds.kept_params(LAYOUT), rel=0.01)  # bf16, adapters beside
    assert 2 * ds.kept_params(LAYOUT) > 2 * (embedding + 0.9 * 4096 ** 2)
    assert s.gathered_bytes < shard(LAYOUT, setup, m, gpus=8, sharding="fsdp").gathered_bytes * 2


def test_hsdp_holds_every_units_all_reduced_shard_to_the_end_of_backward():
    """Across nodes each FSDP2 unit all-reduces its reduce-scattered shard, and FSDPParamGroup keeps that buffer
    (its _all_reduce_state) until the end of backward: under the policy every unit's bf16 shard sits beside the
    fp32 shards cast from it. Without a cast the buffer is the sharded gradient itself; within one node there is
    no all-reduce."""
    from ftplan.estimate.sharding import _all_reduced

    layers = 32 * LAYOUT.layer_params()
    setup, m = breakdown(batch_size=1, seq_len=64)
    assert _all_reduced(LAYOUT, setup, m, 8) == layers // 8 * 2
    fp32, m32 = breakdown(batch_size=1, seq_len=64, precision="fp32")
    assert _all_reduced(LAYOUT, fp32, m32, 8) == 0
    hybrid = shard(LAYOUT, setup, m, gpus=16, nodes=2, sharding="fsdp-hybrid")
    one_node = shard(LAYOUT, setup, m, gpus=8, nodes=1, sharding="fsdp-hybrid")
    assert hybrid.peak_phase == END  # 64 tokens: the gradients make the peak
    root = TOTAL - layers
    whole = root * 2 - root * 4 // 8  # embeddings and head, not yet reduced
    assert hybrid.gradients_bytes == m.gradients_bytes // 8 + whole + layers // 8 * 2  # + 1.5 GiB on 7B
    assert hybrid.peak_allocated_bytes > one_node.peak_allocated_bytes
