"""The recommender: what it returns fits, meets the constraints, and is the best by its own ranking."""

import math

import pytest

from ftplan.data import calibration, catalog
from ftplan.data.dataset import from_token_count
from ftplan.errors import PlannerError
from ftplan.estimate.compute import step_time
from ftplan.estimate.memory import estimate_memory
from ftplan.estimate.params import count_params
from ftplan.estimate.settings import LoraSettings, SetupChoices
from ftplan.estimate.sharding import shard
from ftplan.model.inventory import layout_for
from ftplan.model.resolve import from_catalog
from ftplan.recommend.search import SearchRequest, search

SPEC = from_catalog(catalog.find_model("llama2-7b"))
LAYOUT = layout_for(SPEC)[0]
DATA = from_token_count(20_000_000, 2048)


def run(data=DATA, choices=None, fixed=frozenset(), **request):
    return search(SPEC, LAYOUT, data, SearchRequest(**request), choices or SetupChoices(), set(fixed))


def test_cost_priority_returns_the_cheapest_fitting_plan_over_every_instance():
    types = ["g5.xlarge", "g6.xlarge", "g6e.xlarge", "g5.12xlarge", "p4d.24xlarge", "p5.4xlarge"]
    best = run(priority="cost", instances=types).recommended
    # searched one instance type at a time, none is cheaper than the joint answer
    singles = [run(priority="cost", instances=[t]).recommended for t in types]
    assert best.cost_usd == pytest.approx(min(c.cost_usd for c in singles))
    assert all(best.cost_usd <= c.cost_usd for c in run(priority="cost", instances=types).candidates)


def test_every_candidate_fits_by_the_estimators_own_numbers():
    rec = run()
    for c in rec.candidates + rec.frontier:
        again = estimate_memory(LAYOUT, c.setup, count_params(LAYOUT, c.method, c.setup.lora))
        if c.sharding == "fsdp":
            again = shard(LAYOUT, c.setup, again, gpus=c.gpus_total, nodes=c.instance_count, sharding="fsdp")
        assert again.required_bytes == c.required_bytes <= c.gpu_memory_bytes
        assert c.setup.batch_size * c.gpus_total * c.grad_accum == rec.request.global_batch


def test_budget_and_deadline_are_never_exceeded():
    rec = run(budget_usd=4.0, deadline_hours=1.0)
    assert all(c.cost_usd <= 4.0 and c.hours <= 1.0 for c in rec.candidates + rec.frontier)


def test_a_budget_nothing_meets_names_the_closest_plan():
    with pytest.raises(PlannerError, match=r"nothing fits the \$0.50 budget: the cheapest plan costs \$\d"):
        run(budget_usd=0.5)
    with pytest.raises(PlannerError, match=r"nothing finishes within 0.1 h: the fastest plan takes"):
        run(deadline_hours=0.1)


def test_nothing_fits_says_by_how_much():
    spec = from_catalog(catalog.find_model("llama2-70b"))
    with pytest.raises(PlannerError, match=r"nothing fits: the smallest requirement is \d+\.\d GiB per GPU"):
        search(spec, layout_for(spec)[0], DATA, SearchRequest(methods=["full"], instances=["g5.xlarge"]),
               SetupChoices())


def test_quality_priority_prefers_full_fine_tuning_for_continued_pretraining():
    rec = run(priority="quality", task="continued-pretraining")
    assert rec.recommended.method == "full" and rec.recommended.quality_tier == 0
    assert any("lora" in line and "tier 2" in line for line in rec.why_not)
    assert run(priority="quality", task="instruction").recommended.targets == "all-linear"


def test_time_and_cost_of_one_fixed_plan_by_hand():
    choices = SetupChoices(batch_size=1, optimizer="adamw", grad_ckpt=False,
                           lora=LoraSettings(targets=["q_proj", "v_proj"]))
    data = from_token_count(16 * 2048 * 10, 2048)                    # exactly 10 optimizer steps of 16
    rec = run(data=data, choices=choices, fixed={"optimizer", "grad_ckpt", "targets"}, methods=["lora"],
              instances=["g6e.xlarge"], micro_batch=1, max_gpus=1, priority="cost")
    c = rec.recommended
    gpu = catalog.get_gpu("L40S")
    t = step_time(LAYOUT, c.setup, count_params(LAYOUT, "lora", c.setup.lora), gpu, micro_batch=1,
                  tokens_per_sequence=2048)
    seconds = 10 * 16 * t.seconds + 600
    assert (c.instance_count, c.grad_accum, c.optimizer_steps) == (1, 16, 10)
    assert c.hours == pytest.approx(seconds / 3600)
    assert c.cost_usd == pytest.approx(math.ceil(seconds) / 3600 * 1.861)


def test_a_calibration_replaces_the_default_utilisation():
    args = dict(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, priority="cost")
    before = run(**args).recommended
    calibration.record(calibration.Calibration(gpu="L40S", model="llama2-7b", method="lora", utilization=0.66,
                                               source="ftplan measure", date="2026-11-28"))
    after = run(**args).recommended
    assert after.utilization == 0.66 and after.utilization_source.startswith("calibrated by ftplan measure")
    assert after.train_hours == pytest.approx(before.train_hours * before.utilization / 0.66)


def test_spot_and_sagemaker_change_the_price_not_the_plan_shape():
    args = dict(methods=["qlora"], instances=["g5.2xlarge"], max_gpus=1)
    base = run(**args).recommended
    assert run(market="spot", **args).recommended.cost_usd == pytest.approx(base.cost_usd * 0.4, rel=1e-3)
    sm = run(platform="sagemaker", **args).recommended
    assert sm.price.usd_per_hour == 1.515 and sm.hours == pytest.approx(base.hours)
    assert any("spot" in a for a in run(market="spot", **args).assumptions)


def test_why_not_says_by_how_much_a_method_misses():
    rec = run(instances=["g5.xlarge"], methods=["full", "qlora"], max_gpus=1)
    line = next(x for x in rec.why_not if x.startswith("full"))
    assert "needs at least" in line and "GiB short" in line and "largest GPU searched has 22.4 GiB" in line
    cheap = run(budget_usd=3.0, methods=["full", "qlora", "lora"], instances=["p5.4xlarge", "g6e.xlarge"])
    full = next(x for x in cheap.why_not if x.startswith("full"))
    assert "misses the limits (cheapest $" in full and "vs the $3.00 budget" in full


def test_a_model_too_big_for_one_gpu_is_sharded_over_several():
    spec = from_catalog(catalog.find_model("llama2-70b"))
    layout = layout_for(spec)[0]
    rec = search(spec, layout, from_token_count(100_000_000, 2048), SearchRequest(methods=["full"], max_gpus=64,
                                                                                  priority="cost"), SetupChoices())
    c = rec.recommended
    assert c.sharding == "fsdp" and c.gpus_total >= 8
    again = shard(layout, c.setup, estimate_memory(layout, c.setup, count_params(layout, "full")),
                  gpus=c.gpus_total, nodes=c.instance_count, sharding="fsdp")
    assert again.required_bytes == c.required_bytes <= c.gpu_memory_bytes
    assert any("FSDP" in a for a in rec.assumptions)


def test_host_ram_must_hold_the_checkpoint_while_loading():
    # 13B in fp32 master weights is 52 GB; a g6e.xlarge has 32 GiB of RAM, though 16 of its L40S hold the shards
    spec = from_catalog(catalog.find_model("llama2-13b"))
    with pytest.raises(PlannerError, match="not enough host RAM to load the checkpoint"):
        search(spec, layout_for(spec)[0], DATA, SearchRequest(methods=["full"], instances=["g6e.xlarge"],
                                                              max_gpus=16), SetupChoices())
