"""Text from plans, configs, datasets, paths and plugins is data, never markup: rich markup in it is shown as
written (no crash, no hyperlink), and escape sequences in it never reach the terminal - in every renderer, on a
terminal and through a pipe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_LLAMA, run_cli

HOSTILE = "[/evil][link=file:///etc/passwd]click[/link]\x1b]0;pwned\x07\x1b[2J\x9b31m"
SHOWN = "[/evil][link=file:///etc/passwd]click[/link]]0;pwned[2J31m"  # what is left once control codes go
# a path holding a closing tag ('w[' / 'boom]...') and an escape sequence
HOSTILE_DIR = "w[/boom][bold]x\x1b]0;pwned\x07"


def assert_inert(output: str) -> None:
    """No escape sequence that rich did not write itself: rich writes only SGR colours (ESC [ ... m)."""
    assert "\x07" not in output and "\x1b]" not in output and "\x1b[2J" not in output and "\x9b" not in output
    assert "pwned" not in output or "\x1b]0;pwned" not in output


def terminal_console():
    from ftplan.render.console import make_console

    return make_console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=400)


@pytest.fixture(scope="module")
def hostile_plan(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("render")
    made = run_cli("recommend", "llama2-7b", "--tokens", "20000000", "--budget", "50", "--yes", "-o", "p.yaml",
                   cwd=root)
    assert made.returncode == 0, made.stderr
    plan = yaml.safe_load((root / "p.yaml").read_text())
    plan["model"]["name"] = HOSTILE
    plan["training"]["data_source"] = HOSTILE
    plan["estimates"]["price"]["source"] = HOSTILE
    path = root / "plan[" / "x].yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(plan))
    return path


def test_plan_show_prints_hostile_plan_text_as_data(hostile_plan):
    from ftplan.plan import load
    from ftplan.render.recommend import print_plan

    shown = run_cli("plan", "show", "plan[/x].yaml", cwd=hostile_plan.parent.parent)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert SHOWN in shown.stdout and "plan[/x].yaml" in shown.stdout and "\x1b" not in shown.stdout
    console = terminal_console()
    print_plan(load(hostile_plan), str(hostile_plan), console)
    on_terminal = console.file.getvalue()
    assert_inert(on_terminal)
    assert "\x1b[" in on_terminal  # rich's own styling still reaches a terminal
    assert "click" in on_terminal and "\x1b]8;" not in on_terminal  # no hyperlink


def test_estimate_with_a_hostile_name_or_path_in_the_config(write_config):
    model = write_config({**TINY_LLAMA, "_name_or_path": "[/boom]" + HOSTILE})
    shown = run_cli("estimate", str(model))
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "[/boom]" + SHOWN in shown.stdout and "\x1b" not in shown.stdout and "\x07" not in shown.stdout


def test_paths_with_markup_and_escapes_in_recommend_run_and_errors(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from examples import tiny_model

    root = tmp_path / HOSTILE_DIR
    root.mkdir(parents=True)
    tiny_model.make_model(root / "tiny")
    tiny_model.text_data(root / "data.jsonl", n=8)
    steps = [("recommend", str(root / "tiny"), "--dataset", str(root / "data.jsonl"), "--seq-len", "32",
              "--global-batch", "2", "--batch-size", "1", "--max-gpus", "1", "--instances", "g5.xlarge",
              "--methods", "lora", "--backend", "hf", "--yes", "-o", str(root / "plan.yaml")),
             ("plan", "show", str(root / "plan.yaml")),
             ("run", str(root / "plan.yaml"), "--data", str(root / "data.jsonl"), "--output",
              str(root / "out"), "--max-steps", "1")]
    for args in steps:
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args[0], done.stderr)
        assert "w[/boom][bold]x]0;pwned" in done.stdout.replace("\n", ""), (args[0], done.stdout)
        assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr, args[0]
    failed = run_cli("run", str(root / "plan.yaml"), "--data", str(root / "missing[m].jsonl\x1b[2J"),
                     "--output", str(root / "out2"), cwd=tmp_path)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1 and lines[0].startswith("ftplan: error: "), failed.stderr
    assert "missing[m].jsonl[2J" in lines[0] and "\x1b" not in failed.stderr


def test_plugin_errors_and_price_sources_are_data_on_a_terminal():
    from ftplan.render.prices import prices_table
    from ftplan.render.run import plugins_table

    console = terminal_console()
    console.print(plugins_table([{"name": "p", "version": HOSTILE, "source": HOSTILE, "catalog_entries": 0,
                                  "backends": [], "errors": ["[/boom] " + HOSTILE]}], None))
    prices, notes = prices_table([{"instance_type": HOSTILE, "region": "r", "platform": "p", "market": "m",
                                   "usd_per_hour": 1.0, "date": "[/d]", "warning": "old", "source": HOSTILE}])
    console.print(prices)
    for note in notes:  # sources are footnotes, and '*' marks an old date
        console.print(note)
    output = console.file.getvalue()
    assert_inert(output)
    assert "[/boom]" in output and "[/d]*" in output and "[1] [/evil]" in output
    assert json.dumps(HOSTILE)  # the --json forms escape control characters themselves
