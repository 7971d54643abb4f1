"""Registration of extension components: in-process with the decorators and `register`, from installed packages
through the `shardproof.plugins` entry points, and `shardproof list` naming where each came from."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.converter.card import get_card, register, unregister
from shardproof.converter.errors import ShardproofError
from shardproof.converter.loaders import CONFIG_LOADERS, ConfigLoader, register_config_loader


def listed(*args: str) -> dict[tuple[str, str], dict]:
    result = CliRunner().invoke(app, ["list", "--json", *args])
    assert result.exit_code == 0, result.output
    return {(c["kind"], c["name"]): c for c in json.loads(result.stdout)}


def test_list_shows_built_ins_with_their_origin() -> None:
    components = listed()
    assert components[("architecture", "LlamaForCausalLM")]["origin"] == "built-in"
    assert components[("checkpoint format", "hf-safetensors")]["details"] == {"config loader": "hf", "weight loader": "safetensors"}
    assert {name for (kind, name), c in components.items() if kind == "weight loader" and c["origin"] == "built-in"} \
        == {"safetensors", "torch-pickle"}


def test_in_process_registrations_are_listed_with_the_registering_module() -> None:
    card = dataclasses.replace(get_card("LlamaForCausalLM"), name="InProcessForCausalLM")
    register(card)

    @register_config_loader("in-process-config")
    class InProcess(ConfigLoader):
        def load(self, model_dir: Path):
            raise NotImplementedError

    try:
        components = listed()
        assert components[("architecture", "InProcessForCausalLM")]["origin"] == f"in-process ({__name__})"
        assert components[("config loader", "in-process-config")]["origin"] == f"in-process ({__name__})"
    finally:
        unregister("InProcessForCausalLM")
        CONFIG_LOADERS.remove("in-process-config")


def test_a_name_registered_twice_is_refused_naming_both_origins() -> None:
    with pytest.raises(ShardproofError, match=r"'LlamaForCausalLM' from in-process \(tests\.test_registry\) is already registered \(by built-in\)"):
        register(get_card("LlamaForCausalLM"))


def fake_distribution(root: Path, module: str, source: str) -> None:
    """An installed distribution `fake-plugin` whose `shardproof.plugins` entry point is `module` (a dist-info
    folder on the path, as pip leaves one)."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / "fake_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[shardproof.plugins]\nfake = {module}\n")


def shardproof(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "shardproof", *args], capture_output=True, text=True, env=env, timeout=300)


def test_an_installed_plugin_registers_through_its_entry_point(tmp_path) -> None:
    fake_distribution(tmp_path, "fake_plugin_module", """
        import dataclasses
        from shardproof.converter.card import get_card, register
        register(dataclasses.replace(get_card("LlamaForCausalLM"), name="PluggedForCausalLM"))
    """)
    run = shardproof(tmp_path, "list", "--json")
    assert run.returncode == 0, run.stderr
    components = {(c["kind"], c["name"]): c for c in json.loads(run.stdout)}
    assert components[("architecture", "PluggedForCausalLM")]["origin"] == "plugin fake-plugin 0.3"
    assert components[("architecture", "LlamaForCausalLM")]["origin"] == "built-in"


@pytest.mark.parametrize("source, fragment", [
    ("raise RuntimeError('boom')", "cannot import fake_plugin_module (boom)"),
    ("""
        from shardproof.converter.card import get_card, register
        register(get_card("LlamaForCausalLM"))
     """, "architecture 'LlamaForCausalLM' from plugin fake-plugin 0.3 is already registered (by built-in)"),
])
def test_a_broken_plugin_is_one_line_of_bad_input(tmp_path, source, fragment) -> None:
    fake_distribution(tmp_path, "fake_plugin_module", source)
    run = shardproof(tmp_path, "list")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "plugin fake (fake-plugin 0.3)" in lines[0] and fragment in lines[0], lines
