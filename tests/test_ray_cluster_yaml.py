"""The cluster-launcher configs: pure checks (no Ray started, no browser).

They name only fields of Ray's own launcher schema (the one `ray up` validates against), every node
advertises ``browser_slots`` (placement gives each browser one), every node installs the project with
the README's set-up command, and every `ray start` runs under token auth.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from actors.decisions.placement import BROWSER_SLOTS

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["ray_cluster.yaml", "ray_cluster.local.yaml"]
SETUP = "./dev setup"
# The schema shipped inside the installed ray, found without importing ray.
SCHEMA = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def commands(config: dict, *keys: str) -> list[str]:
    return [c for k in keys for c in config.get(k) or []]


def slots_in_start(command_list: list[str]) -> int:
    """browser_slots that the `ray start` among these commands passes with --resources."""
    start = [c for c in command_list if re.search(r"\bray start\b", c)]
    assert len(start) == 1, command_list
    found = re.search(r"--resources='([^']*)'", start[0])
    assert found, f"no --resources on {start[0]!r}"
    return json.loads(found.group(1)).get(BROWSER_SLOTS, 0)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_for_rays_launcher_schema(name):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(load(name))]
    assert not errors, errors


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_advertises_browser_slots_and_the_head_fewer(name):
    config = load(name)
    node_types = config.get("available_node_types")
    if node_types:
        # The autoscaler sees demand only through a node type's resources, and passes them to `ray start`.
        slots = {t: spec["resources"].get(BROWSER_SLOTS, 0) for t, spec in node_types.items()}
        head = slots.pop(config["head_node_type"])
        workers = list(slots.values())
    else:
        # The local provider refuses node types and overrides no resources: the start commands carry them.
        assert config["provider"]["type"] == "local"
        head = slots_in_start(config["head_start_ray_commands"])
        workers = [slots_in_start(config["worker_start_ray_commands"])]
    assert workers and all(w > 0 for w in workers), workers
    assert 0 < head < min(workers)


@pytest.mark.parametrize("name", CONFIGS)
def test_nodes_install_the_project_as_the_readme_does(name):
    readme = (ROOT / "README.md").read_text()
    assert f"`{SETUP}`" in readme, "the README no longer names the set-up command this config runs"
    config = load(name)
    project = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert len(project) == 1, "the project directory must be synced to the nodes"
    setup = commands(config, "setup_commands", "head_setup_commands", "worker_setup_commands")
    assert f"cd {project[0]} && {SETUP}" in setup, setup


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_starts_under_token_auth_from_a_shared_token(name):
    config = load(name)
    starts = [c for c in commands(config, "head_start_ray_commands", "worker_start_ray_commands") if "ray start" in c]
    assert len(starts) == 2, starts
    token_files = {remote for remote in config["file_mounts"] if remote.endswith("auth_token")}
    assert len(token_files) == 1, "the token must reach every node through file_mounts"
    (token_file,) = token_files
    for command in starts:
        prefix = command.split("ray start")[0]
        assert "RAY_AUTH_MODE=token" in prefix, command
        assert f'RAY_AUTH_TOKEN="$(cat {token_file})"' in prefix, command
        assert ":?" in prefix, "ray start must refuse to run without a token (the head would mint its own)"


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_starts_its_workers_at_normal_priority(name):
    """Ray's default worker niceness (15) puts every browser below any normal process (webpool/localray.py)."""
    config = load(name)
    starts = [c for c in commands(config, "head_start_ray_commands", "worker_start_ray_commands") if "ray start" in c]
    assert len(starts) == 2, starts
    for command in starts:
        assert "export RAY_worker_niceness=0;" in command.split("ray start")[0], command
