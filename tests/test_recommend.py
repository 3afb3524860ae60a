"""The recommender: what it returns fits, meets the constraints, and is the best by its own ranking."""

import math

import pytest

from ftplan.data import calibration, catalog
from ftplan.data.dataset import from_token_count
from ftplan.errors import PlannerError
from ftplan.estimate.memory import estimate_memory
from ftplan.estimate.params import count_params
from ftplan.estimate.settings import LoraSettings, SetupChoices
from ftplan.estimate.sharding import shard
from ftplan.estimate.timing import step_time
from ftplan.model.inventory import layout_for
from ftplan.model.resolve import from_catalog
from ftplan.recommend.search import SearchRequest, search
from ftplan.render import explain as words

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
        again = estimate_memory(LAYOUT, c.setup, count_params(LAYOUT, c.method, c.setup.lora),
                                accumulating=c.grad_accum > 1)
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
    assert any(w.method == "lora" and w.figures["quality_tier"] >= 2 for w in rec.why_not)
    assert run(priority="quality", task="instruction").recommended.targets == "all-linear"


def test_time_and_cost_of_one_fixed_plan_by_hand():
    choices = SetupChoices(batch_size=1, optimizer="adamw", grad_ckpt=False,
                           lora=LoraSettings(targets=["q_proj", "v_proj"]))
    data = from_token_count(16 * 2048 * 10, 2048)                    # exactly 10 optimizer steps of 16
    rec = run(data=data, choices=choices, fixed={"optimizer", "grad_ckpt", "targets"}, methods=["lora"],
              instances=["g6e.xlarge"], micro_batch=1, max_gpus=1, priority="cost")
    c = rec.recommended
    gpu = catalog.get_gpu("L40S")
    counts = count_params(LAYOUT, "lora", c.setup.lora)
    t = step_time(LAYOUT, c.setup, counts, gpu, estimate_memory(LAYOUT, c.setup, counts), tokens_per_sequence=2048,
                  accum=16)
    assert t.seconds == pytest.approx(16 * t.micro_seconds + t.optimizer_seconds)
    seconds = 10 * t.seconds + 600
    assert (c.instance_count, c.grad_accum, c.optimizer_steps) == (1, 16, 10)
    assert c.hours == pytest.approx(seconds / 3600)
    assert c.cost_usd == pytest.approx(math.ceil(seconds) / 3600 * 1.861)


def test_a_calibration_replaces_the_default_utilisation():
    args = dict(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, priority="cost")
    before = run(**args).recommended
    elementwise = catalog.throughput().elementwise.bytes_per_hidden
    calibration.record(calibration.Calibration(gpu="L40S", model="llama2-7b", method="lora", utilization=0.5,
                                               u_max=0.66, tokens_per_micro_batch=2048, source="ftplan measure",
                                               date="2026-12-01", elementwise_bytes_per_hidden=elementwise,
                                               attention_kernel_ratio=catalog.throughput().fused_attention.ratio(
                                                   "sdpa", "ada")))  # solved in today's time model
    after = run(**args).recommended
    assert after.time.u_max == 0.66 and after.utilization_source.startswith("calibrated by ftplan measure")
    default = catalog.throughput().utilization.u_max("L40S", "ada")[0]
    assert before.time.u_max == default != 0.66
    compute = before.time.grad_accum * before.time.compute_seconds * before.optimizer_steps / 3600
    assert after.train_hours == pytest.approx(before.train_hours - compute * (1 - default / 0.66))


def test_a_calibration_solved_before_the_elementwise_term_keeps_the_step_time_it_measured(monkeypatch):
    args = dict(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, priority="cost")
    calibration.record(calibration.Calibration(gpu="L40S", model="llama2-7b", method="lora", utilization=0.5,
                                               u_max=0.45, tokens_per_micro_batch=2048, source="ftplan measure",
                                               date="2026-11-28"))  # no elementwise constant: solved without it,
    # and with attention's FLOPs at the matmul rate (no kernel ratio)
    after = run(**args).recommended
    assert 0.45 < after.time.u_max < 1 and "restated for today's time model" in after.utilization_source
    monkeypatch.setattr(catalog.throughput().elementwise, "bytes_per_hidden", 0.0)  # the time model it was solved in
    monkeypatch.setattr(catalog.throughput().fused_attention, "kernels", [])
    then = run(**args).recommended
    assert then.time.attention_kernel_ratio == 1.0 > after.time.attention_kernel_ratio
    assert then.time.u_max == 0.45 and then.time.elementwise_seconds == 0
    assert after.train_hours == pytest.approx(then.train_hours, rel=1e-9)


def test_an_eager_calibration_solved_before_the_eager_attention_term_keeps_the_step_time_it_measured(monkeypatch):
    # at the micro-batch it was measured at: the restated ceiling reproduces that step
    args = dict(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, priority="cost", micro_batch=1)
    eager = SetupChoices(attention="eager")
    measured = dict(gpu="L40S", model="llama2-7b", method="lora", utilization=0.5, u_max=0.45,
                    tokens_per_micro_batch=2048, source="ftplan measure", date="2026-11-30",
                    elementwise_bytes_per_hidden=catalog.throughput().elementwise.bytes_per_hidden)  # no eager term
    calibration.record(calibration.Calibration(**measured))  # attention not recorded: SDPA's, nothing to restate
    sdpa_measured = run(choices=eager, **args).recommended
    assert sdpa_measured.time.u_max == 0.45 and sdpa_measured.time.attention_seconds > 0
    calibration.record(calibration.Calibration(**measured, attention="eager"))
    after = run(choices=eager, **args).recommended
    assert after.time.tokens_per_micro_batch == 2048 and after.time.attention_seconds > 0
    monkeypatch.setattr(catalog.throughput().eager_attention, "forward_bytes_per_score", 0.0)
    monkeypatch.setattr(catalog.throughput().eager_attention, "backward_bytes_per_score", 0.0)
    then = run(choices=eager, **args).recommended
    assert then.time.u_max == 0.45 and then.time.attention_seconds == 0
    assert after.train_hours == pytest.approx(then.train_hours, rel=1e-9)


def test_a_calibration_measured_with_other_attention_is_not_restated_for_the_plans_kernel():
    # measured with eager attention (score matmuls at the matmul rate) in today's model: its ceiling is the
    # matmuls', which an SDPA plan takes as it is (its kernel's ratio applies to its own attention FLOPs)
    rules = catalog.throughput()
    calibration.record(calibration.Calibration(
        gpu="L40S", model="llama2-7b", method="lora", utilization=0.5, u_max=0.6, tokens_per_micro_batch=2048,
        source="ftplan measure", date="2026-12-02", attention="eager", attention_kernel_ratio=1.0,
        elementwise_bytes_per_hidden=rules.elementwise.bytes_per_hidden,
        eager_bytes_per_score=rules.eager_attention.bytes_per_score))
    got = run(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, priority="cost").recommended
    assert got.time.u_max == 0.6 and got.time.attention_kernel_ratio == rules.fused_attention.ratio("sdpa", "ada")


def test_sdpa_and_flash_attention_2_share_a_kernel_so_a_calibration_is_restated_alike_for_both():
    args = dict(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, priority="cost")
    calibration.record(calibration.Calibration(
        gpu="L40S", model="llama2-7b", method="lora", utilization=0.5, u_max=0.55, tokens_per_micro_batch=2048,
        source="ftplan measure", date="2026-12-01", attention="sdpa",
        elementwise_bytes_per_hidden=catalog.throughput().elementwise.bytes_per_hidden))  # ratio 1: before the term
    sdpa = run(**args).recommended
    flash = run(choices=SetupChoices(attention="flash_attention_2"), **args).recommended
    assert sdpa.time.u_max == flash.time.u_max > 0.55  # restated for the kernel's rate in both
    assert flash.train_hours == pytest.approx(sdpa.train_hours)


def test_a_calibration_from_ftplan_0_1_is_taken_as_the_ceiling():
    calibration.record(calibration.Calibration(gpu="L40S", model="llama2-7b", method="lora", utilization=0.5,
                                               source="ftplan run out", date="2026-11-28"))
    got = run(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, priority="cost").recommended
    assert got.time.u_max == 0.5


def test_spot_and_sagemaker_change_the_price_not_the_plan_shape():
    args = dict(methods=["qlora"], instances=["g5.2xlarge"], max_gpus=1)
    base = run(**args).recommended
    assert run(market="spot", **args).recommended.cost_usd == pytest.approx(base.cost_usd * 0.4, rel=1e-3)
    sm = run(platform="sagemaker", **args).recommended
    assert sm.price.usd_per_hour == 1.515 and sm.hours == pytest.approx(base.hours)
    assert any(a.code == "spot" for a in run(market="spot", **args).assumptions)


def test_why_not_says_by_how_much_a_method_misses():
    rec = run(instances=["g5.xlarge"], methods=["full", "qlora"], max_gpus=1)
    full = next(w for w in rec.why_not if w.method == "full")
    assert full.code == "needs_more_memory" and full.figures["short_bytes"] > 0
    assert full.figures["largest_gpu_bytes"] == catalog.get_gpu("A10G").memory_bytes
    assert "GiB short" in words.why_not(full) and "largest GPU searched has 22.4 GiB" in words.why_not(full)
    cheap = run(budget_usd=3.0, methods=["full", "qlora", "lora"], instances=["p5.4xlarge", "g6e.xlarge"])
    full = next(w for w in cheap.why_not if w.method == "full")
    assert full.code == "misses_limits" and full.figures["cheapest_usd"] > 3.0
    assert "vs the $3.00 budget" in words.why_not(full)


def test_a_model_too_big_for_one_gpu_is_sharded_over_several():
    spec = from_catalog(catalog.find_model("llama2-70b"))
    layout = layout_for(spec)[0]
    rec = search(spec, layout, from_token_count(100_000_000, 2048), SearchRequest(methods=["full"], max_gpus=64,
                                                                                  priority="cost"), SetupChoices())
    c = rec.recommended
    assert c.sharding == "fsdp" and c.gpus_total >= 8
    # an FSDP plan reduce-scatters every micro-batch (also when a run on fewer processes accumulates): no_sync
    # would hold 140 GB of bf16 gradients
    assert c.setup.sync_each_batch
    single = estimate_memory(layout, c.setup, count_params(layout, "full"), accumulating=c.grad_accum > 1)
    again = shard(layout, c.setup, single, gpus=c.gpus_total, nodes=c.instance_count, sharding="fsdp")
    assert again.required_bytes == c.required_bytes <= c.gpu_memory_bytes
    assert any("FSDP" in words.assumption(a) for a in rec.assumptions)


def test_host_ram_must_hold_the_checkpoint_while_loading():
    # 13B in fp32 master weights is 52 GB; a g6e.xlarge has 32 GiB of RAM, though 16 of its L40S hold the shards
    spec = from_catalog(catalog.find_model("llama2-13b"))
    with pytest.raises(PlannerError, match="not enough host RAM to load the checkpoint"):
        search(spec, layout_for(spec)[0], DATA, SearchRequest(methods=["full"], instances=["g6e.xlarge"],
                                                              max_gpus=16), SetupChoices())


# -- recommendations a practitioner would choose ---------------------------------------------------------------

def test_the_recommended_plan_is_never_dominated_at_its_quality():
    for request in (dict(), dict(priority="cost"), dict(priority="quality"), dict(budget_usd=30.0),
                    dict(task="domain-adaptation", max_gpus=16)):
        rec = run(**request)
        best = rec.recommended
        for c in rec.candidates + rec.frontier:
            assert not (c.quality_tier <= best.quality_tier and c.instance_count <= best.instance_count
                        and c.cost_usd < best.cost_usd and c.hours < best.hours), (request, c.label)


def test_a_70b_model_is_not_recommended_in_qlora_when_lora_is_cheaper_and_faster_at_the_same_tier():
    spec = from_catalog(catalog.find_model("llama2-70b"))
    rec = search(spec, layout_for(spec)[0], from_token_count(100_000_000, 2048), SearchRequest(), SetupChoices())
    best = rec.recommended
    for w in rec.why_not:
        if w.code == "ranked_lower":  # what it quotes is at most as good in quality, or worse in cost or time
            f = w.figures
            assert not (f["quality_tier"] <= best.quality_tier and f["cost_usd"] < best.cost_usd
                        and f["hours"] < best.hours), words.why_not(w)


def test_the_quoted_evidence_is_for_exactly_the_plans_targets():
    for c in run(priority="cost", methods=["lora"]).candidates:
        if c.targets == "peft-default":  # q,v only
            assert c.quality_basis == "lora/subset" and "subset" in c.quality_evidence
            assert "all linear layers matched" not in c.quality_evidence and c.quality_tier == 1
        elif c.targets == "all-linear":
            assert c.quality_basis == "lora/all-linear" and "all linear layers matched" in c.quality_evidence


def test_several_instances_only_where_they_beat_one_by_the_margin():
    margin = catalog.planning().multi_instance.margin
    for request in (dict(priority="cost"), dict(), dict(deadline_hours=0.7, max_gpus=16)):
        rec = run(**request)
        best, single = rec.recommended, rec.best_single_instance
        assert single is not None and single.instance_count == 1
        if best.instance_count > 1:
            reason = next(r for r in rec.reasons if r.code == "multi_instance_wins")
            assert reason.figures["saving"] >= margin
        multi = [c for c in rec.candidates if c.instance_count > 1]
        if multi and best.instance_count == 1 and request.get("priority") == "cost":
            assert all(c.cost_usd > best.cost_usd * (1 - margin) for c in multi)


def test_multi_instance_plans_bill_every_node_its_setup_and_the_launch():
    overhead = catalog.throughput().overhead
    rec = run(instances=["g6e.xlarge"], methods=["lora"], max_gpus=4, priority="cost")
    for c in rec.candidates:
        expected = overhead.setup_seconds + (overhead.cluster_launch_seconds if c.instance_count > 1 else 0)
        assert c.setup_hours == pytest.approx(expected / 3600)
        billed = math.ceil((c.train_hours + c.setup_hours) * 3600) / 3600
        assert c.cost_usd == pytest.approx(billed * c.price.usd_per_hour * c.instance_count)


def test_why_not_names_max_gpus_instead_of_a_negative_shortfall():
    spec = from_catalog(catalog.find_model("llama2-70b"))
    rec = search(spec, layout_for(spec)[0], DATA, SearchRequest(methods=["qlora", "lora"], max_gpus=1,
                                                                instances=["p5en.48xlarge", "p5.4xlarge"]),
                 SetupChoices())
    lora = next(w for w in rec.why_not if w.method == "lora")
    assert lora.code == "needs_more_gpus" and lora.figures["instance_type"] == "p5en.48xlarge"
    assert lora.figures["gpus"] == 8 and "raise --max-gpus to 8" in words.why_not(lora)
    assert all(w.figures.get("short_bytes", 0) >= 0 for w in rec.why_not)


def test_dropped_counts_add_up_to_what_was_evaluated():
    for request in (dict(), dict(budget_usd=5.0), dict(platform="sagemaker"), dict(max_gpus=1)):
        rec = run(**request)
        assert rec.kept + sum(rec.rejections.values()) == rec.evaluated
        assert rec.kept >= len(rec.candidates)


def test_mixtral_all_linear_plans_are_ones_peft_can_build():
    """All-linear on Mixtral adapts the fused experts through PEFT's ParamWrapper, which takes no dropout: such
    candidates carry dropout 0 unless the user set one, and then they are not offered."""
    spec = from_catalog(catalog.find_model("mixtral-8x7b"))
    layout = layout_for(spec)[0]
    request = SearchRequest(methods=["lora"], priority="cost")
    rec = search(spec, layout, DATA, request, SetupChoices(), set())
    folded = [c for c in rec.candidates if c.targets == "all-linear"]
    assert folded and all(c.setup.lora.dropout == 0 for c in folded)
    assert all(c.setup.lora.dropout == 0.05 for c in rec.candidates if c.targets == "peft-default")
    pinned = search(spec, layout, DATA, request, SetupChoices(lora=LoraSettings(dropout=0.05)), set())
    assert all(c.targets == "peft-default" for c in pinned.candidates)
    said = [w for w in pinned.why_not if w.code == "all_linear_not_searched"]
    assert said and "pass --lora-dropout 0 to search it" in words.why_not(said[0])
    assert not any(w.code == "all_linear_not_searched" for w in rec.why_not)


def test_each_assumption_is_listed_once():
    for method in ("full", "lora", "qlora"):
        codes = [a.code for a in run(methods=[method]).assumptions]
        assert len(codes) == len(set(codes)), codes
        assert ("dequantization" in codes) == (method == "qlora")


def test_the_time_model_names_eager_attentions_score_traffic_only_when_the_plan_pays_it():
    def time_model(choices: SetupChoices) -> tuple[float, str]:
        out = run(methods=["lora"], instances=["g6e.xlarge"], max_gpus=1, choices=choices)
        text = next(words.assumption(a) for a in out.assumptions if a.code == "time_model")
        return out.recommended.time.attention_seconds, text

    paid, eager = time_model(SetupChoices(attention="eager"))
    per_score = catalog.throughput().eager_attention.bytes_per_score
    assert paid > 0 and f"({per_score:g} bytes per score over a forward and a backward: {paid:.3f} s" in eager
    none, sdpa = time_model(SetupChoices())
    assert none == 0 and "eager attention" not in sdpa
