"""ModelSpec: a model's config.json read into the dimensions the estimator needs.

Config keys differ between families (`n_embd`, `n_embed`, `hidden_size`...); this module
normalises them once, with the defaults of each transformers config class, and rejects
configs that describe no buildable model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ftplan.errors import PlannerError

# transformers config-class defaults for tie_word_embeddings where the key is absent.
TIE_DEFAULTS = {
    "gemma": True,
    "gemma2": True,
    "falcon": True,
    "gpt2": True,
    "opt": True,
    "bloom": True,
}


class Dims(BaseModel):
    """Normalised architecture dimensions (all counts, no bytes)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_positions: int | None = None
    experts: int = 0
    experts_per_token: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


class ModelSpec(BaseModel):
    """A model as ftplan knows it: where it came from, its raw config and its dimensions."""

    name: str
    hf_id: str | None = None
    model_type: str
    source: str = Field(description="catalog, a config.json path, or the Hugging Face Hub")
    license: str | None = None
    config: dict[str, Any]
    dims: Dims
    local_dir: str | None = Field(None, description="directory of a local config.json (weights may sit beside it)")


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def _positive_int(value: Any, key: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlannerError(f"{name}: config field '{key}' must be a positive integer, got {value!r}; "
                           "fix the config.json")
    if value <= 0:
        raise PlannerError(f"{name}: config field '{key}' must be positive, got {value}; fix the config.json")
    return value


# Far beyond any released model (Llama-3.1-405B: 126 layers, hidden 16384, vocab 128k): a config past
# these is a typo or an attack, and would make the per-layer arithmetic crawl.
LIMITS = {"hidden_size": 131072, "num_hidden_layers": 2048, "num_attention_heads": 4096, "vocab_size": 16_777_216,
          "intermediate_size": 1_048_576, "head_dim": 16384, "num_key_value_heads": 4096, "num_local_experts": 4096}


def _within_limit(value: int, key: str, name: str) -> int:
    limit = LIMITS.get(key)
    if limit is not None and value > limit:
        raise PlannerError(f"{name}: config field '{key}' = {value:,} is beyond any real model (ftplan accepts up to "
                           f"{limit:,}); fix the config.json")
    return value


def _required(config: dict[str, Any], name: str, *keys: str) -> int:
    value = _first(config, *keys)
    if value is None:
        raise PlannerError(f"{name}: config.json has no '{keys[0]}' (nor {', '.join(keys[1:]) or 'an alias'}); "
                           "pass a complete config.json")
    return _within_limit(_positive_int(value, keys[0], name), keys[0], name)


def _kv_heads(config: dict[str, Any], model_type: str, heads: int) -> int:
    if model_type == "falcon" and not config.get("new_decoder_architecture"):
        return 1 if config.get("multi_query", True) else heads
    kv = _first(config, "num_key_value_heads", "num_kv_heads")
    return heads if kv is None else kv


def dims_from_config(config: dict[str, Any], name: str) -> Dims:
    """Read the dimensions of `config` (a config.json dict), or raise PlannerError naming the bad key."""
    model_type = config.get("model_type")
    hidden = _required(config, name, "hidden_size", "n_embd", "n_embed", "d_model")
    layers = _required(config, name, "num_hidden_layers", "n_layer", "num_layers")
    heads = _required(config, name, "num_attention_heads", "n_head", "num_heads")
    vocab = _required(config, name, "vocab_size")
    kv_heads = _within_limit(_positive_int(_kv_heads(config, model_type, heads), "num_key_value_heads", name),
                             "num_key_value_heads", name)
    if heads % kv_heads:
        raise PlannerError(f"{name}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                           f"({kv_heads}); fix the config.json")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise PlannerError(f"{name}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) "
                               "and the config sets no head_dim; fix the config.json")
        head_dim = hidden // heads
    head_dim = _within_limit(_positive_int(head_dim, "head_dim", name), "head_dim", name)
    intermediate = _first(config, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
    intermediate = 4 * hidden if intermediate is None else _within_limit(
        _positive_int(intermediate, "intermediate_size", name), "intermediate_size", name)
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = TIE_DEFAULTS.get(model_type, False)
    experts = config.get("num_local_experts") or 0
    if experts:
        experts = _within_limit(_positive_int(experts, "num_local_experts", name), "num_local_experts", name)
    return Dims(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, vocab=vocab, tied_embeddings=bool(tied),
        max_positions=_first(config, "max_position_embeddings", "n_positions", "seq_length"),
        experts=experts, experts_per_token=config.get("num_experts_per_tok") or 0,
    )


def spec_from_config(config: dict[str, Any], *, name: str, source: str, hf_id: str | None = None,
                     license: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a config.json dict; PlannerError if it is not a usable causal-LM config."""
    if not isinstance(config, dict):
        raise PlannerError(f"{name}: config.json must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise PlannerError(f"{name}: config.json has no 'model_type'; pass the model's own config.json")
    return ModelSpec(name=name, hf_id=hf_id, model_type=model_type, source=source, license=license,
                     config=config, dims=dims_from_config(config, name))


def with_layers(spec: ModelSpec, layers: int) -> ModelSpec:
    """The same model with `layers` decoder layers and every width unchanged (for measuring wide models)."""
    if layers <= 0:
        raise PlannerError(f"--layers must be positive, got {layers}")
    config = dict(spec.config)
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), "num_hidden_layers")
    config[key] = layers
    if "max_window_layers" in config:  # Qwen: sliding-window layers cannot exceed the layer count
        config["max_window_layers"] = min(config["max_window_layers"], layers)
    return spec_from_config(config, name=f"{spec.name} ({layers} layers)", source=spec.source,
                            hf_id=spec.hf_id, license=spec.license)
