"""Every catalog model: the analytic counts equal transformers + PEFT on the meta device, to the unit.

Models are built under torch.device("meta") and re-tied (init_empty_weights loses the tie under
transformers 5). PEFT's trainable count is the adapters alone; the base total excludes them.
"""

import pytest

from ftplan.data import catalog
from ftplan.estimate.params import count_params
from ftplan.estimate.settings import LoraSettings
from ftplan.model.architectures import build_layout
from ftplan.model.resolve import from_catalog

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from ftplan.model.meta_count import build_meta_model, count_lora_trainable, count_total  # noqa: E402

MODELS = [m.name for m in catalog.models()]


def target_sets(layout) -> list[tuple[list[str] | None, int]]:
    """PEFT's default, all-linear, and an explicit pair of the model's own modules, at several ranks."""
    explicit = [g.leaf for g in layout.modules if g.kind in ("linear", "linear_subclass", "conv1d")][:2]
    return [(None, 8), (["all-linear"], 16), (explicit, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_counts_equal_transformers_and_peft(name):
    entry = catalog.find_model(name)
    layout = build_layout(from_catalog(entry))
    assert layout.total_params() == count_total(build_meta_model(entry.config))
    for targets, r in target_sets(layout):
        counts = count_params(layout, "lora", LoraSettings(r=r, targets=targets))
        reference = count_lora_trainable(build_meta_model(entry.config), counts.targets.peft_value(), r)
        assert counts.trainable_params == reference, (targets, r)
