"""The registry over HTTP, and the server seeing edits without a restart."""

from __future__ import annotations

import os


def test_register_show_delete(client):
    created = client.post("/models", json={"name": "copy", "source": "demo:tiny", "description": "a second demo"})
    assert created.status_code == 201, created.text
    assert client.get("/models/copy").json()["description"] == "a second demo"
    response = client.post("/text2img", json={"prompt": "x", "model": "copy", "steps": 2, "seed": 1})
    assert response.status_code == 200 and response.json()["model"] == "copy"
    assert client.post("/models", json={"name": "copy", "source": "demo:tiny"}).status_code == 422
    assert client.delete("/models/copy").status_code == 204
    assert client.get("/models/copy").status_code == 404
    assert client.delete("/models/copy").status_code == 404


def test_register_rejects_bad_names_and_fields(client):
    assert client.post("/models", json={"name": "../escape", "source": "demo:tiny"}).status_code == 422
    assert client.post("/models", json={"name": "ok", "source": "demo:tiny", "sorce": 1}).status_code == 422
    assert client.post("/models", json={"name": "ok", "kind": "weird", "source": "x"}).status_code == 422


def test_file_edit_is_served_without_restart(client, settings):
    path = settings.registry_path
    path.write_text(path.read_text() + "  edited:\n    source: demo:tiny\n")
    os.utime(path, ns=(2, 2))
    assert client.get("/models/edited").status_code == 200
    assert client.post("/models/reload").status_code == 200


def test_unknown_builtin_is_503(client):
    client.post("/models", json={"name": "weird", "source": "demo:unknown"})
    response = client.post("/text2img", json={"prompt": "x", "model": "weird", "steps": 2})
    assert response.status_code == 503 and "demo:tiny" in response.json()["detail"]


def test_local_diffusers_folder_serves_like_the_builtin(client, settings, tmp_path):
    """The path real checkpoints take: a folder with model_index.json, registered by path."""
    import shutil

    from models.registry.builtins import ensure_builtin

    folder = shutil.copytree(ensure_builtin("tiny", settings.cache_dir), tmp_path / "my-model")
    assert client.post("/models", json={"name": "local", "source": str(folder)}).status_code == 201
    body = {"prompt": "x", "steps": 3, "width": 64, "height": 64, "seed": 4}
    from_folder = client.post("/text2img", json={**body, "model": "local"})
    assert from_folder.status_code == 200, from_folder.text
    assert from_folder.json()["images"] == client.post("/text2img", json=body).json()["images"]
    (folder / "model_index.json").unlink()
    client.post("/models", json={"name": "broken", "source": str(folder)})
    broken = client.post("/text2img", json={**body, "model": "broken"})
    assert broken.status_code == 503 and "no model_index.json" in broken.json()["detail"]
