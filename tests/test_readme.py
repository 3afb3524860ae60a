"""The README's loop (estimate -> recommend -> accept -> run on a tiny local model) works as shown."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def loop_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- loop-start -->\s*```\n(.*?)```\s*<!-- loop-end -->", text, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_the_readme_loop_runs_as_written(tmp_path):
    pytest.importorskip("torch")
    import subprocess

    commands = loop_commands()
    assert [c[0] for c in commands] == ["python", "ftplan", "ftplan", "ftplan", "ftplan"]
    for command in commands:
        if command[0] == "python":
            result = subprocess.run([sys.executable, str(ROOT / command[1]), *command[2:]], cwd=tmp_path,
                                    capture_output=True, text=True)
        else:
            result = run_cli(*command[1:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
    assert (tmp_path / "demo" / "out" / "summary.json").exists()


# (the README's words, the estimate behind them): every memory figure the README quotes from `ftplan estimate`,
# full fine-tuning, one estimate per figure (its options; sync_each_batch is --sync-each-batch)
FSDP8 = {"gpus": 8, "sharding": "fsdp", "grad_accum": 4}
README_FIGURES = [
    ("peak 102.8 -> 127.9 GiB", "llama2-7b", ("memory", "peak_allocated_bytes"), [{}, {"grad_accum": 2}]),
    ("needs 37.9 GiB per GPU as the Trainer\nruns it, 28.2 GiB with it", "llama2-7b", ("sharded", "required_bytes"),
     [FSDP8, {**FSDP8, "sync_each_batch": True}]),
    ("needs 125.2 GiB per GPU", "llama2-70b", ("sharded", "required_bytes"),
     [{"gpus": 16, "nodes": 2, "sharding": "fsdp"}]),
]


@pytest.mark.parametrize("words, model, field, estimates", README_FIGURES, ids=lambda v: str(v)[:20])
def test_the_readmes_memory_figures_are_what_estimate_gives(words, model, field, estimates):
    from ftplan.estimate.report import estimate
    from ftplan.estimate.settings import SetupChoices
    from ftplan.model.resolve import resolve_model

    assert words in (ROOT / "README.md").read_text()
    figures = []
    for options in estimates:
        options = dict(options)
        choices = SetupChoices(sync_each_batch=options.pop("sync_each_batch", False))
        e = estimate(resolve_model(model), ["full"], choices, **options).estimates[0]
        figures.append(f"{getattr(getattr(e, field[0]), field[1]) / 2**30:.1f}")
    assert re.findall(r"\d+\.\d", words) == figures


def _summary(report: str) -> dict[str, tuple[str, ...]]:
    """A benchmark report's summary table: split -> (n, median, max) as written."""
    rows = re.findall(r"^\| ([a-z ,-]+) \| (\d+) \| ([\d.]+%) \| ([\d.]+%) \| \d+/\d+ \|$", report, re.M)
    return {split: rest for split, *rest in rows}


def _errors(report: str, pattern: str) -> list[float]:
    """The 'error' column (today's model) of a benchmark report's rows whose case id matches `pattern`."""
    return [float(m) for m in re.findall(rf"^\| {pattern} \|[^|]*\|[^|]*\|[^|]*\|[^|]*\| ([+-][\d.]+)%", report,
                                         re.M)]


def test_the_readmes_sharded_accuracy_figures_are_the_reports():
    """The FSDP and DeepSpeed accuracy figures the README quotes are those benchmarks/FSDP.md and DEEPSPEED.md
    print (both re-rendered from their records by tests/test_fsdp_accuracy.py and test_deepspeed_accuracy.py),
    and the HSDP figure is what the estimate holds."""
    from ftplan.data import catalog
    from ftplan.estimate.memory import estimate_memory
    from ftplan.estimate.settings import SetupChoices, resolve
    from ftplan.estimate.sharding import _all_reduced
    from ftplan.model.architectures import build_layout
    from ftplan.model.resolve import from_catalog

    readme = " ".join((ROOT / "README.md").read_text().split())
    fsdp_report = (ROOT / "benchmarks" / "FSDP.md").read_text()
    fsdp = _summary(fsdp_report)
    n, median, largest = fsdp["held-out"]
    last = fsdp["held-out, measured after the last change"]
    assert (f"train n=2, max {fsdp['train'][2]}; held-out n={n} median {median}, max {largest}, all within 3%; "
            f"the last {last[0]}, measured after the model's last change, median {last[1]}, max {last[2]}.") in readme
    when_measured = re.findall(r"^\| [^ |]+ \| held-out \|(?:[^|]*\|){4} ([+-][\d.]+)%", fsdp_report, re.M)
    assert f"up to {min(map(float, when_measured)):+.2f}% when measured" in readme
    ds = (ROOT / "benchmarks" / "DEEPSPEED.md").read_text()
    two_layer = _errors(ds, r"(?:llama-1k-2l|qwen-896-4l-tied)/zero3/lora/[^ ]+")
    ten_layer = _errors(ds, r"llama-2k-10l/zero3/lora/[^ ]+")
    assert len(two_layer) == 7 and len(ten_layer) == 2
    assert f"ZeRO-3 on the 2-layer models {min(two_layer):+.2f}% to {max(two_layer):+.2f}% over seven cases" in readme
    assert f"the 10-layer model reads {ten_layer[0]:+.2f}% and {ten_layer[1]:+.2f}% (with checkpointing)" in readme
    layout = build_layout(from_catalog(catalog.find_model("llama2-7b")))
    setup = resolve("full", SetupChoices())
    hsdp = _all_reduced(layout, setup, estimate_memory(layout, setup), 8) / 2**30
    assert f"({hsdp:.1f} GiB per GPU for Llama-2-7B full over 2 x 8 GPUs)" in readme


def _blocks() -> list[dict]:
    import json

    lines = (ROOT / "benchmarks" / "published_runs.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["record"] == "block"]


def test_the_readmes_time_accuracy_figures_are_the_validation_catalogs():
    """The time model's figures the README quotes are catalogs/time_validation.json's (kept current with the model
    by tests/test_time_accuracy.py), for each split, the fresh blocks' included."""
    import json

    validation = json.loads((ROOT / "catalogs" / "time_validation.json").read_text())
    summary = validation["summary"]
    readme = " ".join((ROOT / "README.md").read_text().split())

    def words(s: dict, digits: int) -> str:
        return (f"x{s['median_factor']:.{digits}f}, {s['within_1_25']}/{s['n']} within 1.25x "
                f"({s['min_ratio']:.2f}-{s['max_ratio']:.2f})")

    train, held, first = summary["train"], summary["held-out"], summary["fresh-1"]
    assert f"split ({train['n']} runs) median factor {words(train, 2)}" in readme
    assert f"held-out ({held['n']} runs, never fitted) {words(held, 2)}" in readme
    now = f"x{first['median_factor']:.2f}, {first['within_1_25']}/{first['n']}"
    assert f"the block joined the fit (now {now})" in readme
    tested = next(b for b in _blocks() if b["split"] == "fresh-1")["tested"]
    assert (f"of {tested['n']} runs, collected after the previous model was fixed by helpers who never saw its "
            f"predictions, tested it blind at x{tested['median_factor']:.3f}, {tested['within_1_25']}/{tested['n']} "
            f"within 1.25x ({tested['min_ratio']:.2f}-{tested['max_ratio']:.2f})") in readme
    second, third = summary["fresh-2"], summary["fresh-3"]
    assert f"A second fresh block of {second['n']} runs" in readme and f"{words(second, 3)}**" in readme
    assert f"A third fresh block of {third['n']} runs" in readme
    assert f"reads x{third['median_factor']:.3f}, {third['within_1_25']}/{third['n']} within 1.25x" in readme
    fourth = summary["fresh-4"]
    blind = next(b for b in _blocks() if b["split"] == "fresh-4")["tested"]
    assert (f"A fourth fresh block of {blind['n']} runs" in readme and f"read x{blind['median_factor']:.3f}, "
            f"{blind['within_1_25']}/{blind['n']} within 1.25x ({blind['min_ratio']:.2f}-{blind['max_ratio']:.2f})**"
            in readme)
    assert f"the block reads x{fourth['median_factor']:.3f}, {fourth['within_1_25']}/{fourth['n']}." in readme


def test_the_readmes_miss_ranges_are_the_validation_catalogs():
    """Each range the README gives for a cause of the blind blocks' misses is that cause's runs' range."""
    import json

    ratio = {r["id"]: r for r in json.loads((ROOT / "catalogs" / "time_validation.json").read_text())["runs"]}
    lines = (ROOT / "benchmarks" / "published_runs.jsonl").read_text().splitlines()
    missed = [r for r in map(json.loads, filter(None, lines)) if r.get("known_miss_cause") and r["id"] in ratio
              and not 0.8 <= ratio[r["id"]]["ratio"] <= 1.25]
    readme = " ".join((ROOT / "README.md").read_text().split())

    def span(split: str, cause: str, min_seq: float = 0) -> str:
        found = [ratio[r["id"]]["ratio"] for r in missed if ratio[r["id"]]["split"] == split
                 and r["known_miss_cause"].startswith(cause) and ratio[r["id"]]["seq_len"] >= min_seq]
        assert found, cause
        low, high = f"{min(found):.2f}", f"{max(found):.2f}"
        return low if low == high else f"{low}-{high}"

    assert f"LoRA's adapter path costing more than its FLOPs ({span('fresh-2', 'LoRA')})" in readme
    assert f"since the attention-kernel term ({span('fresh-2', 'Predicted too slow since')};" in readme
    assert f"include the warm-up step ({span('fresh-2', 'The source')})" in readme
    assert f"fitted 25% of bandwidth ({span('fresh-2', 'Predicted too slow: bitsandbytes')})" in readme
    assert f"RTX 6000 Ada cards ({span('fresh-2', 'RTX')})" in readme
    assert f"B200s at FlashAttention-2's ratio ({span('fresh-2', 'FlashAttention-4')})" in readme
    assert f"misses the other way in six of them, at {span('fresh-3', 'Predicted too slow since', 16_384)} (" \
        in readme
    # single runs the README names, as the validation has them today
    assert f"reads {ratio['dschat-opt-1.3b-full-16xv100-zero2-s512']['ratio']:.2f} with the eager-attention term" \
        in readme
    assert f"blind, {span('fresh-4', 'Cause not established')} with the term)" in readme  # GPT-NeoX-20B, two p4d
    tf32 = ratio["flagperf-llama2-7b-lora-r8-qv-1xa100-40-fp32-s512-mb2"]["ratio"]  # an fp32 run on TF32
    assert f"it reads {tf32:.2f}, and the block reads" in readme
