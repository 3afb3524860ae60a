"""recommend's record of the time model: the nearest published runs to a plan, and the small-model caveat."""

from types import SimpleNamespace

from ftplan.data import catalog
from ftplan.data.dataset import from_token_count
from ftplan.data.planning_rules import LongContext, SmallModels, TimeValidation, ValidatedRun
from ftplan.estimate.settings import SetupChoices
from ftplan.model.inventory import layout_for
from ftplan.model.resolve import from_catalog
from ftplan.recommend import evidence
from ftplan.recommend.search import SearchRequest, search
from ftplan.render.recommend import time_evidence_lines


def run(id, gpu="A100-80GB", arch="ampere", method="lora", params=7e9, tokens=2048, ratio=1.0, split="train",
        seq_len=2048):
    return ValidatedRun(id=id, source="Src", source_title="A source", model=f"M-{id}", params=int(params),
                        method=method, gpu=gpu, gpu_architecture=arch, gpus=1, tokens_per_micro_batch=tokens,
                        seq_len=seq_len, split=split, predicted_seconds=ratio, measured_seconds=1.0, ratio=ratio)


def validation(*runs):
    return TimeValidation.model_validate({
        "schema": 1, "date": "2026-11-30", "about": "", "source": "", "runs": [r.model_dump() for r in runs],
        "summary": {}, "small_models": SmallModels(max_params=2_000_000_000, about="", source="").model_dump(),
        "long_context": LongContext(min_seq_len=16_384, about="", source="").model_dump()})


def nearest(v, **kw):
    plan = dict(gpu="A100-80GB", architecture="ampere", method="lora", params=7_000_000_000, tokens=2048) | kw
    return [r.id for r in evidence.nearest_runs(v, **plan)]


def test_the_same_gpu_comes_first_then_its_architecture():
    v = validation(run("other", gpu="H100", arch="hopper"), run("sibling", gpu="A100-40GB"),
                   run("same", params=70e9, tokens=512, method="qlora"))
    assert nearest(v) == ["same", "sibling", "other"]


def test_then_the_method_lora_and_qlora_being_neighbours():
    v = validation(run("full", method="full"), run("qlora", method="qlora"), run("lora", params=70e9))
    assert nearest(v) == ["lora", "qlora", "full"]


def test_then_model_size_and_tokens_per_micro_batch_on_log_scales():
    v = validation(run("far", params=70e9), run("close", params=8e9), run("long", params=7e9, tokens=16384),
                   run("exact"))
    assert nearest(v) == ["exact", "close", "long"]
    assert nearest(v, params=70_000_000_000)[0] == "far"


def test_small_models_get_the_runs_of_their_size_and_large_ones_none():
    v = validation(run("tiny-a", params=1.8e9, ratio=0.49), run("tiny-b", params=1.3e9, ratio=0.88), run("big"))
    small = evidence.time_evidence(v, gpu="L4", architecture="ada", method="lora", params=500_000_000, tokens=1024)
    assert [r.id for r in small.small_model_runs] == ["tiny-a", "tiny-b"]
    large = evidence.time_evidence(v, gpu="L4", architecture="ada", method="lora", params=8_000_000_000, tokens=1024)
    assert large.small_model_runs == [] and len(large.nearest) == 3


def test_the_bundled_validation_answers_for_a_catalogued_plan():
    ev = evidence.for_plan("A100-80GB", "lora", 7_700_000_000, 2048)
    assert ev.nearest[0].id == "qwen7b-lora-a100-s2048"
    assert ev.validated == catalog.time_validation().date


def test_the_recommendation_carries_the_evidence_for_its_own_plan():
    entry = catalog.find_model("qwen2.5-0.5b")
    spec = from_catalog(entry)
    layout = layout_for(spec)[0]
    rec = search(spec, layout, from_token_count(1_000_000, 2048), SearchRequest(methods=["lora"]),
                 SetupChoices(seq_len=2048))
    ev = rec.time_evidence
    assert len(ev.nearest) == 3 and ev.small_model_runs  # 0.5B parameters: the caveat applies
    assert rec.model_dump(mode="json")["time_evidence"]["nearest"][0]["ratio"] == ev.nearest[0].ratio


def test_render_names_ratio_model_method_gpus_and_source_and_warns_for_small_models():
    v = validation(run("a", ratio=0.934), run("tiny", params=1.8e9, ratio=0.488, method="full"),
                   run("small", params=1.1e9, ratio=1.12, method="lora"))
    rec = SimpleNamespace(time_evidence=evidence.time_evidence(v, gpu="A100-80GB", architecture="ampere",
                                                               method="lora", params=1_000_000_000, tokens=2048))
    lines = time_evidence_lines(rec)
    assert "Time model on the nearest published runs: x1.12 (M-small LoRA, 1 x A100-80GB, Src), x0.93 (M-a LoRA" \
        in str(lines[0])
    caveat = " ".join(str(lines[1]).split())
    assert "Caveat: on 2 published runs of models of 2B parameters or fewer" in caveat
    assert "read x0.49-x1.12 of the measured step (furthest off: M-tiny full, 1 x A100-80GB)" in caveat
    assert time_evidence_lines(SimpleNamespace(time_evidence=None)) == []


def test_long_sequences_get_the_runs_that_long_and_short_ones_none():
    v = validation(run("short", ratio=1.02), run("long-a", ratio=0.45, seq_len=65536, method="full"),
                   run("long-b", ratio=2.5, seq_len=16384))
    long = evidence.time_evidence(v, gpu="A100-80GB", architecture="ampere", method="lora", params=7_000_000_000,
                                  tokens=32768, seq_len=32768)
    assert [r.id for r in long.long_context_runs] == ["long-a", "long-b"]  # slowest first
    short = evidence.time_evidence(v, gpu="A100-80GB", architecture="ampere", method="lora", params=7_000_000_000,
                                   tokens=4096, seq_len=4096)
    assert short.long_context_runs == [] and short.long_context_min_seq_len == 16_384
    caveat = " ".join(str(time_evidence_lines(SimpleNamespace(time_evidence=long))[1]).split())
    assert "Caveat: on 2 published runs with sequences of 16,384 tokens or more" in caveat
    # the run furthest off is named, either way: 2.5x too slow beats 0.45 of the measured speed
    assert "read x0.45-x2.50 of the measured step (furthest off: M-long-b, 16,384 tokens, 1 x A100-80GB)" in caveat


def test_a_long_context_plan_carries_the_caveat_from_the_bundled_runs():
    spec = from_catalog(catalog.find_model("llama3.1-8b"))
    layout, _ = layout_for(spec)
    rec = search(spec, layout, from_token_count(20_000_000, 32768), SearchRequest(methods=["lora"], max_gpus=8),
                 SetupChoices(seq_len=32768))
    runs = rec.time_evidence.long_context_runs
    assert runs and all(r.seq_len >= 16_384 for r in runs)
    assert rec.model_dump(mode="json")["time_evidence"]["long_context_min_seq_len"] == 16_384
