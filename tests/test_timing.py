"""The step-time model term by term, against hand-computed cases, and the links collectives run over."""

import math

import pytest

from ftplan.data import catalog
from ftplan.estimate.compute import flops_per_token
from ftplan.estimate.memory import estimate_memory
from ftplan.estimate.network import allreduce_seconds, gather_seconds, network_gbytes_per_s
from ftplan.estimate.params import count_params
from ftplan.estimate.settings import SetupChoices, resolve
from ftplan.estimate.timing import (
    Parallel,
    calibrated_u_max,
    dequant_seconds,
    rebased_u_max,
    solved_constants,
    step_time,
    travelling_weight_bytes,
)
from ftplan.model.architectures import build_layout
from ftplan.model.resolve import from_catalog

RULES = catalog.throughput()
KAPPA = RULES.utilization.kappa
LLAMA = build_layout(from_catalog(catalog.find_model("llama3-8b")))


def timed(method="lora", gpu="A100-80GB", seq=2048, batch=1, parallel=None, accum=1, u_max=None, **kw):
    setup = resolve(method, SetupChoices(batch_size=batch, seq_len=seq, **kw))
    counts = count_params(LLAMA, method, setup.lora)
    memory = estimate_memory(LLAMA, setup, counts)
    return setup, memory, step_time(LLAMA, setup, counts, catalog.get_gpu(gpu), memory, tokens_per_sequence=seq,
                                    accum=accum, parallel=parallel, u_max=u_max and (u_max, "test"))


def test_compute_is_flops_at_a_utilisation_that_saturates_with_tokens_per_micro_batch():
    setup, _, t = timed(seq=2048)
    gpu = catalog.get_gpu("A100-80GB")
    t_half = KAPPA * 312e12 / (gpu.memory_bandwidth_gbps * 1e9)
    assert t.t_half_tokens == pytest.approx(t_half)              # 359 tokens on an A100-80GB
    assert 345 < t_half < 375
    flops = flops_per_token(LLAMA, setup, count_params(LLAMA, "lora", setup.lora), 2048)
    u_max = RULES.utilization.u_max("A100-80GB", "ampere")[0]
    r = RULES.fused_attention.ratio("sdpa", "ampere")  # attention's FLOPs at SDPA's kernel rate, the rest at matmuls'
    f = flops.total + 3 * flops.attention_forward * (1 / r - 1)
    assert t.attention_kernel_ratio == r and t.compute_seconds == pytest.approx(f * (2048 + t_half) / (312e12 * u_max))
    assert 0.6 < t.u_max == u_max < 0.8 and "A100" in t.u_max_source


def test_elementwise_traffic_is_memory_bound_and_weighs_most_on_narrow_models():
    setup, _, t = timed(seq=2048)  # LoRA without checkpointing: a forward and a backward of two
    assert not setup.grad_ckpt
    per_token = RULES.elementwise.bytes_per_hidden * 4096 * 32 * 3
    assert t.elementwise_seconds == pytest.approx(2048 * per_token / 2039e9)
    _, _, ckpt = timed(seq=2048, grad_ckpt=True)  # the recomputation adds a forward's worth
    assert ckpt.elementwise_seconds == pytest.approx(t.elementwise_seconds * 4 / 3)
    assert t.micro_seconds == pytest.approx(t.compute_seconds + t.elementwise_seconds)
    # per token, matmul FLOPs grow with hidden^2 and elementwise bytes with hidden: a narrow model spends a
    # larger share of its step in them (GPT-2 124M: a third; Llama-3-8B: about a tenth)
    small = build_layout(from_catalog(catalog.find_model("gpt2")))
    s_setup = resolve("full", SetupChoices(batch_size=8, seq_len=1024))
    s_counts = count_params(small, "full", s_setup.lora)
    narrow = step_time(small, s_setup, s_counts, catalog.get_gpu("A100-80GB"),
                       estimate_memory(small, s_setup, s_counts), tokens_per_sequence=1024)
    wide_setup, _, wide = timed("full", seq=1024, batch=8)
    share = lambda x: x.elementwise_seconds / x.kernel_seconds  # noqa: E731
    assert share(narrow) > 0.25 and share(wide) < 0.15


def test_longer_micro_batches_are_faster_per_token_on_a_power_capped_l4():
    # issue 12: two L4 runs at 2k and 4k tokens per micro-batch differ 1.6x per token, measured
    _, _, short = timed("qlora", gpu="L4", seq=2048)
    _, _, long = timed("qlora", gpu="L4", seq=4096)
    per_token = (short.seconds / 2048) / (long.seconds / 4096)
    assert per_token > 1.1
    assert short.t_half_tokens == pytest.approx(KAPPA * 121e12 / 300e9)


def test_qlora_pays_dequantization_at_a_quarter_of_bandwidth_per_pass():
    setup, _, t = timed("qlora")
    quantized = sum(g.weight_numel * LLAMA.instances(g) for g in LLAMA.modules if g.kind not in
                    ("embedding", "head", "norm"))
    passes = 3  # checkpointing is on for QLoRA
    expected = passes * quantized * 2.5 / (2039e9 * 0.253)
    assert t.dequant_seconds == pytest.approx(expected, rel=1e-3)
    assert dequant_seconds(LLAMA, setup.model_copy(update={"method": "lora"}), catalog.get_gpu("A100-80GB")) == 0


def test_full_fine_tuning_pays_a_memory_bound_optimizer_step():
    _, memory, full = timed("full", gpu="H100", seq=512)
    moved = memory.weights_bytes + memory.gradients_bytes + memory.optimizer_bytes
    assert moved == pytest.approx(16 * LLAMA.total_params(), rel=0.01)   # fp32 weights, grads, two moments
    assert full.optimizer_seconds == pytest.approx(RULES.optimizer_step.passes_per_byte * moved / 3350e9)
    _, _, lora = timed("lora", gpu="H100", seq=512)
    assert lora.optimizer_seconds < full.optimizer_seconds / 100
    # paid once per optimizer step, not per micro-batch
    _, _, accumulated = timed("full", gpu="H100", seq=512, accum=4)
    assert accumulated.seconds == pytest.approx(4 * full.micro_seconds + full.optimizer_seconds)


def test_a_tiny_micro_batch_is_bound_by_kernel_launches():
    _, _, t = timed("lora", seq=16)
    assert t.bound == "launch"
    assert t.micro_seconds == pytest.approx(RULES.launch_floor.seconds_per_layer_pass * 32 * 2)
    _, _, big = timed("lora", seq=4096)
    assert big.bound == "compute"


def test_fsdp_gathers_qlora_weights_as_stored_and_full_weights_in_bf16():
    setup, memory, _ = timed("qlora")  # 4-bit blocks as stored; fp32 embeddings, norms and head as bf16
    fp32 = memory.weights_by_dtype["fp32"] + memory.adapter_bytes
    assert travelling_weight_bytes(setup, memory) == memory.weights_by_dtype["nf4"] + fp32 // 2
    assert travelling_weight_bytes(setup, memory) < 0.4 * 2 * LLAMA.total_params()
    setup, memory, _ = timed("full")
    assert travelling_weight_bytes(setup, memory) == 2 * LLAMA.total_params()       # fp32 masters travel as bf16


def test_fsdp_hides_gathers_behind_compute_and_shards_the_optimizer_step():
    p4de = catalog.get_instance("p4de.24xlarge")
    _, memory, alone = timed("full", seq=4096)
    _, _, sharded = timed("full", seq=4096, parallel=Parallel(instance=p4de, count=1, sharding="fsdp"))
    moved = 2 * 2 * LLAMA.total_params() + memory.gradients_bytes
    assert sharded.gather_seconds == pytest.approx(gather_seconds(moved, p4de, 1))
    assert sharded.micro_seconds == pytest.approx(max(alone.micro_seconds, sharded.gather_seconds))
    assert sharded.optimizer_seconds == pytest.approx(alone.optimizer_seconds / 8)
    assert sharded.sync_seconds == 0  # full fine-tuning reduce-scatters inside every micro-batch


def test_fsdp_reduce_scatters_gradients_once_per_step_under_no_sync_else_every_micro_batch():
    p4de = catalog.get_instance("p4de.24xlarge")
    fsdp = Parallel(instance=p4de, count=1, sharding="fsdp")
    _, memory, trainer = timed("full", seq=4096, parallel=fsdp, accum=4)
    _, _, synced = timed("full", seq=4096, parallel=fsdp, accum=4, sync_each_batch=True)
    weights = 2 * 2 * LLAMA.total_params()
    assert trainer.gather_seconds == pytest.approx(gather_seconds(weights + memory.gradients_bytes / 4, p4de, 1))
    assert synced.gather_seconds == pytest.approx(gather_seconds(weights + memory.gradients_bytes, p4de, 1))
    _, _, one = timed("full", seq=4096, parallel=fsdp)  # one micro-batch: the step's only one reduces either way
    assert one.gather_seconds == pytest.approx(synced.gather_seconds)


def test_zero3_waits_for_its_gathers_while_fsdp_prefetches_them():
    p4de = catalog.get_instance("p4de.24xlarge")
    _, _, fsdp = timed("full", seq=512, parallel=Parallel(instance=p4de, count=2, sharding="fsdp"))
    _, _, zero3 = timed("full", seq=512, parallel=Parallel(instance=p4de, count=2, sharding="zero3"))
    assert fsdp.gathers_hidden and not zero3.gathers_hidden
    assert zero3.gather_seconds == pytest.approx(fsdp.gather_seconds)
    assert zero3.micro_seconds == pytest.approx(zero3.busy_seconds + zero3.gather_seconds)
    assert fsdp.micro_seconds == pytest.approx(max(fsdp.busy_seconds, fsdp.gather_seconds))
    assert zero3.seconds > fsdp.seconds


def test_ddp_all_reduce_is_exposed_only_beyond_the_last_backward():
    g5 = catalog.get_instance("g5.12xlarge")  # 4 x A10G on PCIe
    _, memory, t = timed("full", gpu="A10G", seq=512, precision="bf16",
                         parallel=Parallel(instance=g5, count=1, sharding="ddp"))
    reduce = allreduce_seconds(memory.gradients_bytes, g5, 1)
    # the backward's memory-bound kernels hide the all-reduce as well as its matmuls do
    assert t.sync_seconds == pytest.approx(reduce - 0.667 * (t.compute_seconds + t.elementwise_seconds))
    assert t.sync_seconds > 0
    _, memory, q = timed("qlora", gpu="A10G", seq=64, parallel=Parallel(instance=g5, count=1, sharding="ddp"))
    assert q.sync_seconds == max(0.0, allreduce_seconds(memory.gradients_bytes, g5, 1) - 0.667 * q.kernel_seconds)
    # 8 tokens on two p4de: the last backward lasts its kernel launches, and so does what it hides
    p4de = catalog.get_instance("p4de.24xlarge")
    _, memory, tiny = timed("full", seq=8, precision="bf16", parallel=Parallel(instance=p4de, count=2, sharding="ddp"))
    assert tiny.launch_floor_seconds > tiny.kernel_seconds
    reduce = allreduce_seconds(memory.gradients_bytes, p4de, 2)
    assert tiny.sync_seconds == pytest.approx(reduce - 0.667 * tiny.launch_floor_seconds) and tiny.sync_seconds > 0


def test_a_small_qlora_micro_batch_is_bound_by_dequantization_not_by_its_matmuls():
    _, _, t = timed("qlora", seq=128)   # 128 tokens: every 4-bit weight dequantized per pass outweighs the matmuls
    assert t.dequant_seconds + t.elementwise_seconds > t.compute_seconds
    assert t.kernel_seconds > t.launch_floor_seconds
    assert t.bound == "memory"
    _, _, long = timed("qlora", seq=4096)
    assert long.bound == "compute"
    # a calibration against a memory-bound step still moves only the matmuls' ceiling
    assert calibrated_u_max(t, t.seconds + t.compute_seconds) == pytest.approx(t.u_max / 2)


def test_calibration_gives_the_ceiling_that_reproduces_the_measured_step():
    setup, memory, t = timed("qlora", gpu="L4", seq=2048, accum=4)
    counts = count_params(LLAMA, "qlora", setup.lora)
    for measured in (t.seconds * 1.3, t.seconds * 0.8):
        u = calibrated_u_max(t, measured)
        again = step_time(LLAMA, setup, counts, catalog.get_gpu("L4"), memory, tokens_per_sequence=2048, accum=4,
                          u_max=(u, "calibrated"))
        assert again.seconds == pytest.approx(measured)
    assert calibrated_u_max(t, t.seconds / 100) == 1.0  # never above the peak


def test_ceilings_fall_back_by_architecture_then_to_the_catalogued_fallback():
    util = RULES.utilization
    assert util.u_max("H200", "hopper")[0] == util.u_max("H100", "hopper")[0]
    assert util.u_max("A100-PCIe-40GB", "ampere")[1].startswith("ampere default")
    assert util.u_max("A10G", "ampere")[1].startswith("fitted for A10G")  # a 150 W part, slower than A100
    assert util.u_max("B200", "blackwell")[0] == util.u_max("H100", "hopper")[0]
    assert util.u_max("X1", "unknown") == (util.fallback, util.fallback_source)


@pytest.mark.parametrize("text, gbytes", [("4x100 Gb", 50), ("up to 25 Gb", 3.125), ("3200 Gb", 400),
                                          ("100 Gb", 12.5), ("garbage", 1.25)])
def test_network_strings(text, gbytes):
    assert network_gbytes_per_s(text) == gbytes


def test_across_instances_a_gpu_shares_the_whole_network_up_to_its_own_link():
    grads = 10**9
    p4d = catalog.get_instance("p4d.24xlarge")     # 8 x A100 on NVSwitch (300 GB/s), EFA 4 x 100 Gb = 50 GB/s
    assert allreduce_seconds(grads, p4d, 1) == pytest.approx(2 * 7 / 8 * grads / (300e9 * 0.8))
    assert allreduce_seconds(grads, p4d, 2) == pytest.approx(2 * 15 / 16 * grads / (50e9 * 0.8))
    g5 = catalog.get_instance("g5.xlarge")         # one A10G, no EFA, up to 10 Gb: half of it without EFA
    assert allreduce_seconds(grads, g5, 1) == 0
    assert allreduce_seconds(grads, g5, 4) == pytest.approx(2 * 3 / 4 * grads / (1.25 / 2 * 1e9 * 0.8))
    assert math.isfinite(allreduce_seconds(grads, catalog.get_instance("g4dn.12xlarge"), 1))


def test_measure_reads_an_accumulating_step_per_optimizer_step():
    """`measure --grad-accum N` on a GPU: tokens/s over N micro-batches and one optimizer step. A step measured
    exactly as modelled calibrates to the model's own ceiling and predicts the measured throughput (reading it
    per micro-batch would calibrate N times too slow)."""
    from ftplan.measure.runner import throughput_figures

    _, _, t = timed("qlora", gpu="L4", seq=2048, accum=4)
    as_modelled = t.tokens_per_micro_batch * 4 / t.seconds
    utilization, predicted, u_max = throughput_figures(t, as_modelled)
    assert predicted == pytest.approx(as_modelled) and u_max == pytest.approx(t.u_max)
    assert utilization == pytest.approx(t.flops_per_token.total * as_modelled / t.peak_flops)


def test_eager_attention_moves_every_score_and_sdpa_none():
    _, _, sdpa = timed("lora", seq=2048)
    assert sdpa.attention_seconds == 0 and sdpa.kernel_seconds == pytest.approx(sdpa.compute_seconds
                                                                                 + sdpa.elementwise_seconds)
    _, _, eager = timed("lora", seq=2048, attention="eager")
    scores = 1 * 32 * 2048 ** 2 * 32  # sequences x query heads x the whole square x layers
    rules = RULES.eager_attention
    per_score = rules.forward_bytes_per_score + rules.backward_bytes_per_score
    assert eager.attention_seconds == pytest.approx(scores * per_score / 2039e9)
    _, _, ckpt = timed("lora", seq=2048, attention="eager", grad_ckpt=True)  # the recomputation: a forward more
    assert ckpt.attention_seconds == pytest.approx(scores * (per_score + rules.forward_bytes_per_score) / 2039e9)
    # eager's score matmuls run at the matmul rate, SDPA's fused kernel at its own
    at_matmul_rate = sdpa.compute_seconds * sdpa.flops_per_token.total / sdpa.flops_per_token.weighted(
        sdpa.attention_kernel_ratio)
    assert eager.seconds == pytest.approx(sdpa.seconds - sdpa.compute_seconds + at_matmul_rate
                                          + eager.attention_seconds)
    _, _, long = timed("lora", seq=4096, attention="eager")
    assert long.attention_seconds == pytest.approx(4 * eager.attention_seconds)  # the square of the sequence


def test_a_model_without_sdpa_trains_with_eager_attention_and_pays_for_its_scores():
    bloom = build_layout(from_catalog(catalog.find_model("bloom-560m")))
    setup = resolve("lora", SetupChoices(batch_size=1, seq_len=2048), model_type=bloom.model_type)
    assert setup.attention == "eager"  # transformers has no SDPA path for BLOOM
    counts = count_params(bloom, "lora", setup.lora)
    t = step_time(bloom, setup, counts, catalog.get_gpu("A100-80GB"), estimate_memory(bloom, setup, counts),
                  tokens_per_sequence=2048)
    assert t.attention_seconds > 0.3 * t.compute_seconds
    # Gemma-2 has an SDPA path in transformers 5.17 and takes it by default
    assert resolve("lora", SetupChoices(), model_type="gemma2").attention == "sdpa"


def test_a_calibration_records_the_constants_its_step_was_solved_in_and_is_restated_only_where_it_can_be():
    _, _, sdpa = timed("lora", seq=2048)
    _, _, eager = timed("lora", seq=2048, attention="eager")
    today = (RULES.elementwise.bytes_per_hidden, RULES.eager_attention.bytes_per_score)
    assert solved_constants(None) == {}  # nothing was solved without a step
    assert tuple(solved_constants(eager).values()) == (*today, 1.0)  # eager's score matmuls: the matmul rate
    assert solved_constants(sdpa)["eager_bytes_per_score"] == 0  # a step without the term was not solved with it
    assert solved_constants(sdpa)["attention_kernel_ratio"] == RULES.fused_attention.ratio("sdpa", "ampere") < 1
    old_plan = eager.model_copy(update={"elementwise_seconds": 0.0, "attention_seconds": 0.0,
                                        "elementwise_bytes_per_hidden": None})  # before both terms
    assert tuple(solved_constants(old_plan).values()) == (0.0, 0.0, 1.0)
    # a plan's step carries the elementwise constant it was computed with: a calibration from it records that one
    planned = sdpa.model_copy(update={"elementwise_bytes_per_hidden": 147.8})
    assert solved_constants(planned)["elementwise_bytes_per_hidden"] == 147.8 != today[0]
    # restated: at the new ceiling the step takes what it took then (512 tokens: the scores are a small term)
    _, _, short = timed("lora", seq=512, attention="eager", u_max=0.5)
    then = short.model_copy(update={"attention_seconds": 0.0})
    u = rebased_u_max(short, today[0], 0.0)
    assert 0.5 < u < 1 and short.model_copy(update={"u_max": u, "compute_seconds": short.compute_seconds * 0.5 / u}
                                               ).seconds == pytest.approx(then.seconds)
    # 2,048 tokens: giving back eager's scores would take the matmuls past the dense peak: kept as calibrated
    assert eager.attention_seconds > eager.compute_seconds * (1 - eager.u_max)
    assert rebased_u_max(eager, today[0], 0.0) == eager.u_max


def test_attention_flops_run_at_their_kernels_rate_and_older_calibrations_are_restated_for_it():
    kernels = RULES.fused_attention
    for arch in ("ampere", "hopper", "ada"):
        assert kernels.ratio("sdpa", arch) == kernels.ratio("flash_attention_2", arch) < 1
        assert kernels.ratio("eager", arch) == 1.0
        assert kernels.ratio("flash-attn-triton-2023", arch) < kernels.ratio("sdpa", arch)  # only the runs name it
    assert kernels.ratio("sdpa", "hopper") < kernels.ratio("sdpa", "ampere")  # FlashAttention-2 on an H100: 35%
    setup, memory, sdpa = timed("full", seq=16384, u_max=0.5)
    counts = count_params(LLAMA, "full", None)
    triton = step_time(LLAMA, setup, counts, catalog.get_gpu("A100-80GB"), memory, tokens_per_sequence=16384,
                       u_max=(0.5, "test"), attention_kernel="flash-attn-triton-2023")
    at_matmul_rate = sdpa.compute_seconds / sdpa.flops_per_token.weighted(sdpa.attention_kernel_ratio) \
        * sdpa.flops_per_token.total
    assert at_matmul_rate < sdpa.compute_seconds < triton.compute_seconds  # 16k tokens: attention is a third
    # a calibration solved while attention ran at the matmuls' rate (ratio 1): the ceiling under which today's
    # step takes what that step took
    u = rebased_u_max(sdpa, RULES.elementwise.bytes_per_hidden, None, 1.0)
    assert u > 0.5 and sdpa.compute_seconds * 0.5 / u == pytest.approx(at_matmul_rate)
    assert rebased_u_max(sdpa, RULES.elementwise.bytes_per_hidden, None, kernels.ratio("sdpa", "ampere")) == 0.5


def test_fp32_matmuls_run_on_the_cuda_cores_unless_tf32_is_on_and_the_gpu_has_it():
    from ftplan.estimate.compute import peak_flops

    fp32, tf32 = (resolve("full", SetupChoices(precision="fp32", tf32=on)) for on in (False, True))
    for name in ("A100-80GB", "L40S", "L4", "H100", "RTX 4090", "A10G"):
        gpu = catalog.get_gpu(name)
        assert peak_flops(gpu, fp32) == gpu.fp32_tflops * 1e12 and peak_flops(gpu, tf32) == gpu.tf32_tflops * 1e12
        assert gpu.fp32_tflops <= gpu.tf32_tflops < (gpu.bf16_tflops or gpu.fp16_tflops)
    a100, l40s, rtx = (catalog.get_gpu(n) for n in ("A100-80GB", "L40S", "RTX 4090"))
    # datacenter Ampere/Hopper: TF32 about 8x fp32; pro Ada: 2x; GeForce-rate tensor cores: no gain
    assert a100.tf32_tflops / a100.fp32_tflops == 8 and l40s.tf32_tflops / l40s.fp32_tflops == pytest.approx(2, 0.01)
    assert rtx.tf32_tflops == rtx.fp32_tflops
    v100 = catalog.get_gpu("V100-32GB")  # Volta has no TF32: the flag changes nothing
    assert v100.tf32_tflops is None and peak_flops(v100, tf32) == peak_flops(v100, fp32) == v100.fp32_tflops * 1e12
    unlisted = catalog.get_gpu("A100-80GB").model_copy(update={"fp32_tflops": None, "tf32_tflops": None})
    assert peak_flops(unlisted, tf32) == unlisted.fp16_tflops * 1e12 / 16  # a GPU registered without the figures


def test_tf32_is_kept_only_where_there_are_fp32_matmuls_and_makes_fp32_training_faster():
    assert resolve("lora", SetupChoices(tf32=True)).tf32 is False  # bf16-mixed: autocast leaves no fp32 matmul
    assert resolve("lora", SetupChoices(precision="fp32", tf32=True)).tf32 is True
    slow, fast = (timed("lora", precision="fp32", tf32=on)[2] for on in (False, True))
    assert fast.compute_seconds < slow.compute_seconds / 2 and fast.peak_flops > slow.peak_flops


def test_attention_flops_at_the_kernels_rate_include_the_recomputation_under_checkpointing():
    # counted by hand: attention's forward per token is 2 x layers x context x q_dim (causal), the backward twice
    # that, and checkpointing re-runs the forward; only those FLOPs are weighted by 1 / ratio
    r = RULES.fused_attention.ratio("sdpa", "ampere")
    seq, q_dim = 8192, 4096
    per_forward = 2 * 32 * seq * q_dim
    for ckpt, passes in ((False, 3), (True, 4)):
        _, _, sdpa = timed("lora", seq=seq, grad_ckpt=ckpt)
        _, _, eager = timed("lora", seq=seq, grad_ckpt=ckpt, attention="eager")  # ratio 1: the matmul rate
        extra = passes * per_forward * (1 / r - 1) * (seq + sdpa.t_half_tokens)  # one sequence per micro-batch
        assert sdpa.compute_seconds - eager.compute_seconds == pytest.approx(
            extra / (sdpa.peak_flops * sdpa.u_max))
