"""The memory model: hand-checked terms and the properties any sane estimate has."""

import math

import pytest

from ftplan.data import catalog
from ftplan.estimate.memory import estimate_memory, quantized_bytes
from ftplan.estimate.optimizer import Trainable, state_bytes, step_transient
from ftplan.estimate.settings import LoraSettings, SetupChoices, TrainingSetup, resolve
from ftplan.model.architectures import build_layout
from ftplan.model.resolve import from_catalog


def layout_of(name):
    return build_layout(from_catalog(catalog.find_model(name)))


def memory(name="llama2-7b", method="lora", **kw):
    lora = kw.pop("lora", LoraSettings())
    return estimate_memory(layout_of(name), resolve(method, SetupChoices(lora=lora, **kw)))


def test_full_bf16_mixed_is_sixteen_bytes_per_parameter_before_activations():
    m = memory(method="full")
    total = layout_of("llama2-7b").total_params()
    assert m.weights_bytes == 4 * total           # fp32 master weights
    assert m.gradients_bytes == 4 * total         # fp32 gradients
    assert m.optimizer_bytes == 8 * total         # AdamW exp_avg + exp_avg_sq in fp32


def test_pure_bf16_halves_weights_grads_and_states():
    total = layout_of("llama2-7b").total_params()
    m = memory(method="full", precision="bf16")
    assert (m.weights_bytes, m.gradients_bytes, m.optimizer_bytes) == (2 * total, 2 * total, 4 * total)


def test_lora_base_bf16_adapters_fp32():
    m = memory(method="lora", lora=LoraSettings(r=8))
    assert m.weights_by_dtype == {"bf16": 2 * layout_of("llama2-7b").total_params()}
    assert m.adapter_bytes == 4 * 32 * 2 * 8 * 8192
    assert m.gradients_bytes == m.adapter_bytes


def test_nf4_storage_by_hand():
    n = 4096 * 4096
    blocks = n // 64
    # packed 4-bit + uint8 absmax + fp32 absmax of absmax per 256 blocks + nested code + offset + NF4 code
    assert quantized_bytes(n, True) == n // 2 + blocks + math.ceil(blocks / 256) * 4 + 1024 + 4 + 64
    assert quantized_bytes(n, False) == n // 2 + blocks * 4 + 64


def test_qlora_weights_below_lora_for_llama():
    assert memory(method="qlora").weights_bytes < memory(method="lora").weights_bytes / 2


def test_qlora_keeps_embeddings_and_head_in_fp32():
    m = memory(method="qlora")
    fp32_expected = 4 * (2 * 32000 * 4096 + 65 * 4096)  # embed + head + 2 norms x 32 layers + final norm
    assert m.weights_by_dtype["fp32"] == fp32_expected


def test_falcon_qlora_is_not_quantized():
    """transformers 5 quantizes only exact nn.Linear; FalconLinear stays bf16, upcast to fp32."""
    m = memory("falcon-7b", method="qlora")
    assert m.weights_by_dtype["nf4"] == 0


def test_paged_optimizer_is_outside_peak_allocated_but_in_required():
    m = memory(method="qlora")
    assert m.optimizer_bytes == 0 and m.paged_optimizer_bytes > 0
    assert m.required_bytes > m.peak_allocated_bytes + m.paged_optimizer_bytes


def test_optimizer_state_sizes():
    lora = resolve("lora", SetupChoices())
    tensors = [Trainable((16, 4096)), Trainable((4096, 16)), Trainable((100,))]
    numel = 16 * 4096 * 2 + 100

    def states(name):
        return state_bytes(tensors, TrainingSetup(**{**lora.model_dump(), "optimizer": name}))

    assert states("adamw_torch_fused") == states("adamw_torch") == states("adamw") == 8 * numel  # old name: alias
    assert states("sgd") == 0
    assert states("adamw_bnb_8bit") == states("adamw_8bit") == 2 * (2 * 65536 + 2 * 256 * 4) + 8 * 100  # < 4096: fp32
    assert TrainingSetup(method="lora", optimizer="adamw_8bit").optimizer == "adamw_bnb_8bit"
    assert states("adafactor") == 4 * ((16 + 4096) * 2 + 100)
    # the Trainer keeps an nn.Embedding's 8-bit states at 32 bits
    full = resolve("full", SetupChoices(precision="bf16"))
    emb = [Trainable((32000, 4096), embedding=True), Trainable((4096, 4096))]
    eight = state_bytes(emb, full.model_copy(update={"optimizer": "adamw_bnb_8bit"}))
    assert eight == 8 * 32000 * 4096 + 2 * 4096 * 4096 + 2 * (4096 * 4096 // 256) * 4
    assert state_bytes(emb, full.model_copy(update={"optimizer": "adafactor"})) == 4 * (32000 + 4096 + 4096 + 4096)


def test_optimizer_step_temporaries_by_device():
    full = resolve("full", SetupChoices(precision="bf16-mixed"))  # fp32 master weights
    tensors = [Trainable((1000, 100), embedding=True), Trainable((100, 100)), Trainable((100,))]
    total, largest = 100_000 + 10_000 + 100, 100_000

    def step(name, device):
        return step_transient(tensors, full.model_copy(update={"optimizer": name}), device)

    assert step("adamw_torch_fused", "cuda") == step("adamw_torch_fused", "cpu") == step("sgd", "cpu") == 0
    assert step("adamw_torch", "cuda") == 4 * total            # foreach: sqrt of every exp_avg_sq at once
    assert step("adamw_torch", "cpu") == 2 * 4 * largest       # per-parameter loop
    assert step("adamw_bnb_8bit", "cuda") == step("paged_adamw_32bit", "cuda") == 0
    assert step("adamw_bnb_8bit", "cpu") == 12 * largest       # the embedding takes the 32-bit path
    assert step("paged_adamw_32bit", "cpu") == 12 * largest
    assert step("adafactor", "cuda") == 8 * largest


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("field, small, large", [("batch_size", 1, 4), ("seq_len", 256, 2048)])
def test_memory_grows_with_batch_and_sequence(method, field, small, large):
    a = memory(method=method, **{field: small})
    b = memory(method=method, **{field: large})
    assert b.activations_bytes > a.activations_bytes
    assert b.peak_allocated_bytes >= a.peak_allocated_bytes


def test_memory_grows_with_rank():
    assert memory(lora=LoraSettings(r=64)).peak_allocated_bytes > memory(lora=LoraSettings(r=8)).peak_allocated_bytes


def test_checkpointing_cuts_activations():
    off = memory(grad_ckpt=False)
    on = memory(grad_ckpt=True)
    assert on.activations_bytes < off.activations_bytes / 4


def test_eager_attention_adds_the_score_matrices():
    sdpa = memory(attention="sdpa", seq_len=4096)
    eager = memory(attention="eager", seq_len=4096)
    heads, s = 32, 4096
    per_layer_scores = heads * s * s * (4 + 2)  # fp32 softmax output + its bf16 copy
    assert eager.activation_terms["attn_scores"] == per_layer_scores
    assert eager.activations_bytes > sdpa.activations_bytes


def test_large_vocabulary_logits_dominate_qlora():
    m = memory("llama3-8b", method="qlora", seq_len=4096)
    tokens = 4096
    assert m.head_terms["log_softmax"] == tokens * 128256 * 4
    others = [v for k, v in m.head_terms.items() if k != "log_softmax"]
    assert m.head_terms["log_softmax"] > max(others)
    assert m.head_terms["log_softmax"] > m.activations_per_layer_bytes  # more than a whole decoder layer


def test_no_bf16_gpu_switches_to_fp16():
    setup = resolve("lora", SetupChoices(), bf16_supported=False)
    assert setup.precision == "fp16-mixed"


def test_all_figures_are_non_negative_integers():
    for method in ("full", "lora", "qlora"):
        m = memory(method=method)
        for name, value in m.model_dump().items():
            if isinstance(value, int):
                assert value >= 0, name


def test_setup_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="batch-size"):
        TrainingSetup(method="lora", batch_size=0)


@pytest.mark.parametrize("method, precision, targets, buffered", [
    ("lora", "bf16-mixed", ["all-linear"], True),    # folded bf16 expert weights: their gradient on the CPU
    ("full", "bf16", None, True),                    # bf16 experts trained directly
    ("qlora", "bf16-mixed", ["all-linear"], False),  # experts upcast to fp32: an fp32 gemm, no buffer
    ("full", "bf16-mixed", None, False),             # fp32 masters
    ("lora", "bf16-mixed", None, False),             # experts frozen: no weight gradient
])
def test_cpu_grouped_mm_buffers_a_half_expert_gradient_in_fp32(method, precision, targets, buffered):
    from ftplan.estimate.activations import cpu_expert_gradient
    from ftplan.estimate.params import adapted_groups, count_params

    layout = build_layout(from_catalog(catalog.find_model("mixtral-8x7b")))
    lora = LoraSettings(targets=targets, dropout=0.0) if targets else LoraSettings(dropout=0.0)
    setup = TrainingSetup(method=method, precision=precision, seq_len=128, lora=None if method == "full" else lora)
    counts = count_params(layout, setup.method, setup.lora)
    adapted = adapted_groups(layout, counts.targets) if counts.targets else []
    assert cpu_expert_gradient(layout, setup, adapted, "cuda") == 0
    # one expert's fused gate_up weight (28672 x 4096) in fp32, outside torch's allocator; under full
    # fine-tuning the layer's bf16 expert gradients (gate_up and down, 8 experts) exist beside it
    buffer = 4 * 28672 * 4096 + (2 * (8 * 28672 * 4096 + 8 * 4096 * 14336) if method == "full" else 0)
    assert cpu_expert_gradient(layout, setup, adapted, "cpu") == (buffer if buffered else 0)
    cpu, cuda = (estimate_memory(layout, setup, device=d).phase_bytes for d in ("cpu", "cuda"))
    if method == "full":  # inside the layer's backward, over before its end: the end of backward is the same
        first = "backward through the first layer"
        assert cpu[first][1] - cuda[first][1] == (buffer if buffered else 0)
        assert cpu["end of backward (all gradients)"] == cuda["end of backward (all gradients)"]


@pytest.mark.parametrize("name", ["llama2-7b", "qwen2.5-0.5b"])  # untied and tied head
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_accumulation_holds_every_gradient_in_every_phase(name, method):
    layout = layout_of(name)
    setup = resolve(method, SetupChoices(seq_len=512))
    one, acc = estimate_memory(layout, setup), estimate_memory(layout, setup, accumulating=True)
    assert acc.accumulating and not one.accumulating
    assert all(grads == acc.gradients_bytes for grads, _ in acc.phase_bytes.values())
    for phase, (grads, other) in one.phase_bytes.items():  # nothing held or transient is less than before
        assert sum(acc.phase_bytes[phase]) >= grads + other
    assert acc.peak_allocated_bytes >= one.peak_allocated_bytes
    forward = "end of forward (activations + logits)"
    assert sum(acc.phase_bytes[forward]) == sum(one.phase_bytes[forward]) + acc.gradients_bytes


def test_accumulation_full_fine_tuning_by_hand():
    """Llama-2-7B, bf16-mixed, 1 x 2048, no checkpointing: backward start holds the fp32 gradients of the earlier
    micro-steps (4 bytes x 6.74 G); the head's backward makes its new gradient in bf16 and casts it to fp32
    beside them, once its saved input and weight copy are gone."""
    layout = layout_of("llama2-7b")
    setup = resolve("full", SetupChoices())
    one, acc = estimate_memory(layout, setup), estimate_memory(layout, setup, accumulating=True)
    start = "backward start (activations + loss gradients)"
    head = 32000 * 4096
    assert sum(acc.phase_bytes[start]) - sum(one.phase_bytes[start]) == 4 * layout.total_params()
    head_input, copy, log_softmax = 2048 * 4096 * 2, head * 2, 2048 * 32000 * 4
    loss_gradients = 2048 * 32000 * 8  # log-softmax's fp32 output and input gradients
    cast = sum(acc.phase_bytes[start]) - loss_gradients - log_softmax - head_input - copy + head * 6
    assert sum(acc.phase_bytes["backward through the head (its new gradient)"]) == cast
    assert acc.peak_phase == start and acc.peak_allocated_bytes - one.peak_allocated_bytes > 25 * 2**30


def test_accumulation_tied_head_gradient_waits_for_the_embedding():
    """Qwen2.5-0.5B (tied): from the head's backward to the embedding's, autograd holds the head's new gradient
    apart from .grad; at the end the embedding's dense gradient joins it."""
    layout = layout_of("qwen2.5-0.5b")
    setup = resolve("full", SetupChoices(seq_len=64))
    acc = estimate_memory(layout, setup, accumulating=True)
    tied = 151936 * 896
    grads, other = acc.phase_bytes["end of backward (all gradients)"]
    assert grads == acc.gradients_bytes and other >= 4 * tied + 4 * tied  # pending head gradient + dense one
