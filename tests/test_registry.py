"""The registry file: validation with line numbers, atomic edits that keep comments, reload on change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.errors import ModelNotFound, RegistryError
from models.registry import Registry, RegistryEntry


def test_new_registry_starts_from_the_packaged_one(tmp_path: Path):
    registry = Registry(tmp_path / "registry.yaml")
    assert registry.get("demo").source == "demo:tiny"
    text = (tmp_path / "registry.yaml").read_text()
    assert "# A single-file checkpoint" in text


def test_register_keeps_comments_and_order(tmp_path: Path):
    path = tmp_path / "registry.yaml"
    registry = Registry(path)
    before = path.read_text()
    registry.register("my-lora", RegistryEntry(kind="lora", source="/models/my-lora", base="demo", scale=0.8,
                                               trigger_words=["sks"]))
    after = path.read_text()
    assert after.startswith(before.split("models:")[0])  # the header comments survive
    assert after.index("demo:") < after.index("my-lora:")
    reread = Registry(path).get("my-lora")
    assert (reread.kind, reread.base, reread.scale, reread.trigger_words) == ("lora", "demo", 0.8, ["sks"])
    assert not list(tmp_path.glob(".registry.yaml.*")), "temporary files are cleaned up"


def test_register_twice_needs_replace_and_delete_removes(tmp_path: Path):
    registry = Registry(tmp_path / "registry.yaml")
    registry.register("extra", RegistryEntry(source="demo:tiny"))
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("extra", RegistryEntry(source="demo:tiny"))
    registry.register("extra", RegistryEntry(source="demo:sd15"), replace=True)
    assert registry.get("extra").source == "demo:sd15"
    registry.delete("extra")
    with pytest.raises(ModelNotFound):
        registry.get("extra")


def test_typo_names_the_line(tmp_path: Path):
    path = tmp_path / "registry.yaml"
    path.write_text("models:\n  good:\n    source: demo:tiny\n  bad:\n    sorce: demo:tiny\n")
    with pytest.raises(RegistryError, match=r"line 4: entry 'bad'.*sorce: Extra inputs are not permitted"):
        Registry(path)


def test_invalid_yaml_is_reported(tmp_path: Path):
    path = tmp_path / "registry.yaml"
    path.write_text("models:\n  demo: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        Registry(path)


def test_edit_on_disk_is_seen_and_a_broken_edit_keeps_the_old_entries(tmp_path: Path):
    path = tmp_path / "registry.yaml"
    registry = Registry(path)
    path.write_text(path.read_text() + "  added:\n    source: demo:tiny\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file-system clocks
    assert "added" in registry.names()
    path.write_text("models:\n  broken: {kind: nonsense, source: x}\n")
    assert "added" in registry.names()
    assert registry.get("demo").kind == "base"


def test_adapters_are_not_bases(tmp_path: Path):
    registry = Registry(tmp_path / "registry.yaml")
    registry.register("style", RegistryEntry(kind="lora", source="/x"))
    bases = ("demo, flux-tiny, sd15-random, sd3-medium-random, sd3-tiny, sdxl-random, sdxl-refiner-tiny, sdxl-tiny, "
             "shapes")
    with pytest.raises(ModelNotFound, match=f"registered models: {bases}"):
        registry.get("style", kinds=("base", "dreambooth"))
