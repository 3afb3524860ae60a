"""Reliability under attack, for `ftplan run`: links planted in --output, runs racing for one directory,
failures after preparing, checkpoints from another run, a loss that diverges. Each test stages the attack."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("peft")

from examples import tiny_model  # noqa: E402
from ftplan.run import registry  # noqa: E402
from tests.test_bad_input import call, snapshot  # noqa: E402

PLAN = ("--seq-len", "32", "--global-batch", "2", "--batch-size", "1", "--max-gpus", "1", "--instances", "g5.xlarge",
        "--lr", "3e-3", "--backend", "hf", "--yes", "--force", "--json")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model, data, plans, and a finished 5-step run with checkpoints at steps 2 and 4 (`base`)."""
    root = tmp_path_factory.mktemp("safety")
    tiny_model.make_model(root / "tiny")
    tiny_model.text_data(root / "train.jsonl", n=16)
    tiny_model.text_data(root / "other.jsonl", n=16, seed=5)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for method, name in (("lora", "plan.yaml"), ("full", "full.yaml")):
            assert call(["recommend", "./tiny", "--dataset", "train.jsonl", *PLAN, "--methods", method, "-o",
                         name]) == 0
        assert call(["run", "plan.yaml", "--data", "train.jsonl", "--output", "base", "--max-steps", "5",
                     "--save-every", "2", "--json"]) == 0
    finally:
        os.chdir(cwd)
    data = yaml.safe_load((root / "plan.yaml").read_text())
    data["training"]["learning_rate"] = 2e-4
    (root / "lr.yaml").write_text(yaml.safe_dump(data))
    return root


def run_here(ws: Path, capsys, *args: str) -> tuple[int, str]:
    """`ftplan run` in process, from the workspace: (exit code, stderr)."""
    cwd = os.getcwd()
    os.chdir(ws)
    registry.reset()
    try:
        code = call(["run", *args])
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    # warnings said before the run (its GPU is not here: it trains on the CPU) are not the error
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("ftplan: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("ftplan: error: ") and "Traceback" not in err, err
    return lines[0]


# Every name a run writes in --output (core, checkpoints, final weights, the multi-process launch files), and
# one file inside a checkpoint it reads back.
WRITTEN = ["plan.yaml", "metrics.jsonl", "summary.json", ".ftplan-run.json", ".ftplan.lock", "checkpoint-000004",
           ".checkpoint-000006.tmp", "adapter", ".adapter.tmp", "model", ".model.tmp", "tokenizer", ".tokenizer.tmp",
           "accelerate_config.yaml", "deepspeed_config.json", "launch.sh", ".request.json", ".result.json",
           ".result.json.tmp", ".events.jsonl", "checkpoint-000004/trainer_state.json"]


def test_every_name_a_run_writes_is_attacked():
    """WRITTEN cannot fall behind the writers: every core file and every name the hf backend declares is in it."""
    from ftplan.backends.hf.backend import HuggingFaceBackend
    from ftplan.run import output

    for pattern in (*output.CORE_FILES, output.LOCK, *HuggingFaceBackend.owned_patterns):
        assert any(fnmatch.fnmatchcase(name, pattern) for name in WRITTEN), pattern


@pytest.mark.parametrize("name", WRITTEN)
def test_a_link_planted_in_output_is_refused_before_anything_is_written(ws, tmp_path, capsys, name):
    out = tmp_path / "out"
    shutil.copytree(ws / "base", out, symlinks=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    target = out / name
    if target.is_dir():
        shutil.copytree(target, victim / "copy")  # the link leads to something that looks right
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    target.symlink_to(victim if "." not in name or name.endswith(".tmp") else victim / "precious.txt")
    before, victim_before = snapshot(out), snapshot(victim)
    for extra in (["--resume"], ["--force"]):
        code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out),
                             "--max-steps", "6", *extra)
        assert code == 2 and "is or holds a symbolic link" in one_line(err), err
        assert snapshot(victim) == victim_before and snapshot(out) == before


@pytest.mark.parametrize("name", ["model", "checkpoint-000002"])
def test_force_on_an_output_holding_a_symlinked_model_or_checkpoint_is_refused(ws, tmp_path, capsys, name):
    out = tmp_path / "out"
    shutil.copytree(ws / "base", out, symlinks=True)
    victim = tmp_path / "victim"
    shutil.copytree(ws / "base" / "checkpoint-000002", victim)
    shutil.rmtree(out / name, ignore_errors=True)
    (out / name).symlink_to(victim, target_is_directory=True)
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out), "--force")
    assert code == 2 and f"--force: {out / name} is or holds a symbolic link" in one_line(err)
    assert (victim / "manifest.json").exists() and (out / name).is_symlink()


def test_the_backends_writers_unlink_a_link_instead_of_writing_through_it(tmp_path):
    """Defence in depth for a link planted after the check (mid-run): checkpoints, final weights, the launch
    files, the workers' events and metrics.jsonl never follow one."""
    import torch

    from ftplan.backends.hf import checkpoint, launch, loop
    from ftplan.run.execute import MetricsLog

    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    for name in (".checkpoint-000002.tmp", "checkpoint-000002", ".adapter.tmp", "adapter"):
        (out / name).symlink_to(victim)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved = checkpoint.save(out, 2, model=model, full=False, optimizer=optimizer, scheduler=scheduler, scaler=None,
                            state={"tokens": 1})
    assert not saved.is_symlink() and checkpoint.damage(saved) == ""

    class Saves:
        def save_pretrained(self, directory, **kwargs):
            Path(directory, "weights.safetensors").write_text("w")

        def parameters(self):  # none partitioned by DeepSpeed ZeRO-3: saved as they are
            return iter(())

    assert loop._save_final(Saves(), Saves(), out, False, checkpoint.Processes()) == ["adapter"]
    assert (out / "adapter" / "weights.safetensors").exists() and not (out / "adapter").is_symlink()
    for name in (launch.CONFIG, launch.COMMAND, ".request.json", ".result.json.tmp"):
        (out / name).symlink_to(victim / "precious.txt")
        launch.write_new(out / name, "new")
        assert not (out / name).is_symlink() and (out / name).read_text() == "new"
    (out / launch.EVENTS).symlink_to(victim / "precious.txt")
    with pytest.raises(OSError):  # appending never follows a link (O_NOFOLLOW)
        launch.write_new(out / launch.EVENTS, "event\n", append=True)
    (out / "metrics.jsonl").symlink_to(victim / "precious.txt")
    log = MetricsLog(out / "metrics.jsonl", None)
    log.close()
    assert not (out / "metrics.jsonl").is_symlink()
    assert [p.name for p in victim.iterdir()] == ["precious.txt"] and (victim / "precious.txt").read_text() == "keep me"


def test_resume_with_other_data_another_plan_or_method_is_refused_with_the_difference(ws, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(ws / "base", out)
    cases = [(("plan.yaml", "--data", "other.jsonl"), "checkpoint-000004 was trained on other data (train.jsonl"),
             (("lr.yaml", "--data", "train.jsonl"), "training.learning_rate = 0.003, this plan has 0.0002"),
             (("full.yaml", "--data", "train.jsonl"), "checkpoint-000004 trained lora, this plan trains full")]
    before = snapshot(out)
    for args, expected in cases:
        code, err = run_here(ws, capsys, *args, "--output", str(out), "--resume", "--max-steps", "5")
        assert code == 2 and expected in one_line(err)
        assert snapshot(out) == before  # refused before anything was written


def forge(checkpoint_dir: Path, *, step: int, rename: bool) -> Path:
    """Edit a checkpoint's trainer state by hand, updating its manifest entry so every hash still matches."""
    state_file = checkpoint_dir / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "step": step}))
    manifest = json.loads((checkpoint_dir / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = {"bytes": state_file.stat().st_size,
                                               "sha256": hashlib.sha256(state_file.read_bytes()).hexdigest()}
    if rename:
        manifest["step"] = step
        (checkpoint_dir / "manifest.json").write_text(json.dumps(manifest))
        return checkpoint_dir.rename(checkpoint_dir.with_name(f"checkpoint-{step:06d}"))
    (checkpoint_dir / "manifest.json").write_text(json.dumps(manifest))
    return checkpoint_dir


def test_a_hand_edited_step_is_caught_and_an_impossible_one_refused(ws, tmp_path, capsys):
    from ftplan.backends.hf import checkpoint

    out = tmp_path / "out"
    shutil.copytree(ws / "base", out)
    edited = forge(out / "checkpoint-000004", step=3, rename=False)
    assert checkpoint.damage(edited) == "trainer_state.json names step 3, its manifest 4"
    path, notes = checkpoint.newest_intact(out)
    assert path.name == "checkpoint-000002" and "checkpoint-000004 is damaged" in notes[0]
    shutil.rmtree(edited)
    forge(out / "checkpoint-000002", step=1000, rename=True)  # consistent everywhere, and nonsense
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out), "--resume",
                         "--max-steps", "5")
    assert code == 2 and "checkpoint-001000 is at step 1000, beyond this run's 5 steps" in one_line(err)
    assert "1000 / 5" not in (out / "metrics.jsonl").read_text()


def test_resume_with_another_max_steps_is_refused(ws, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(ws / "base", out)
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out), "--resume",
                         "--max-steps", "6")
    assert code == 2 and "belongs to a run of 5 steps, this one has 6" in one_line(err)


def test_a_run_that_fails_after_preparing_leaves_the_output_as_it_was(ws, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ws / "tiny", broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')  # passes the check, fails to load
    for extra in ([], ["--option", "processes=2"]):  # one process, and torchrun with two workers
        out = tmp_path / f"new{len(extra)}" / "out"
        code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out),
                             "--model-path", str(broken), *extra)
        assert code == 2, err
        assert not out.parent.exists(), sorted(p.name for p in out.iterdir())  # created by the run: removed too
    (tmp_path / "kept").mkdir()
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(tmp_path / "kept"),
                         "--model-path", str(broken))
    assert code == 2 and (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_a_loss_that_becomes_nan_stops_the_run_with_one_line(ws, tmp_path, monkeypatch, capsys):
    from ftplan.backends.hf import loop

    original = loop._micro_step

    def diverging(s, position):
        loss, tokens = original(s, position)
        return (loss * float("nan") if position >= 2 else loss), tokens

    monkeypatch.setattr(loop, "_micro_step", diverging)
    out = tmp_path / "out"
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out), "--save-every", "1")
    line = one_line(err)
    assert code == 2 and "the loss became nan at step 2; training stopped without saving a checkpoint" in line
    assert "lower training.learning_rate (0.003)" in line
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000001"]  # none of diverged weights


def test_crash_leftovers_never_block_force_and_are_removed(ws, tmp_path, capsys):
    """What a kill mid-write leaves (temporary files and directories of every writer, a lock nobody holds) is
    ftplan's own: --force replaces the output instead of refusing "files ftplan did not write"."""
    out = tmp_path / "out"
    shutil.copytree(ws / "base", out)
    leftovers = [".plan.yaml.k2j4h1.tmp", ".metrics.jsonl.a8x0q.tmp", ".summary.json.zz91.tmp",
                 "..ftplan-run.json.p0p0.tmp", ".result.json.tmp"]  # atomic_write_text: .NAME.XXXX.tmp
    for name in leftovers:
        (out / name).write_text("half")
    (out / ".ftplan.lock").write_text(str(os.getppid()))  # a killed run's lock, naming a PID alive again
    leftovers.append(".ftplan.lock")
    for name in (".adapter.tmp", ".model.tmp", ".tokenizer.tmp", ".checkpoint-000006.tmp"):
        (out / name).mkdir()
        (out / name / "part.safetensors").write_text("half")
        leftovers.append(name)
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out), "--force",
                         "--max-steps", "1")
    assert code == 0, err
    assert not [name for name in leftovers if (out / name).exists()]
    assert (out / "plan.yaml").exists() and (out / "summary.json").exists()


def test_resume_past_a_damaged_newest_checkpoint_falls_back_to_the_older_one_and_says_so(ws, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(ws / "base", out)
    states = out / "checkpoint-000004" / "states.safetensors"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # a disk that filled mid-save
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out), "--resume",
                         "--max-steps", "5")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())["result"]
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 5
    assert any("checkpoint-000004 is damaged" in note for note in summary["notes"]), summary["notes"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_force_refused_for_bad_input_removes_nothing(ws, tmp_path, capsys):
    """--force empties the output only once everything else has been checked: a run refused for its model
    leaves the previous run's files in place."""
    out = tmp_path / "out"
    shutil.copytree(ws / "base", out)
    broken = tmp_path / "broken"
    shutil.copytree(ws / "tiny", broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    before = snapshot(out)
    code, err = run_here(ws, capsys, "plan.yaml", "--data", "train.jsonl", "--output", str(out), "--force",
                         "--model-path", str(broken))
    assert code == 2, err
    one_line(err)
    assert snapshot(out) == before
