"""A newcomer's first hour (issue 15): the names Hugging Face users type, GPUs ftplan does not sell, output
that fits an 80-column terminal, scripts without a terminal, and assumption lines that apply."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from rich.cells import cell_len

from ftplan.data import catalog
from ftplan.model.resolve import resolve_model
from tests.conftest import run_cli

NEW_GPUS = ("RTX 3090", "RTX 4090", "RTX 5090", "RTX A6000", "RTX 6000 Ada", "A100-PCIe-40GB", "A100-PCIe-80GB",
            "H100-PCIe", "GH200-96GB")


@pytest.mark.parametrize("name", NEW_GPUS)
def test_workstation_and_consumer_gpus_are_catalogued_with_sources(name):
    gpu = catalog.get_gpu(name)
    assert gpu.memory_bytes > 20 * 2**30 and gpu.bf16_tflops and gpu.memory_bandwidth_gbps
    assert gpu.source and gpu.memory_source and gpu.retrieved  # where each figure comes from, and when


@pytest.mark.parametrize("typed, expected", [("RTX 4090", "RTX 4090"), ("rtx-4090", "RTX 4090"),
                                             ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("a6000", "RTX A6000"), ("B100", None),
                                             ("RTX A6000", "RTX A6000"), ("gh200-96gb", "GH200-96GB")])
def test_gpu_names_match_ignoring_case_spaces_and_dashes(typed, expected):
    found = catalog.find_gpu(typed)
    assert (found.name if found else None) == expected


def test_estimate_judges_a_consumer_gpu_and_any_gpu_by_its_memory():
    result = run_cli("estimate", "llama3-8b", "--method", "qlora", "--gpu", "RTX 4090")
    assert result.returncode == 0, result.stderr
    assert "qlora: fits on one RTX 4090" in result.stdout
    result = run_cli("estimate", "llama3-8b", "--method", "lora", "--gpu-memory", "24GiB", "--json")
    assert result.returncode == 0, result.stderr
    selected = json.loads(result.stdout)["estimates"][0]["selected"]
    assert selected["gpu_memory_bytes"] == 24 * 2**30 and selected["instance_type"] is None
    assert not selected["fits"]  # 16 GB of bf16 weights plus activations: not on 24 GiB
    bad = run_cli("estimate", "llama3-8b", "--gpu-memory", "lots")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("name, base", [("meta-llama/Llama-2-7b-chat-hf", "llama2-7b"),
                                        ("Llama-2-7b-chat-hf", "llama2-7b"),
                                        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b"),
                                        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
                                        ("Qwen/Qwen2.5-7B-Instruct", None), ("mistral-7b-instruct-v0.2", None)])
def test_instruct_and_chat_variants_resolve_offline(name, base):
    spec = resolve_model(name)  # HF_HUB_OFFLINE or not, nothing is fetched: the catalog answers
    assert spec.source.startswith("catalog") and spec.hf_id and spec.hf_id.lower().endswith(name.lower().split("/")[-1])
    if base:
        assert spec.dims == resolve_model(base).dims


def test_help_lists_debug_and_device_has_the_same_choices_everywhere():
    assert "--debug" in run_cli("--help").stdout
    choices = set()
    for command in ("estimate", "measure", "run"):
        text = run_cli(command, "--help").stdout
        choices.add(re.search(r"--device \[([^\]]+)\]", text).group(1))
    assert choices == {"auto|cuda|cpu"}
    text = " ".join(run_cli("estimate", "--help").stdout.split())
    assert all(name in re.search(r"--attn \[([^\]]+)\]", text).group(1) for name in ("flash_attention_2", "sdpa",
                                                                                        "eager"))
    assert "TrainingArguments(bf16=True)" in text and "TrainingArguments(fp16=True)" in text  # Trainer's names
    assert "adamw_torch_fused" in text and "paged_adamw_32bit" in text  # TrainingArguments.optim's names


def test_recommend_without_a_terminal_shows_its_answer_and_writes_nothing(tmp_path):
    result = run_cli("recommend", "llama3-8b", "--tokens", "10M", cwd=tmp_path)  # stdin is not a terminal
    assert result.returncode == 0, result.stderr
    assert "Recommended" in result.stdout or "recommend" in result.stdout.lower()
    assert (result.stdout + result.stderr).count("--yes") == 1
    assert not list(tmp_path.iterdir())


def test_assumption_lines_only_for_what_applies(tmp_path):
    qlora = json.loads(run_cli("estimate", "llama3-8b", "--method", "qlora", "--json").stdout)
    assert not any("frozen base is bf16" in a for a in qlora["assumptions"])
    full = json.loads(run_cli("estimate", "llama3-8b", "--method", "full", "--json").stdout)
    assert not any("LoRA" in a for a in full["assumptions"])
    for method in ("full", "qlora"):
        result = run_cli("recommend", "llama3-8b", "--tokens", "10M", "--methods", method, "--yes", "-o",
                         f"{method}.yaml", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        plan = yaml.safe_load((tmp_path / f"{method}.yaml").read_text())
        codes = {a["code"] for a in plan["estimates"]["assumptions"]}
        setup = plan["training"]["setup"]
        if method == "full":
            assert setup["quant_type"] is None and setup["double_quant"] is None and "dequantization" not in codes
        else:
            assert setup["quant_type"] == "nf4" and "dequantization" in codes


def _check_fits(text: str, width: int) -> None:
    lines = text.splitlines()
    widest = max((cell_len(line) for line in lines), default=0)
    assert widest <= width, max(lines, key=cell_len)
    assert "…" not in text


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    where = tmp_path_factory.mktemp("plan")
    result = run_cli("recommend", "llama3-8b", "--tokens", "10M", "--yes", "-o", "plan.yaml", cwd=where)
    assert result.returncode == 0, result.stderr
    return where / "plan.yaml"


COMMANDS = {"estimate": ("estimate", "llama3-8b"), "estimate-mixtral": ("estimate", "mixtral-8x7b"),
            "estimate-gpu": ("estimate", "llama2-7b", "--gpu", "RTX 4090"), "instances": ("instances",),
            "prices": ("prices", "show"), "plugins": ("plugins",), "models": ("models",),
            "recommend": ("recommend", "llama3-8b", "--tokens", "10M"),
            "recommend-all-linear": ("recommend", "llama3-8b", "--tokens", "10M", "--methods", "lora",
                                     "--lora-targets", "all-linear")}


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("name", [*COMMANDS, "plan-show"])
def test_output_fits_the_terminal_without_ellipses(name, width, plan_file):
    args = ("plan", "show", str(plan_file)) if name == "plan-show" else COMMANDS[name]
    result = run_cli(*args, env={"COLUMNS": str(width)})
    assert result.returncode == 0, result.stderr
    _check_fits(result.stdout, width)
    if name == "instances":
        assert "g4dn.xlarge" in result.stdout  # whole names, not "g4dn.…"
    if name == "recommend-all-linear":
        assert "all-linear" in result.stdout
    if name == "estimate-mixtral":
        assert "full: no priced instance" in result.stdout.replace("\n", " ")
    if name == "prices":
        assert len(result.stdout.splitlines()) < 120  # each source once, as a footnote


def test_progress_line_labels_its_figures():
    from rich.console import Console

    from ftplan.render.run import progress_display, remaining
    from ftplan.run.backend import ProgressEvent

    console = Console(record=True, width=120, force_terminal=False)
    with progress_display(console) as show:
        show(ProgressEvent(step=3, total_steps=10, epoch=0.3, loss=2.5, learning_rate=1e-4, tokens=900,
                           tokens_per_second=300, elapsed_seconds=3, eta_seconds=23, peak_memory_bytes=None))
    text = console.export_text()
    assert "23 s left, 3 s elapsed" in text and "300 tok/s" in text and "ETA" not in text
    assert remaining(90 * 60) == "1.5 h" and remaining(600) == "10 min"


def _train(where, method: str, out: str) -> None:
    plan = f"demo/{method}.yaml"
    for args in (("recommend", "demo/tiny", "--dataset", "demo/train.jsonl", "--methods", method, "--seq-len", "64",
                  "--global-batch", "4", "--max-gpus", "1", "--lr", "3e-3", "--backend", "hf", "--yes", "-o", plan),
                 ("run", plan, "--data", "demo/train.jsonl", "--output", out, "--max-steps", "4")):
        result = run_cli(*args, cwd=where)
        assert result.returncode == 0, (args, result.stderr)


def test_outputs_load_with_the_usual_hugging_face_loaders(tmp_path):
    """The README's loading block runs on a trained adapter; a full model loads with AutoTokenizer and
    pipeline() from out/model - the tokenizer is beside the weights in both."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "examples" / "tiny_model.py"), "demo"], cwd=tmp_path, check=True,
                   capture_output=True)
    _train(tmp_path, "lora", "demo/out")
    block = re.search(r"<!-- load-start -->\s*```python\n(.*?)```\s*<!-- load-end -->",
                      (root / "README.md").read_text(), re.S).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    # the tiny tokenizer has no capitals, so only the pipeline's echo of the prompt is verbatim
    assert "The quick brown fox" in result.stdout and (tmp_path / "demo" / "merged" / "tokenizer.json").is_file()

    _train(tmp_path, "full", "demo/out-full")
    check = ("from transformers import AutoTokenizer, pipeline\n"
             "AutoTokenizer.from_pretrained('demo/out-full/model')\n"
             "print(pipeline('text-generation', model='demo/out-full/model')('Hi', max_new_tokens=3)[0]"
             "['generated_text'])\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("Hi"), result.stderr


def test_library_noise_is_silenced_and_ftplan_notes_stay():
    import logging
    import warnings

    from ftplan.backends.hf.quiet import BNB_CPU_KERNEL, quiet_libraries

    quiet_libraries()
    quiet_libraries()  # idempotent: one filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    assert not logger.filters[0].filter(logging.makeLogRecord({"msg": BNB_CPU_KERNEL + " from kernels-community"}))
    assert logger.filters[0].filter(logging.makeLogRecord({"msg": "something else"}))
    with warnings.catch_warnings(record=True) as caught:
        quiet_libraries()  # catch_warnings resets the filters; install them inside
        warnings.warn("Paged optimizers are not supported on CPU. Falling back", UserWarning)
        warnings.warn_explicit("x is deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.x")
        warnings.warn("ftplan's own", UserWarning)
    assert [str(w.message) for w in caught] == ["ftplan's own"]


def test_saving_the_result_draws_no_transformers_bar_and_leaves_bars_as_they_were():
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from ftplan.backends.hf.quiet import no_save_bar

    before = hf_logging.is_progress_bar_enabled()  # other code in this process may have set it either way
    try:
        for enabled in (True, False):
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            with no_save_bar():
                assert not hf_logging.is_progress_bar_enabled()  # "Writing model shards" is transformers' tqdm
            assert hf_logging.is_progress_bar_enabled() is enabled  # as it was: downloads elsewhere keep theirs
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def test_run_says_when_its_data_differ_from_the_plan_and_what_is_truncated(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "examples" / "tiny_model.py"), "demo"], cwd=tmp_path, check=True,
                   capture_output=True)
    result = run_cli("recommend", "demo/tiny", "--dataset", "demo/train.jsonl", "--methods", "lora", "--seq-len", "8",
                     "--global-batch", "4", "--max-gpus", "1", "--backend", "hf", "--yes", "-o", "plan.yaml",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "demo" / "train.jsonl").read_text().splitlines()
    (tmp_path / "other.jsonl").write_text("\n".join(lines + lines[:5]) + "\n")
    result = run_cli("run", "plan.yaml", "--data", "other.jsonl", "--output", "out", "--max-steps", "1",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())  # shown with the run's start, wrapped to the terminal
    assert "the plan was made with demo/train.jsonl; this run trains on other.jsonl" in said
    assert "tokens after truncation" in said and "examples are longer than the plan's sequence length 8" in said
    notes = json.loads((tmp_path / "out" / "summary.json").read_text())["result"]["notes"]
    assert any("this run trains on other.jsonl" in n for n in notes)
    assert any("are truncated" in n for n in notes)


def test_the_last_two_checkpoints_are_kept(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "examples" / "tiny_model.py"), "demo"], cwd=tmp_path, check=True,
                   capture_output=True)
    result = run_cli("recommend", "demo/tiny", "--dataset", "demo/train.jsonl", "--methods", "lora", "--seq-len",
                     "32", "--global-batch", "4", "--max-gpus", "1", "--backend", "hf", "--yes", "-o", "plan.yaml",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli("run", "plan.yaml", "--data", "demo/train.jsonl", "--output", "out", "--save-every", "5",
                     cwd=tmp_path)  # one epoch: 64 examples in 16 steps of 4
    assert result.returncode == 0, result.stderr
    kept = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert kept == ["checkpoint-000010", "checkpoint-000015"]  # 5 went; step 16 is the adapter itself
    assert (tmp_path / "out" / "adapter" / "tokenizer.json").is_file()
    # real tokens, not padding, and the progress line's last figures are the summary's
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    result = json.loads((tmp_path / "out" / "summary.json").read_text())["result"]
    from ftplan.data.dataset import find_tokenizer, from_dataset

    text = from_dataset(tmp_path / "demo" / "train.jsonl", 32, tokenizer=find_tokenizer(tmp_path / "demo" / "tiny"))
    assert result["steps"] == 16 and text.examples == 64
    # every example once: its text tokens plus at most BOS and EOS; padding would add more than that
    assert last["tokens"] == result["tokens"] and text.tokens <= result["tokens"] <= text.tokens + 2 * 64
    assert text.processed_tokens(4) > text.tokens + 2 * 64  # (padding would be told apart)
    assert abs(last["tokens_per_second"] - result["tokens_per_second"]) <= 0.05 * result["tokens_per_second"]


def test_frontier_axis_reads_once_when_candidates_tie():
    from ftplan.render.recommend import _axis

    assert _axis("10 min", "10 min", 40).strip() == "10 min"  # not "10 min ... 10 min"
    spread = _axis("10 min", "2.5 h", 40)
    assert spread.startswith("10 min") and spread.endswith("2.5 h") and len(spread) == 40


def test_plot_draws_the_frontier_and_the_memory_breakdown_as_svg(tmp_path):
    import xml.dom.minidom

    result = run_cli("recommend", "llama3-8b", "--tokens", "10M", "--json", "--plot", "frontier.svg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frontier = json.loads(result.stdout)["frontier"]
    svg = xml.dom.minidom.parse(str(tmp_path / "frontier.svg"))
    assert len(frontier) <= len(svg.getElementsByTagName("circle")) <= len(frontier) + 1
    texts = [t.firstChild.data for t in svg.getElementsByTagName("text")]
    assert any(t.endswith(" *") for t in texts)  # the recommended plan is marked in the legend
    result = run_cli("estimate", "llama3-8b", "--plot", "memory.svg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    svg = xml.dom.minidom.parse(str(tmp_path / "memory.svg"))
    texts = [t.firstChild.data for t in svg.getElementsByTagName("text")]
    assert {"full", "lora", "qlora", "weights", "optimizer"} <= set(texts)
    for bad in ("memory.pdf", "memory.png"):  # PNG needs cairosvg, not installed here
        result = run_cli("estimate", "llama3-8b", "--plot", bad, cwd=tmp_path)
        if bad.endswith(".png") and result.returncode == 0:
            continue  # cairosvg present: a PNG was written
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr and ".svg" in result.stderr
