"""The bad-input matrix: every command, fed something wrong, answers with one line on stderr that
says what is wrong and how to fix it, exits non-zero, shows no traceback, and writes nothing.

Runs in process (ftplan.cli.main) so the ~90 cases stay fast; tests/test_cli.py and friends cover
the same contract through real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from ftplan.cli.main import main
from ftplan.run import registry as plugins

pytest.importorskip("torch")


def call(args: list[str]) -> int:
    """ftplan.cli.main's exit code (it returns normally on success)."""
    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def write_plan_variants(ws: Path) -> None:
    """plan.yaml edited by hand in every way a plan can be wrong."""
    plan = yaml.safe_load((ws / "plan.yaml").read_text())

    def variant(name: str, change) -> None:
        data = json.loads(json.dumps(plan))
        change(data)
        write(ws / name, yaml.safe_dump(data))

    variant("plan_v1.yaml", lambda d: d.update(schema_version=1))
    variant("plan_nonsense.yaml", lambda d: d["training"].update(grad_accum="many"))
    variant("plan_negative.yaml", lambda d: d["training"].update(learning_rate=-1))
    variant("plan_unknown_backend.yaml", lambda d: d.update(backend="nope"))
    variant("plan_python_backend.yaml", lambda d: d.update(backend="os:system"))
    variant("plan_sagemaker.yaml", lambda d: d["hardware"].update(platform="sagemaker"))
    variant("plan_flash.yaml", lambda d: d["training"]["setup"].update(attention="flash"))
    variant("plan_two_nodes.yaml", lambda d: (  # two instances at half the micro-batch: the same global batch
        d["hardware"].update(instance_count=2), d["training"]["setup"].update(batch_size=2)))
    variant("plan_method.yaml", lambda d: d["training"].update(method="dora"))
    variant("plan_hybrid.yaml", lambda d: d["hardware"].update(sharding="fsdp-hybrid"))
    variant("plan_extra.yaml", lambda d: d.update(run_this="rm -rf /"))
    variant("plan_targets.yaml", lambda d: d["training"].update(targets=["foo_proj"]))
    variant("plan_targets_other.yaml", lambda d: d["training"].update(targets=["q_proj", "v_proj"]))
    variant("plan_two_methods.yaml", lambda d: d["training"].update(method="qlora"))
    variant("plan_global_batch.yaml", lambda d: d["training"].update(global_batch=d["training"]["global_batch"] + 1))
    variant("plan_lr.yaml", lambda d: d["training"].update(learning_rate=1e9))
    variant("plan_epochs_inf.yaml", lambda d: d["training"].update(epochs=float("inf")))
    variant("plan_seed.yaml", lambda d: d["training"].update(seed=10**20))
    variant("plan_odd.yaml", lambda d: (d["training"].update(global_batch=3, grad_accum=3),
                                        d["training"]["setup"].update(batch_size=1)))
    write(ws / "plan_list.yaml", "- 1\n- 2\n")
    write(ws / "plan_badyaml.yaml", "schema_version: [1\n")
    write(ws / "plan_binary.yaml", b"\xff\xfe\x00garbage")


def write_datasets(ws: Path) -> None:
    """JSONL files, each wrong in one way (and one that is right in an unusual way)."""
    write(ws / "empty.jsonl", "")
    write(ws / "blank.jsonl", "\n\n   \n")
    write(ws / "malformed.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n')
    write(ws / "nofields.jsonl", '{"body": "x"}\n')
    write(ws / "notobject.jsonl", '["a", "b"]\n')
    write(ws / "badmessages.jsonl", '{"messages": [{"role": "user"}]}\n')
    write(ws / "latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))
    write(ws / "huge.jsonl", b"{" + b"x" * 5_000_000)  # one enormous line, not JSON
    (ws / "notadataset").mkdir()
    write(ws / "blanktext.jsonl", '{"text": "ok"}\n{"text": "  \\t "}\n')
    write(ws / "surrogate.jsonl", '{"text": "a\\ud800b"}\n')
    write(ws / "bigint.jsonl", '{"text": "a", "n": ' + "9" * 5000 + "}\n")
    write(ws / "nested.jsonl", '{"text": "a", "n": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    write(ws / "separators.jsonl", json.dumps({"text": "one\u2028two\x85three"}, ensure_ascii=False) + "\n")


def write_configs(ws: Path) -> None:
    """config.json files, malformed, wrong-typed, absurd, or of models that are not causal LMs."""
    write(ws / "configs" / "malformed.json", '{"model_type": "llama", "hidden_size": ')
    write(ws / "configs" / "array.json", "[1, 2]")
    write(ws / "configs" / "nohidden.json", '{"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, '
                                            '"vocab_size": 100}')
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100, "intermediate_size": 128}
    for name, change in (("wrongtype", {"hidden_size": "big"}), ("negative", {"num_hidden_layers": -2}),
                         ("zero", {"vocab_size": 0}), ("absurd", {"num_hidden_layers": 10**9}),
                         ("absurdvocab", {"vocab_size": 10**12}), ("heads", {"num_attention_heads": 5}),
                         ("bool", {"hidden_size": True}), ("unknownarch", {"model_type": "banana"}),
                         ("notype", {"model_type": None})):
        write(ws / "configs" / f"{name}.json", json.dumps({**base, **change}))
    for arch in ("llava", "qwen2_vl", "t5", "clip", "whisper"):
        write(ws / "configs" / f"{arch}.json", json.dumps({**base, "model_type": arch}))
    write(ws / "configs" / "latin1.json", '{"model_type": "llama", "name": "caf\xe9"}'.encode("latin-1"))
    (ws / "configs" / "emptydir").mkdir()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Models, plans, configs and datasets - good and bad - in one directory the cases must not touch."""
    from examples import tiny_model

    ws = tmp_path_factory.mktemp("bad-input")
    tiny_model.make_model(ws / "tiny")
    tiny_model.text_data(ws / "train.jsonl", n=16)
    shutil.copytree(ws / "tiny", ws / "other")
    config = json.loads((ws / "other" / "config.json").read_text())
    (ws / "other" / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    (ws / "pickled").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ws / "tiny" / f, ws / "pickled" / f)
    write(ws / "pickled" / "pytorch_model.bin", b"\x80\x04not really a pickle")
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        code = call(["recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "64", "--global-batch", "4",
                     "--methods", "lora", "--max-gpus", "1", "--backend", "hf", "--yes", "-o", "plan.yaml",
                     "--json"])  # trains here: the run cases are the hf backend's
    finally:
        os.chdir(cwd)
    assert code == 0
    write_plan_variants(ws)
    write_datasets(ws)
    write_configs(ws)
    write(ws / "existing.yaml", "precious")
    write(ws / "afile", "a file")
    write(ws / "nonempty" / "notes.txt", "mine")
    return ws


M = "llama2-7b"
RUN = ("run", "plan.yaml", "--data", "train.jsonl")
CASES = [
    # estimate: arguments
    ("estimate-unknown-model", ["estimate", "llama9-7b"], "unknown model 'llama9-7b'"),
    ("estimate-empty-model", ["estimate", " "], "no model given"),
    ("estimate-batch-zero", ["estimate", M, "--batch-size", "0"], "batch-size must be a positive integer"),
    ("estimate-batch-negative", ["estimate", M, "--batch-size", "-3"], "batch-size must be a positive integer"),
    ("estimate-batch-word", ["estimate", M, "--batch-size", "four"], "'four' is not a valid integer"),
    ("estimate-seq-zero", ["estimate", M, "--seq-len", "0"], "seq-len must be a positive integer"),
    ("estimate-rank-zero", ["estimate", M, "--lora-r", "0"], "lora r must be a positive integer"),
    ("estimate-alpha-negative", ["estimate", M, "--lora-alpha", "-1"], "lora alpha must be a positive integer"),
    ("estimate-dropout", ["estimate", M, "--lora-dropout", "1.5"], "lora dropout must be in [0, 1)"),
    ("estimate-targets-empty", ["estimate", M, "--lora-targets", ","], "--lora-targets is empty"),
    ("estimate-dropout-fused-experts", ["estimate", "mixtral-8x7b", "--method", "lora", "--lora-targets",
                                        "all-linear", "--lora-dropout", "0.1"], "which takes no dropout"),
    ("estimate-targets-unknown", ["estimate", M, "--method", "lora", "--lora-targets", "qq_proj"], "qq_proj"),
    ("estimate-gpu", ["estimate", M, "--gpu", "Z100"], "unknown GPU 'Z100'"),
    ("estimate-instance", ["estimate", M, "--instance", "g9.huge"], "unknown instance type 'g9.huge'"),
    ("estimate-gpu-and-instance", ["estimate", M, "--gpu", "A10G", "--instance", "g5.xlarge"], "either --gpu"),
    ("estimate-method", ["estimate", M, "--method", "dora"], "'dora' is not one of"),
    ("estimate-optimizer", ["estimate", M, "--optimizer", "lion"], "'lion' is not one of"),
    ("estimate-layers-zero", ["estimate", M, "--layers", "0"], "--layers must be positive"),
    ("estimate-unknown-flag", ["estimate", M, "--frobnicate"], "No such option '--frobnicate'"),
    ("estimate-no-model", ["estimate"], "Missing argument 'MODEL'"),
    ("estimate-gpus-zero", ["estimate", M, "--gpus", "0"], "must be positive"),
    ("estimate-gpus-nodes", ["estimate", M, "--gpus", "3", "--nodes", "2"], "not a multiple of --nodes"),
    ("estimate-sharding-none", ["estimate", M, "--gpus", "2", "--sharding", "none"], "use ddp"),
    ("estimate-offload-ddp", ["estimate", M, "--gpus", "2", "--sharding", "ddp", "--offload", "params"],
     "needs parameter sharding"),
    ("estimate-sharding-unknown", ["estimate", M, "--sharding", "zero4"], "'zero4' is not one of"),
    # estimate: config files
    ("config-malformed", ["estimate", "configs/malformed.json"], "not valid JSON (line 1"),
    ("config-array", ["estimate", "configs/array.json"], "must hold a JSON object"),
    ("config-missing-field", ["estimate", "configs/nohidden.json"], "has no 'hidden_size'"),
    ("config-wrong-type", ["estimate", "configs/wrongtype.json"], "'hidden_size' must be a positive integer"),
    ("config-bool", ["estimate", "configs/bool.json"], "'hidden_size' must be a positive integer"),
    ("config-negative", ["estimate", "configs/negative.json"], "'num_hidden_layers' must be positive"),
    ("config-zero", ["estimate", "configs/zero.json"], "'vocab_size' must be positive"),
    ("config-absurd-layers", ["estimate", "configs/absurd.json"], "beyond any real model"),
    ("config-absurd-vocab", ["estimate", "configs/absurdvocab.json"], "beyond any real model"),
    ("config-heads", ["estimate", "configs/heads.json"], "not divisible by num_attention_heads"),
    ("config-unknown-arch", ["estimate", "configs/unknownarch.json"], "does not know model_type 'banana'"),
    ("config-no-type", ["estimate", "configs/notype.json"], "has no 'model_type'"),
    ("config-not-utf8", ["estimate", "configs/latin1.json"], "cannot read it"),
    ("config-dir-without-config", ["estimate", "configs/emptydir"], "has no config.json"),
    ("config-llava", ["estimate", "configs/llava.json"], "'llava' is not a causal language model"),
    ("config-qwen2-vl", ["recommend", "configs/qwen2_vl.json", "--tokens", "1M"], "'qwen2_vl' is not a causal"),
    ("config-t5", ["estimate", "configs/t5.json"], "'t5' is an encoder-decoder model"),
    ("config-clip", ["estimate", "configs/clip.json"], "'clip' is not a causal language model"),
    ("config-whisper", ["estimate", "configs/whisper.json"], "'whisper' is an encoder-decoder model"),
    ("config-missing-file", ["estimate", "configs/missing.json"], "no such file"),
    # measure, models, instances, plugins
    ("measure-steps", ["measure", "./tiny", "--steps", "0"], "--steps must be positive"),
    ("measure-grad-accum", ["measure", "./tiny", "--grad-accum", "0"], "--grad-accum"),
    ("estimate-grad-accum", ["estimate", "llama2-7b", "--grad-accum", "-2"], "--grad-accum"),
    ("measure-device", ["measure", M, "--device", "tpu"], "'tpu' is not one of"),
    ("measure-unknown-model", ["measure", "nope-1b"], "unknown model 'nope-1b'"),
    ("instances-gpu", ["instances", "--gpu", "Z100"], "unknown GPU 'Z100'"),
    ("instances-memory", ["instances", "--min-gpu-memory", "lots"], "'lots' is not a valid float"),
    ("models-flag", ["models", "--bogus"], "No such option '--bogus'"),
    ("plugins-flag", ["plugins", "--bogus"], "No such option '--bogus'"),
    ("unknown-command", ["frobnicate"], "No such command 'frobnicate'"),
    # recommend: arguments
    ("recommend-no-data", ["recommend", M], "either --tokens N or --dataset"),
    ("recommend-both-data", ["recommend", M, "--tokens", "1M", "--dataset", "train.jsonl"], "either --tokens"),
    ("recommend-tokens-zero", ["recommend", M, "--tokens", "0"], "positive token count"),
    ("recommend-tokens-word", ["recommend", M, "--tokens", "lots"], "not a token count"),
    ("recommend-tokens-huge", ["recommend", M, "--tokens", "9e99"], "positive token count below"),
    ("recommend-tokens-nan", ["recommend", M, "--tokens", "nan"], "positive token count below"),
    ("recommend-epochs-zero", ["recommend", M, "--tokens", "1M", "--epochs", "0"], "epochs"),
    ("recommend-epochs-negative", ["recommend", M, "--tokens", "1M", "--epochs", "-1"], "epochs"),
    ("recommend-global-batch", ["recommend", M, "--tokens", "1M", "--global-batch", "0"], "global_batch"),
    ("recommend-max-gpus", ["recommend", M, "--tokens", "1M", "--max-gpus", "0"], "max_gpus"),
    ("recommend-budget-negative", ["recommend", M, "--tokens", "1M", "--budget", "-5"], "budget_usd"),
    ("recommend-budget-unmet", ["recommend", M, "--tokens", "1M", "--budget", "0.01"], "nothing fits the $0.01"),
    ("recommend-deadline-zero", ["recommend", M, "--tokens", "1M", "--deadline", "0"], "deadline_hours"),
    ("recommend-deadline-unmet", ["recommend", M, "--tokens", "1B", "--deadline", "0.2"], "nothing finishes within"),
    ("recommend-priority", ["recommend", M, "--tokens", "1M", "--priority", "fastest"], "'fastest' is not one of"),
    ("recommend-region", ["recommend", M, "--tokens", "1M", "--region", "mars-1"], "no ec2 prices for region"),
    ("recommend-instance", ["recommend", M, "--tokens", "1M", "--instances", "g5.xlargee"], "Did you mean: g5.xlarge"),
    ("recommend-methods", ["recommend", M, "--tokens", "1M", "--methods", "full,dora"], "unknown method(s) dora"),
    ("recommend-methods-empty", ["recommend", M, "--tokens", "1M", "--methods", ","], "unknown method(s) (none)"),
    ("recommend-spot-discount", ["recommend", M, "--tokens", "1M", "--spot", "--spot-discount", "1.5"], "spot_disc"),
    ("recommend-lr", ["recommend", M, "--tokens", "1M", "--lr", "0"], "0 is not in the range"),
    ("recommend-lr-absurd", ["recommend", M, "--tokens", "1M", "--lr", "1e9"], "is not in the range"),
    ("recommend-epochs-absurd", ["recommend", M, "--tokens", "1M", "--epochs", "1e300"], "epochs: Input should be"),
    ("recommend-epochs-inf", ["recommend", M, "--tokens", "1M", "--epochs", "inf"], "epochs"),
    ("recommend-no-fit", ["recommend", "llama2-70b", "--tokens", "1M", "--methods", "full", "--instances",
                          "g5.xlarge"], "nothing fits: the smallest requirement"),
    ("recommend-unpacked-tokens", ["recommend", M, "--tokens", "1M", "--no-packing"], "counts packed sequences"),
    ("recommend-backend", ["recommend", M, "--tokens", "1M", "--backend", "nope", "-y", "-o", "p.yaml"],
     "no trainer backend named 'nope'"),
    ("recommend-tokenizer", ["recommend", M, "--dataset", "train.jsonl", "--tokenizer", "missing"], "no tokenizer"),
    ("recommend-output-exists", ["recommend", M, "--tokens", "1M", "-y", "-o", "existing.yaml"], "already exists"),
    ("recommend-output-dir", ["recommend", M, "--tokens", "1M", "-y", "-o", "tiny"], "is a directory"),
    ("recommend-output-under-file", ["recommend", M, "--tokens", "1M", "-y", "-o", "afile/plan.yaml"], "is a file"),
    ("recommend-output-unwritable", ["recommend", M, "--tokens", "1M", "-y", "-o", "/proc/ftplan/p.yaml"],
     "cannot write"),
    # recommend: datasets
    ("dataset-missing", ["recommend", M, "--dataset", "missing.jsonl"], "does not exist"),
    ("dataset-empty", ["recommend", M, "--dataset", "empty.jsonl"], "is empty"),
    ("dataset-blank", ["recommend", M, "--dataset", "blank.jsonl"], "is empty"),
    ("dataset-malformed", ["recommend", M, "--dataset", "malformed.jsonl"], "line 3: invalid JSON"),
    ("dataset-no-fields", ["recommend", M, "--dataset", "nofields.jsonl"], "line 1: no 'text'"),
    ("dataset-not-object", ["recommend", M, "--dataset", "notobject.jsonl"], "expected a JSON object"),
    ("dataset-bad-messages", ["recommend", M, "--dataset", "badmessages.jsonl"], "needs string 'role'"),
    ("dataset-not-utf8", ["recommend", M, "--dataset", "latin1.jsonl"], "line 1: not UTF-8"),
    ("dataset-huge-line", ["recommend", M, "--dataset", "huge.jsonl"], "line 1: invalid JSON"),
    ("dataset-directory", ["recommend", M, "--dataset", "notadataset"], "is a directory"),
    ("dataset-whitespace-text", ["recommend", M, "--dataset", "blanktext.jsonl"], "line 2: the example's text is empty"),
    ("dataset-whitespace-tokenized", ["recommend", "./tiny", "--dataset", "blanktext.jsonl", "--seq-len", "64"],
     "text is empty"),
    ("dataset-lone-surrogate", ["recommend", M, "--dataset", "surrogate.jsonl"], "line 1: the text holds a lone sur"),
    ("dataset-huge-integer", ["recommend", M, "--dataset", "bigint.jsonl"], "line 1: invalid JSON (a number with"),
    ("dataset-deep-nesting", ["recommend", M, "--dataset", "nested.jsonl"], "line 1: invalid JSON (nested too"),
    ("dataset-dev-zero", ["recommend", M, "--dataset", "/dev/zero"], "is a character device, not a regular file"),
    # plan show
    ("plan-missing", ["plan", "show", "missing.yaml"], "does not exist; write one with"),
    ("plan-version", ["plan", "show", "plan_v1.yaml"], "schema_version 1"),
    ("plan-nonsense", ["plan", "show", "plan_nonsense.yaml"], "training.grad_accum"),
    ("plan-negative", ["plan", "show", "plan_negative.yaml"], "training.learning_rate"),
    ("plan-method", ["plan", "show", "plan_method.yaml"], "training.method"),
    ("plan-extra-key", ["plan", "show", "plan_extra.yaml"], "run_this: Extra inputs"),
    ("plan-python-backend", ["plan", "show", "plan_python_backend.yaml"], "backend: String should match"),
    ("plan-list", ["plan", "show", "plan_list.yaml"], "does not hold a plan"),
    ("plan-bad-yaml", ["plan", "show", "plan_badyaml.yaml"], "not valid YAML"),
    ("plan-binary", ["plan", "show", "plan_binary.yaml"], "not UTF-8"),
    ("plan-directory", ["plan", "show", "tiny"], "is a directory"),
    ("plan-two-methods", ["plan", "show", "plan_two_methods.yaml"], "training.method is qlora but training.setup"),
    ("plan-global-batch", ["plan", "show", "plan_global_batch.yaml"], "training.global_batch is 5 but micro-batch"),
    ("plan-lr-absurd", ["plan", "show", "plan_lr.yaml"], "1e+09 is beyond any learning rate that trains"),
    ("plan-epochs-inf", ["plan", "show", "plan_epochs_inf.yaml"], "training.epochs: Input should be a finite"),
    ("plan-seed-huge", ["plan", "show", "plan_seed.yaml"], "training.seed: Input should be less than"),
    ("run-targets-unknown", ["run", "plan_targets.yaml", "--data", "train.jsonl"], "has no module 'foo_proj'"),
    ("run-targets-differ", ["run", "plan_targets_other.yaml", "--data", "train.jsonl"], "adapt other modules"),
    ("run-hsdp", ["run", "plan_hybrid.yaml", "--data", "train.jsonl"], "cannot run hardware.sharding fsdp-hybrid"),
    ("run-processes-unsplittable", ["run", "plan_odd.yaml", "--data", "train.jsonl", "--option", "processes=2"],
     "2 processes cannot split the plan's global batch (3 = micro-batch 1 x 3"),
    # run
    ("run-no-plan", ["run", "missing.yaml", "--data", "train.jsonl"], "does not exist; write one with"),
    ("run-no-data-flag", ["run", "plan.yaml"], "Missing option '--data'"),
    ("run-plan-version", ["run", "plan_v1.yaml", "--data", "train.jsonl"], "schema_version 1"),
    ("run-unknown-backend", ["run", "plan_unknown_backend.yaml", "--data", "train.jsonl"],
     "no trainer backend named 'nope'"),
    ("run-backend-flag", [*RUN, "--backend", "nope"], "no trainer backend named 'nope'"),
    ("run-python-backend", ["run", "plan_python_backend.yaml", "--data", "train.jsonl"], "String should match"),
    ("run-sagemaker-on-ec2-plan", [*RUN, "--backend", "sagemaker", "--option", "role=arn:aws:iam::1:role/r"],
     "does not run on ec2"),
    ("run-dry-run-local", [*RUN, "--dry-run"], "backend 'hf' has no dry run"),
    ("run-sagemaker-no-role", ["run", "plan_sagemaker.yaml", "--data", "train.jsonl", "--backend", "sagemaker",
                               "--dry-run"], "no IAM role for the job"),
    ("run-flash-on-cpu", ["run", "plan_flash.yaml", "--data", "train.jsonl"], "FlashAttention-2"),
    ("run-config-hash", [*RUN, "--model-path", "other"], "not the architecture the plan was made for"),
    ("run-pickle-weights", [*RUN, "--model-path", "pickled"], "never loads pickle"),
    ("run-model-missing", [*RUN, "--model-path", "/nonexistent/model"], "no such file"),
    ("run-data-missing", ["run", "plan.yaml", "--data", "missing.jsonl"], "does not exist"),
    ("run-data-empty", ["run", "plan.yaml", "--data", "empty.jsonl"], "is empty"),
    ("run-data-malformed", ["run", "plan.yaml", "--data", "malformed.jsonl"], "line 3: invalid JSON"),
    ("run-data-not-utf8", ["run", "plan.yaml", "--data", "latin1.jsonl"], "not UTF-8"),
    ("run-data-dir", ["run", "plan.yaml", "--data", "notadataset"], "not a saved Hugging Face dataset"),
    ("run-data-dev-zero", ["run", "plan.yaml", "--data", "/dev/zero"], "not a regular file"),
    ("run-data-surrogate", ["run", "plan.yaml", "--data", "surrogate.jsonl"], "lone surrogate"),
    ("run-data-huge-integer", ["run", "plan.yaml", "--data", "bigint.jsonl"], "a number with too many digits"),
    ("run-eval-data", [*RUN, "--eval-data", "nofields.jsonl"], "no 'text'"),
    ("run-output-file", [*RUN, "--output", "afile"], "is a file; give a directory"),
    ("run-output-under-file", [*RUN, "--output", "afile/out"], "is a file"),
    ("run-output-unwritable", [*RUN, "--output", "/proc/ftplan-out"], "cannot write"),
    ("run-output-nonempty", [*RUN, "--output", "nonempty"], "is not empty; pass --force"),
    ("run-force-foreign", [*RUN, "--output", "nonempty", "--force"], "ftplan did not write (notes.txt)"),
    ("run-resume-nothing", [*RUN, "--output", "fresh", "--resume"], "has no checkpoint"),
    ("run-max-steps", [*RUN, "--max-steps", "0"], "0 is not in the range"),
    ("run-max-steps-absurd", [*RUN, "--max-steps", "1" + "0" * 30], "max_steps: Input should be less than"),
    ("run-save-every", [*RUN, "--save-every", "-1"], "-1 is not in the range"),
    ("run-option-form", [*RUN, "--option", "noequals"], "must look like KEY=VALUE"),
    ("run-two-nodes-here", ["run", "plan_two_nodes.yaml", "--data", "train.jsonl"],
     "this is one machine (backend hf trains on this machine) (fix: run it where it was planned with --backend skypilot"),
    ("run-skypilot-option", [*RUN, "--backend", "skypilot", "--option", "on_interrupt=never"],
     "--option on_interrupt: Input should be 'ask', 'cancel' or 'detach' of backend 'skypilot'"),
    ("run-option-unknown", [*RUN, "--option", "speed=11"], "--option speed: is not an option of backend 'hf' (its options: processes"),
    ("run-device", [*RUN, "--device", "tpu"], "'tpu' is not one of"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root with a hash of its content."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.mark.parametrize("case, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(workspace, case, args, expected, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home = Path(os.environ["FTPLAN_HOME"])
    before, home_before = snapshot(workspace), snapshot(home) if home.exists() else {}
    plugins.reset()
    code = call(list(args))
    err = capsys.readouterr().err
    assert code != 0, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ftplan: error: ") and "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert len(lines[0]) < 600, "an error line must stay readable"
    assert snapshot(workspace) == before, "a failed command wrote or changed a file"
    assert (snapshot(home) if home.exists() else {}) == home_before


def test_line_separators_inside_strings_are_data(workspace, capsys, monkeypatch):
    """Valid JSONL may hold a raw U+2028 or U+0085 in a string: lines split on \\n only."""
    monkeypatch.chdir(workspace)
    code = call(["recommend", "./tiny", "--dataset", "separators.jsonl", "--seq-len", "64", "--methods", "lora",
                 "--max-gpus", "1", "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["data"]["examples"] == 1


def test_the_matrix_is_big_enough():
    assert len(CASES) >= 60
    commands = {args[0] for _, args, _ in CASES}
    assert {"estimate", "measure", "models", "instances", "plugins", "recommend", "plan", "run"} <= commands


def test_debug_shows_the_traceback(workspace, monkeypatch):
    from ftplan.errors import PlannerError

    monkeypatch.chdir(workspace)
    with pytest.raises(PlannerError):
        main(["estimate", "llama9-7b", "--debug"])
