"""The layout of any model: analytic where ftplan has a builder, else read off transformers on the meta
device (which needs the train extra). The one place that chooses between the two."""

from __future__ import annotations

from ftplan.model.architectures import build_layout, is_analytic
from ftplan.model.layout import ModelLayout
from ftplan.model.spec import ModelSpec


def layout_for(spec: ModelSpec, *, trust_remote_code: bool = False) -> tuple[ModelLayout, str]:
    """The module layout and how it was obtained: 'analytic' or 'transformers meta device'."""
    if is_analytic(spec.model_type):
        return build_layout(spec), "analytic"
    from ftplan.model.meta_count import layout_from_model  # torch inside: only for architectures without a builder

    return layout_from_model(spec, trust_remote_code=trust_remote_code), "transformers meta device"
