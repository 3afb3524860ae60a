"""The accept flow and the plan file: written atomically, never overwritten silently, validated on read."""

import json

import pytest
import yaml

from ftplan.errors import PlannerError
from ftplan.model.resolve import resolve_model
from ftplan.plan import check_targets, load
from tests.conftest import run_cli, run_cli_tty

RECOMMEND = ("recommend", "llama2-7b", "--tokens", "20000000", "--budget", "50")


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    """One plan written by --yes, shared by the read-only tests."""
    cwd = tmp_path_factory.mktemp("accepted")
    result = run_cli(*RECOMMEND, "--yes", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "ftplan-plan.yaml"


def test_yes_writes_a_plan_that_plan_show_displays(accepted):
    plan = load(accepted)
    assert plan.model.name == "llama2-7b" and plan.backend == "skypilot" and plan.estimates.cost_usd <= 50
    assert plan.training.global_batch == plan.training.setup.batch_size * plan.training.grad_accum * (
        plan.hardware.instance_count * plan.hardware.gpus_per_instance)
    shown = run_cli("plan", "show", cwd=accepted.parent)
    assert shown.returncode == 0 and "llama2-7b" in shown.stdout and plan.hardware.instance_type in shown.stdout
    as_json = json.loads(run_cli("plan", "show", str(accepted), "--json").stdout)
    assert as_json["model"]["config_sha256"] == plan.model.config_sha256


def test_prompt_declined_writes_nothing_and_accepted_writes(tmp_path):
    code, shown = run_cli_tty(*RECOMMEND, answer="n\n", cwd=tmp_path)
    assert code == 0 and "Accept this plan" in shown and "Not accepted" in shown
    assert not (tmp_path / "ftplan-plan.yaml").exists()
    code, shown = run_cli_tty(*RECOMMEND, "-o", "my-plan.yaml", answer="y\n", cwd=tmp_path)
    assert code == 0 and load(tmp_path / "my-plan.yaml").model.name == "llama2-7b"


def test_without_a_terminal_recommend_answers_and_says_how_to_accept(tmp_path):
    """Scripts and CI: nobody can answer the prompt, so nothing is asked, nothing written, and exit 0."""
    piped = run_cli(*RECOMMEND, cwd=tmp_path, input="y\n")
    assert piped.returncode == 0 and piped.stderr == ""
    assert "Recommended:" in piped.stdout and "--yes" in piped.stdout and "Accept this plan" not in piped.stdout
    assert piped.stdout.count("nothing written") == 1 and list(tmp_path.iterdir()) == []


def test_an_existing_plan_is_replaced_only_with_force(accepted, tmp_path):
    target = tmp_path / "ftplan-plan.yaml"
    target.write_text("precious")
    refused = run_cli(*RECOMMEND, "--yes", cwd=tmp_path)
    assert refused.returncode == 2 and "already exists" in refused.stderr and target.read_text() == "precious"
    forced = run_cli(*RECOMMEND, "--yes", "--force", "--priority", "cost", cwd=tmp_path)
    assert forced.returncode == 0 and load(target).priority == "cost"
    assert [p.name for p in tmp_path.iterdir()] == ["ftplan-plan.yaml"]   # no temporary files left


def test_json_output_is_the_documented_recommendation(tmp_path):
    result = run_cli(*RECOMMEND, "--json", cwd=tmp_path)
    data = json.loads(result.stdout)
    assert data["schema_version"] == 2 and data["recommended"]["cost_usd"] <= 50
    assert data["backend"] == "skypilot" and data["backend_reason"] == "skypilot"  # bundled, with ftplan[skypilot]
    assert all(set(r) == {"code", "figures"} for r in data["reasons"] + data["assumptions"])
    assert {"candidates", "frontier", "reasons", "why_not", "rejections", "assumptions"} <= set(data)
    assert not (tmp_path / "ftplan-plan.yaml").exists()   # --json without --yes writes nothing


def test_ec2_plans_name_hf_with_a_note_when_skypilot_is_not_there(tmp_path):
    result = run_cli(*RECOMMEND, "--json", cwd=tmp_path, env={"FTPLAN_PLUGINS": "hf,sagemaker"})
    data = json.loads(result.stdout)
    assert data["backend"] == "hf" and data["backend_reason"] == "hf_without_skypilot"


def edited(accepted, tmp_path, change):
    data = yaml.safe_load(accepted.read_text())
    change(data)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_plan_written_before_the_elementwise_time_term_still_loads(accepted, tmp_path):
    older = load(edited(accepted, tmp_path, lambda d: d["estimates"]["time"].pop("elementwise_seconds")))
    assert older.estimates.time.elementwise_seconds == 0.0  # its time had no such term
    assert older.estimates.hours == load(accepted).estimates.hours  # the figures it was accepted with, unchanged


def test_a_plan_written_before_the_attention_kernel_term_still_loads(accepted, tmp_path):
    def before(d):
        d["estimates"]["time"].pop("attention_kernel_ratio")
        d["estimates"]["time"].pop("elementwise_bytes_per_hidden")
    older = load(edited(accepted, tmp_path, before))
    assert older.estimates.time.attention_kernel_ratio == 1.0  # its attention ran at the matmul rate
    assert older.estimates.time.elementwise_bytes_per_hidden is None  # unknown: a calibration records today's
    assert older.estimates.hours == load(accepted).estimates.hours


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema_version=4), "schema_version 4; this ftplan"),
    (lambda d: d.update(schema_version=2), "schema_version 2; this ftplan"),
    (lambda d: d.update(schema_version=1), "schema_version 1; this ftplan"),
    (lambda d: d.pop("schema_version"), "schema_version None"),
    (lambda d: d.update(surprise=1), "surprise: Extra inputs are not permitted"),
    (lambda d: d["training"].update(grad_accum="many"), "training.grad_accum"),
    (lambda d: d["training"].update(global_batch=-4), "training.global_batch"),
    (lambda d: d["training"]["setup"].update(method="magic"), "training.setup.method"),
    (lambda d: d.update(backend="os.system; rm -rf"), "backend"),
    (lambda d: d["hardware"].pop("instance_type"), "hardware.instance_type: Field required"),
])
def test_hand_edited_nonsense_is_refused_with_the_key(accepted, tmp_path, change, message):
    with pytest.raises(PlannerError, match=message):
        load(edited(accepted, tmp_path, change))


@pytest.mark.parametrize("text, message", [("[1, 2]", "does not hold a plan"), ("a: [b\n", "not valid YAML"),
                                           ("", "does not hold a plan")])
def test_unreadable_plan_files(tmp_path, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(PlannerError, match=message):
        load(path)


@pytest.mark.parametrize("args, message", [
    (("--tokens", "0"), "positive token count"),
    (("--tokens", "lots"), "not a token count"),
    ((), "either --tokens N or --dataset"),
    (("--tokens", "1M", "--dataset", "d.jsonl"), "either --tokens N or --dataset"),
    (("--tokens", "1M", "--region", "mars-1"), "no ec2 prices for region 'mars-1'"),
    (("--tokens", "1M", "--instances", "g5.xlargee"), "unknown instance type 'g5.xlargee'. Did you mean: g5.xlarge"),
    (("--tokens", "1M", "--methods", "full,dora"), "unknown method(s) dora"),
    (("--tokens", "1M", "--budget", "-5"), "budget_usd"),
    (("--tokens", "1M", "--global-batch", "0"), "global_batch"),
    (("--dataset", "missing.jsonl"), "does not exist"),
    (("--tokens", "1M", "--no-packing"), "counts packed sequences"),
    (("--tokens", "1M", "--spot", "--spot-discount", "1.5"), "spot_discount"),
])
def test_bad_recommend_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = run_cli("recommend", "llama2-7b", *args, "--yes", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_plan_show_without_a_plan_says_how_to_make_one(tmp_path):
    result = run_cli("plan", "show", cwd=tmp_path)
    assert result.returncode == 2 and "ftplan recommend" in result.stderr


def test_recommend_from_a_dataset_reports_lengths_and_padding(tmp_path):
    rows = [{"text": "word " * n} for n in (50, 400, 120, 2000, 90, 30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run_cli("recommend", "llama2-7b", "--dataset", "d.jsonl", "--seq-len", "512", "--epochs", "3",
                     "--yes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "approximate" in result.stdout and "truncated to 512" in result.stdout and "padding wastes" in result.stdout
    plan = load(tmp_path / "ftplan-plan.yaml")
    assert plan.training.packing is False and plan.training.epochs == 3


def test_a_mixtral_all_linear_plan_carries_the_dropout_peft_can_build(tmp_path):
    """All-linear adapts Mixtral's fused experts through PEFT's ParamWrapper (no dropout): the accepted plan
    says dropout 0, and a plan edited back to a dropout is refused before anything runs."""
    done = run_cli("recommend", "mixtral-8x7b", "--tokens", "20M", "--methods", "lora", "--lora-targets",
                   "all-linear", "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "ftplan-plan.yaml"
    plan = load(path)
    assert plan.training.setup.lora.dropout == 0
    check_targets(plan, resolve_model("mixtral-8x7b"))
    edit = edited(path, tmp_path, lambda d: d["training"]["setup"]["lora"].update(dropout=0.05))
    with pytest.raises(PlannerError, match="training.setup.lora.dropout is 0.05, but PEFT adapts"):
        check_targets(load(edit), resolve_model("mixtral-8x7b"))
