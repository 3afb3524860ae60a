"""Counting with transformers + PEFT on the meta device: the reference for the analytic counts,
and the fallback for architectures ftplan does not model by hand. Needs the `train` extra;
torch and transformers are imported only inside these functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ftplan.errors import PlannerError
from ftplan.model.layout import ArchFeatures, ModelLayout, ModuleGroup, ModuleKind
from ftplan.model.spec import ModelSpec


def transformers_version() -> str:
    import transformers

    return transformers.__version__


@contextmanager
def _config_warnings_silenced() -> Iterator[None]:
    """transformers warns about config values that do not matter to a count (token ids beyond a small vocabulary,
    say); left on, they would precede ftplan's own one-line error or output, so only errors pass while it counts."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def build_meta_model(config: dict[str, Any], *, trust_remote_code: bool = False):
    """Instantiate the causal LM of `config` on the meta device, with tied weights re-tied.

    Built under `torch.device("meta")` rather than `init_empty_weights()`, which under
    transformers 5 loses the embedding/head tie and over-counts tied models.
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PlannerError("counting this architecture needs transformers and torch: "
                           "pip install 'ftplan[train]'") from exc
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        with _config_warnings_silenced():
            hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        raise PlannerError(f"transformers {transformers_version()} does not know model_type '{model_type}' and "
                           "ftplan has no analytic layout for it; check the config.json, or upgrade transformers "
                           "if the architecture is new") from exc
    _require_causal_lm(model_type, hf_config)
    try:
        with torch.device("meta"), _config_warnings_silenced():
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, RuntimeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PlannerError(f"transformers {transformers_version()} cannot build model_type '{model_type}' from this "
                           f"config ({detail}); check the config.json") from exc
    model.tie_weights()
    return model


def _require_causal_lm(model_type: str, hf_config) -> None:
    """ftplan plans decoder-only language models: encoder-decoder, vision-language, vision and speech models
    (t5, whisper, llava, qwen2_vl, clip...) are refused by name before anything is built."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(hf_config, "is_encoder_decoder", False):
        raise PlannerError(f"model_type '{model_type}' is an encoder-decoder model, not a causal language model; "
                           "ftplan plans decoder-only LLMs (Llama, Mistral, Qwen...)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PlannerError(f"model_type '{model_type}' is not a causal language model (transformers has no "
                           "AutoModelForCausalLM for it: a vision-language, vision or speech model); ftplan plans "
                           "decoder-only LLMs - for a vision-language model, plan its text model's config")


def count_total(model) -> int:
    """Parameters of a built model, each shared tensor once (what `model.parameters()` yields)."""
    return sum(p.numel() for p in model.parameters())


def count_lora_trainable(model, targets: list[str] | str, r: int) -> int:
    """Trainable parameters after PEFT wraps `model` with LoRA rank `r` on `targets`."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _kind(module, model) -> ModuleKind | None:
    import torch
    from transformers.pytorch_utils import Conv1D

    if module is model.get_output_embeddings():
        return "head"
    if type(module) is torch.nn.Linear:
        return "linear"
    if isinstance(module, torch.nn.Linear):
        return "linear_subclass"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return None


def layout_from_model(spec: ModelSpec, *, trust_remote_code: bool = False) -> ModelLayout:
    """A ModelLayout read off the real module tree, for architectures without an analytic builder.

    Every module with its own parameters becomes a group; layer-indexed names are folded into
    one per-layer group when all layers agree, so the memory model treats them like the
    hand-written layouts.
    """
    model = build_meta_model(spec.config, trust_remote_code=trust_remote_code)
    tied_head = spec.dims.tied_embeddings
    groups: dict[str, ModuleGroup] = {}
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        kind = _kind(module, model)
        if not own and kind != "head":
            continue
        numel = sum(p.numel() for n, p in own if n != "bias")
        bias = sum(p.numel() for n, p in own if n == "bias")
        parts = name.split(".")
        folded = ".".join("N" if p.isdigit() else p for p in parts)
        per_layer = folded != name
        if kind is None:
            kind = "norm" if "norm" in type(module).__name__.lower() else "other"
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if weight is not None else (numel,)
        # nn.Linear stores (out, in); Conv1D and embeddings store (in or rows, out)
        n_out, n_in = (shape[0], shape[-1]) if kind in ("linear", "linear_subclass", "head") else (shape[-1], shape[0])
        group = ModuleGroup(path=folded, kind=kind, in_features=n_in, out_features=n_out,
                            weight_numel=numel if kind != "head" else n_in * n_out, bias=bias, per_layer=per_layer,
                            shared_weight=kind == "head" and tied_head)
        groups.setdefault(folded, group)
        counts[folded] = counts.get(folded, 0) + 1
    layers = spec.dims.layers
    for path, n in counts.items():
        if groups[path].per_layer and n != layers:
            raise PlannerError(f"{spec.name}: module '{path}' appears {n} times for {layers} layers; "
                               "this architecture cannot be folded per layer")
    return ModelLayout(model_type=spec.model_type, dims=spec.dims, modules=list(groups.values()),
                       features=ArchFeatures())
