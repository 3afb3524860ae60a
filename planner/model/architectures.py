"""Module inventories of the architectures ftplan counts analytically, without torch.

Each builder lists the modules transformers instantiates for a model type (path, kind, shape,
bias), so that parameter counts, LoRA targets and quantization follow from one description.
Paths use `N` for the layer index, e.g. `model.layers.N.self_attn.q_proj`.
"""

from __future__ import annotations

from typing import Callable

from ftplan.errors import PlannerError
from ftplan.model.layout import ArchFeatures, InputRole, ModelLayout, ModuleGroup, ModuleKind
from ftplan.model.spec import Dims, ModelSpec


def _linear(path: str, n_in: int, n_out: int, bias: bool = False, kind: ModuleKind = "linear",
            role: InputRole = "none", per_layer: bool = True) -> ModuleGroup:
    return ModuleGroup(path=path, kind=kind, in_features=n_in, out_features=n_out, weight_numel=n_in * n_out,
                       bias=n_out if bias else 0, per_layer=per_layer, role=role)


def _norm(path: str, width: int, bias: bool, per_layer: bool = True) -> ModuleGroup:
    return ModuleGroup(path=path, kind="norm", in_features=width, out_features=width, weight_numel=width,
                       bias=width if bias else 0, per_layer=per_layer)


def _embedding(path: str, num: int, dim: int) -> ModuleGroup:
    return ModuleGroup(path=path, kind="embedding", in_features=num, out_features=dim, weight_numel=num * dim,
                       role="embed")


def _head(dims: Dims, n_in: int | None = None, bias: bool = False, path: str = "lm_head") -> ModuleGroup:
    n_in = dims.hidden if n_in is None else n_in
    return ModuleGroup(path=path, kind="head", in_features=n_in, out_features=dims.vocab,
                       weight_numel=n_in * dims.vocab, bias=dims.vocab if bias else 0,
                       shared_weight=dims.tied_embeddings, role="final")


def _llama_family(spec: ModelSpec) -> ModelLayout:
    """Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma-2 and Phi-3: pre-norm, RMSNorm, rotary, gated MLP."""
    d, c, mt = spec.dims, spec.config, spec.model_type
    h, p = d.hidden, "model.layers.N"
    attn_bias = mt == "qwen2" or bool(c.get("attention_bias", False))
    mods = [_embedding("model.embed_tokens", d.vocab, h)]
    if mt == "phi3":
        mods.append(_linear(f"{p}.self_attn.qkv_proj", h, d.q_dim + 2 * d.kv_dim, role="attn_in"))
    else:
        mods += [_linear(f"{p}.self_attn.{n}_proj", h, width, attn_bias, role="attn_in")
                 for n, width in (("q", d.q_dim), ("k", d.kv_dim), ("v", d.kv_dim))]
    mods.append(_linear(f"{p}.self_attn.o_proj", d.q_dim, h, mt != "qwen2" and attn_bias, role="attn_out"))
    if mt == "qwen3":
        mods += [_norm(f"{p}.self_attn.q_norm", d.head_dim, False), _norm(f"{p}.self_attn.k_norm", d.head_dim, False)]
    mlp_bias = bool(c.get("mlp_bias", False))
    if mt == "mixtral":
        e, i = d.experts, d.intermediate
        mods += [
            ModuleGroup(path=f"{p}.mlp.gate", kind="router", in_features=h, out_features=e, weight_numel=h * e,
                        per_layer=True, role="mlp_in"),
            ModuleGroup(path=f"{p}.mlp.experts.gate_up_proj", kind="experts", in_features=h, out_features=2 * i,
                        weight_numel=e * 2 * i * h, per_layer=True, role="mlp_in", lora_rank_factor=2 * e),
            ModuleGroup(path=f"{p}.mlp.experts.down_proj", kind="experts", in_features=i, out_features=h,
                        weight_numel=e * h * i, per_layer=True, role="mlp_mid", lora_rank_factor=e),
        ]
    elif mt == "phi3":
        mods += [_linear(f"{p}.mlp.gate_up_proj", h, 2 * d.intermediate, role="mlp_in"),
                 _linear(f"{p}.mlp.down_proj", d.intermediate, h, role="mlp_mid")]
    else:
        mods += [_linear(f"{p}.mlp.gate_proj", h, d.intermediate, mlp_bias, role="mlp_in"),
                 _linear(f"{p}.mlp.up_proj", h, d.intermediate, mlp_bias, role="mlp_in"),
                 _linear(f"{p}.mlp.down_proj", d.intermediate, h, mlp_bias, role="mlp_mid")]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if mt == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    mods += [_norm(f"{p}.{n}", h, False) for n in norms]
    mods += [_norm("model.norm", h, False, per_layer=False), _head(d)]
    features = ArchFeatures(norms_per_layer=len(norms), qk_norm=mt == "qwen3",
                            embedding_scale=mt in ("gemma", "gemma2"), softcap=mt == "gemma2")
    return ModelLayout(model_type=mt, dims=d, modules=mods, features=features)


def _phi(spec: ModelSpec) -> ModelLayout:
    """Phi-1/Phi-2: parallel attention and MLP after one LayerNorm, biases everywhere, lm_head bias."""
    d, h, p = spec.dims, spec.dims.hidden, "model.layers.N"
    mods = [_embedding("model.embed_tokens", d.vocab, h)]
    mods += [_linear(f"{p}.self_attn.{n}_proj", h, w, True, role="attn_in")
             for n, w in (("q", d.q_dim), ("k", d.kv_dim), ("v", d.kv_dim))]
    if spec.config.get("qk_layernorm"):
        mods += [_norm(f"{p}.self_attn.q_layernorm", d.head_dim, True),
                 _norm(f"{p}.self_attn.k_layernorm", d.head_dim, True)]
    mods += [_linear(f"{p}.self_attn.dense", d.q_dim, h, True, role="attn_out"),
             _linear(f"{p}.mlp.fc1", h, d.intermediate, True, role="attn_in"),
             _linear(f"{p}.mlp.fc2", d.intermediate, h, True, role="mlp_mid"),
             _norm(f"{p}.input_layernorm", h, True),
             _norm("model.final_layernorm", h, True, per_layer=False), _head(d, bias=True)]
    return ModelLayout(model_type="phi", dims=d, modules=mods, features=ArchFeatures(
        norm="layer", norms_per_layer=1, gated_mlp=False, parallel_attn=True,
        qk_norm=bool(spec.config.get("qk_layernorm"))))


def _falcon(spec: ModelSpec) -> ModelLayout:
    """Falcon: fused query_key_value (MQA/GQA), FalconLinear layers, parallel attention."""
    d, c, h, p = spec.dims, spec.config, spec.dims.hidden, "transformer.h.N"
    bias = bool(c.get("bias", False))
    new_arch = bool(c.get("new_decoder_architecture", False))
    qkv = d.q_dim + 2 * d.kv_dim
    ffn = c.get("ffn_hidden_size") or 4 * h
    sub: ModuleKind = "linear_subclass"
    parallel = bool(c.get("parallel_attn", True))
    if new_arch and (c.get("num_ln_in_parallel_attn") or 2) == 2:
        norms = ["ln_attn", "ln_mlp"]
    else:
        norms = ["input_layernorm"] + ([] if parallel else ["post_attention_layernorm"])
    mlp_role: InputRole = "mlp_in" if len(norms) == 2 else "attn_in"  # one LN feeds attention and MLP
    mods = [_embedding("transformer.word_embeddings", d.vocab, h),
            _linear(f"{p}.self_attention.query_key_value", h, qkv, bias, sub, "attn_in"),
            _linear(f"{p}.self_attention.dense", d.q_dim, h, bias, sub, "attn_out"),
            _linear(f"{p}.mlp.dense_h_to_4h", h, ffn, bias, sub, mlp_role),
            _linear(f"{p}.mlp.dense_4h_to_h", ffn, h, bias, sub, "mlp_mid")]
    mods += [_norm(f"{p}.{n}", h, True) for n in norms]
    mods += [_norm("transformer.ln_f", h, True, per_layer=False), _head(d)]
    return ModelLayout(model_type="falcon", dims=d.model_copy(update={"intermediate": ffn}), modules=mods,
                       features=ArchFeatures(norm="layer", norms_per_layer=len(norms), gated_mlp=False,
                                             parallel_attn=parallel or new_arch))


def _gpt2(spec: ModelSpec) -> ModelLayout:
    """GPT-2: Conv1D layers with a fused c_attn, learned positions, LayerNorm, tied head."""
    d, h, p = spec.dims, spec.dims.hidden, "transformer.h.N"
    positions = spec.config.get("n_positions") or d.max_positions or 1024
    mods = [_embedding("transformer.wte", d.vocab, h), _embedding("transformer.wpe", positions, h),
            _norm(f"{p}.ln_1", h, True),
            _linear(f"{p}.attn.c_attn", h, 3 * h, True, "conv1d", "attn_in"),
            _linear(f"{p}.attn.c_proj", h, h, True, "conv1d", "attn_out"),
            _norm(f"{p}.ln_2", h, True),
            _linear(f"{p}.mlp.c_fc", h, d.intermediate, True, "conv1d", "mlp_in"),
            _linear(f"{p}.mlp.c_proj", d.intermediate, h, True, "conv1d", "mlp_mid"),
            _norm("transformer.ln_f", h, True, per_layer=False), _head(d)]
    return ModelLayout(model_type="gpt2", dims=d, modules=mods,
                       features=ArchFeatures(norm="layer", gated_mlp=False, rotary=False))


def _opt(spec: ModelSpec) -> ModelLayout:
    """OPT: learned positions with 2 extra rows, optional project_in/out, post- or pre-LN."""
    d, c, h, p = spec.dims, spec.config, spec.dims.hidden, "model.decoder.layers.N"
    proj = c.get("word_embed_proj_dim") or h
    bias = bool(c.get("enable_bias", True))
    affine = bool(c.get("layer_norm_elementwise_affine", True))
    mods = [_embedding("model.decoder.embed_tokens", d.vocab, proj),
            _embedding("model.decoder.embed_positions", (d.max_positions or 2048) + 2, h)]
    if proj != h:
        mods += [_linear("model.decoder.project_out", h, proj, per_layer=False, role="final"),
                 _linear("model.decoder.project_in", proj, h, per_layer=False, role="embed")]
    mods += [_linear(f"{p}.self_attn.{n}_proj", h, h, bias, role="attn_in") for n in ("k", "v", "q")]
    mods += [_linear(f"{p}.self_attn.out_proj", h, h, bias, role="attn_out"),
             _linear(f"{p}.fc1", h, d.intermediate, bias, role="mlp_in"),
             _linear(f"{p}.fc2", d.intermediate, h, bias, role="mlp_mid")]
    if affine:
        mods += [_norm(f"{p}.self_attn_layer_norm", h, True), _norm(f"{p}.final_layer_norm", h, True)]
        if c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False):
            mods.append(_norm("model.decoder.final_layer_norm", h, True, per_layer=False))
    mods.append(_head(d, n_in=proj))
    return ModelLayout(model_type="opt", dims=d, modules=mods,
                       features=ArchFeatures(norm="layer", gated_mlp=False, rotary=False))


def _gpt_neox(spec: ModelSpec) -> ModelLayout:
    """GPT-NeoX / Pythia: fused query_key_value with bias, parallel residual, partial rotary."""
    d, c, h, p = spec.dims, spec.config, spec.dims.hidden, "gpt_neox.layers.N"
    bias = bool(c.get("attention_bias", True))
    mods = [_embedding("gpt_neox.embed_in", d.vocab, h),
            _norm(f"{p}.input_layernorm", h, True), _norm(f"{p}.post_attention_layernorm", h, True),
            _linear(f"{p}.attention.query_key_value", h, 3 * h, bias, role="attn_in"),
            _linear(f"{p}.attention.dense", h, h, bias, role="attn_out"),
            _linear(f"{p}.mlp.dense_h_to_4h", h, d.intermediate, True, role="mlp_in"),
            _linear(f"{p}.mlp.dense_4h_to_h", d.intermediate, h, True, role="mlp_mid"),
            _norm("gpt_neox.final_layer_norm", h, True, per_layer=False), _head(d)]
    return ModelLayout(model_type="gpt_neox", dims=d, modules=mods, features=ArchFeatures(
        norm="layer", gated_mlp=False, parallel_attn=bool(c.get("use_parallel_residual", True))))


def _bloom(spec: ModelSpec) -> ModelLayout:
    """BLOOM: ALiBi (no positions), embedding LayerNorm, fused query_key_value, biases."""
    d, h, p = spec.dims, spec.dims.hidden, "transformer.h.N"
    mods = [_embedding("transformer.word_embeddings", d.vocab, h),
            _norm("transformer.word_embeddings_layernorm", h, True, per_layer=False),
            _norm(f"{p}.input_layernorm", h, True),
            _linear(f"{p}.self_attention.query_key_value", h, 3 * h, True, role="attn_in"),
            _linear(f"{p}.self_attention.dense", h, h, True, role="attn_out"),
            _norm(f"{p}.post_attention_layernorm", h, True),
            _linear(f"{p}.mlp.dense_h_to_4h", h, 4 * h, True, role="mlp_in"),
            _linear(f"{p}.mlp.dense_4h_to_h", 4 * h, h, True, role="mlp_mid"),
            _norm("transformer.ln_f", h, True, per_layer=False), _head(d)]
    return ModelLayout(model_type="bloom", dims=d.model_copy(update={"intermediate": 4 * h}), modules=mods,
                       features=ArchFeatures(norm="layer", gated_mlp=False, rotary=False, embedding_norm=True))


BUILDERS: dict[str, Callable[[ModelSpec], ModelLayout]] = {
    **{mt: _llama_family for mt in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "phi": _phi,
    "falcon": _falcon,
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    "bloom": _bloom,
}


# transformers 5 has no SDPA path for these (their PreTrainedModel leaves _supports_sdpa False): left alone it
# runs eager attention, and an explicit attn_implementation="sdpa" raises. (Gemma-2 has one since: transformers
# 5.17 builds it with SDPA by default, without the attention-score softcapping its eager path applies.)
NO_SDPA = {"bloom": "transformers has no SDPA path for BLOOM (its ALiBi attention)"}


def attention_for(model_type: str, requested: str | None) -> str:
    """The attention implementation a run uses: the one asked for, else what transformers picks for the
    architecture (SDPA, or eager where it has none); PlannerError for SDPA where transformers refuses it."""
    if requested == "sdpa" and model_type in NO_SDPA:
        raise PlannerError(f"--attn sdpa: {NO_SDPA[model_type]}; use --attn eager (its default) or "
                           "flash_attention_2")
    return requested or ("eager" if model_type in NO_SDPA else "sdpa")


def is_analytic(model_type: str) -> bool:
    """Whether ftplan counts this architecture without torch."""
    return model_type in BUILDERS


def build_layout(spec: ModelSpec) -> ModelLayout:
    """The analytic layout of `spec`; PlannerError for architectures ftplan does not model analytically."""
    builder = BUILDERS.get(spec.model_type)
    if builder is None:
        raise PlannerError(f"{spec.name}: model_type '{spec.model_type}' is not modelled analytically; "
                           f"install the training extra (pip install 'ftplan[train]') to count it with transformers")
    if spec.model_type == "mixtral" and not spec.dims.experts:
        raise PlannerError(f"{spec.name}: a mixtral config needs 'num_local_experts'; fix the config.json")
    layout = builder(spec)
    layout.features.dropout = _dropouts(spec.config, spec.model_type)
    layout.features.activation = _activation(spec)
    return layout


# transformers' config-class defaults where a config leaves dropout out (every other type defaults to 0)
DROPOUT_DEFAULTS = {"gpt2": {"attention": 0.1, "hidden": 0.1, "embedding": 0.1}, "opt": {"hidden": 0.1}}


def _dropouts(config: dict, model_type: str) -> dict[str, float]:
    """Dropout probabilities a config turns on during training (HF models train in .train() mode)."""
    defaults = DROPOUT_DEFAULTS.get(model_type, {})

    def first(where: str, *keys: str) -> float:
        return next((float(config[k]) for k in keys if isinstance(config.get(k), (int, float))),
                    defaults.get(where, 0.0))

    return {"attention": first("attention", "attention_dropout", "attn_pdrop"),
            "hidden": first("hidden", "resid_pdrop", "hidden_dropout", "dropout"),
            "embedding": first("embedding", "embd_pdrop")}


# transformers' config-class defaults where a config leaves the activation out
ACTIVATION_DEFAULTS = {"gpt2": "gelu_new", "phi": "gelu_new", "opt": "relu", "falcon": "gelu", "gpt_neox": "gelu",
                       "bloom": "bloom_gelu", "gemma": "gelu_pytorch_tanh", "gemma2": "gelu_pytorch_tanh"}


def _activation(spec: ModelSpec) -> str:
    """The MLP activation (it decides which elementwise intermediates autograd keeps)."""
    if spec.model_type == "bloom":  # BloomGelu trains through its own autograd function, whatever the config
        return "bloom_gelu"
    value = spec.config.get("activation_function") or spec.config.get("hidden_act") or \
        spec.config.get("hidden_activation")
    return value if isinstance(value, str) else ACTIVATION_DEFAULTS.get(spec.model_type, "silu")
