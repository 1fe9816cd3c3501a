"""Identity, not liveness (DESIGN §5): verify asks the live release and the base model one prompt
and refuses a release that answers like the base model (an adapter loaded but ignored)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import MODEL, TRANSLATOR, assert_one_line_error

pytestmark = pytest.mark.heavy  # runs the real CLI as a subprocess

ECHO_BASE = [sys.executable, str(Path(__file__).parent / "data" / "translator.py"), "echo"]  # untuned: echoes
BOTH = ("--endpoints", "mac-dev", "rtx-1")
PROMPT = "The apostle James wrote about faith and works."


def with_discriminator(ws, base_command: list[str], prompt: str = PROMPT) -> None:
    text = ws.config.read_text()
    anchor = "      timeout_s: 20\n"
    assert anchor in text
    ws.config.write_text(
        text.replace(
            anchor,
            anchor
            + f"      discriminator: {json.dumps(prompt)}\n      base_command: {json.dumps(base_command)}\n",
        )
    )


def test_verify_passes_when_the_live_answer_differs_from_the_base_model(workspace):
    ws = workspace
    with_discriminator(ws, ECHO_BASE)
    plan = ws.cli("deploy", "--cycle", "1", "--models", MODEL, *BOTH, "--dry-run", check=0).stdout
    assert "must differ from the base model" in plan
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, *BOTH, check=0)
    [line] = [x for x in ws.log() if x["endpoint"] == "mac-dev"]
    disc = line["health_check_results"]["post_activation"]["discriminator"]
    assert disc["differs"] is True
    assert disc["base_output"] == PROMPT and disc["output"] != PROMPT
    assert ws.status_json("mac-dev")["models"][MODEL]["health_status"] == "healthy"


def test_a_release_that_answers_like_the_base_model_is_rolled_back(workspace):
    ws = workspace
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, *BOTH, check=0)
    first = ws.active("mac-dev")
    # the "base" here answers exactly as the release does: the adapter makes no difference
    with_discriminator(ws, TRANSLATOR)
    ws.new_adapter(MODEL, "run2", seed=2)
    proc = ws.cli("deploy", "--cycle", "2", "--models", MODEL, *BOTH, check=5)
    assert "loaded but ignored" in proc.stdout + proc.stderr
    assert ws.active("mac-dev") == first and ws.active("rtx-1") == first
    assert ws.status_json("rtx-1")["models"][MODEL]["health_status"] == "rolled_back"


def test_discriminator_without_base_command_is_a_config_error(workspace):
    ws = workspace
    text = ws.config.read_text().replace(
        "      timeout_s: 20\n", "      timeout_s: 20\n      discriminator: hi\n"
    )
    ws.config.write_text(text)
    assert_one_line_error(ws.cli("deploy", "--cycle", "1", "--models", MODEL, *BOTH), "base_command")


@pytest.mark.heavy
def test_real_tiny_model_adapter_differs_from_its_base(workspace):
    pytest.importorskip("torch")
    from adapterctl import tinymodel

    model = tinymodel.build()
    translate = [sys.executable, "-m", "adapterctl.tinymodel", "translate", "--base", str(model.base_dir)]
    ws = workspace
    good = ws.sources[MODEL] / "good"
    shutil.copytree(model.good_adapter, good)
    later = time.time() + 100  # newer than the fixture's run1: the real adapter is what --cycle picks
    os.utime(good / "adapter_model.safetensors", (later, later))
    ws.config.write_text(
        ws.config.read_text().replace(json.dumps(TRANSLATOR), json.dumps([*translate, "{release}"]))
    )
    with_discriminator(ws, [*translate, "--no-adapter"])
    ws.cli("deploy", "--cycle", "1", "--models", MODEL, "--endpoints", "rtx-1", check=0)
    [line] = [x for x in ws.log() if x["endpoint"] == "rtx-1"]
    disc = line["health_check_results"]["post_activation"]["discriminator"]
    assert disc["differs"] is True, disc
