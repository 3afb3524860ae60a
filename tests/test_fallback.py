"""Architectures without an analytic builder are counted by instantiating them on the meta device."""

import json

import pytest

pytest.importorskip("transformers")

from ftplan.estimate.params import count_params  # noqa: E402
from ftplan.estimate.report import estimate  # noqa: E402
from ftplan.estimate.settings import LoraSettings, SetupChoices  # noqa: E402
from ftplan.model.inventory import layout_for  # noqa: E402
from ftplan.model.meta_count import build_meta_model, count_lora_trainable, count_total  # noqa: E402
from ftplan.model.resolve import resolve_model  # noqa: E402

from .conftest import run_cli  # noqa: E402

GPTJ = {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 128,
        "rotary_dim": 8, "tie_word_embeddings": False}


def test_gptj_counted_on_meta_device(write_config):
    spec = resolve_model(str(write_config(GPTJ)))
    layout, how = layout_for(spec)
    assert how == "transformers meta device"
    assert layout.total_params() == count_total(build_meta_model(GPTJ))
    counts = count_params(layout, "lora", LoraSettings(r=4, targets=["q_proj", "v_proj"]))
    assert counts.trainable_params == count_lora_trainable(build_meta_model(GPTJ), ["q_proj", "v_proj"], 4)
    report = estimate(spec, ["lora"], SetupChoices())
    assert report.model.counting == "transformers meta device"
    assert any("approximate" in note for note in report.assumptions)
    assert report.estimates[0].memory.peak_allocated_bytes > 0


def test_fallback_is_reported_in_output(write_config):
    result = run_cli("estimate", str(write_config(GPTJ)), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["counting"] == "transformers meta device"


def test_unknown_model_type_is_one_line(write_config):
    result = run_cli("estimate", str(write_config({**GPTJ, "model_type": "no-such-arch"})))
    assert result.returncode == 2
    assert "no-such-arch" in result.stderr and "Traceback" not in result.stderr
