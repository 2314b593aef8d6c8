"""Datasets through the API: uploaded (a zip, or images with captions), checked, listed, deleted; refused with a
4xx and nothing written outside the datasets folder when a zip escapes or holds what is not an image; a run
started on an uploaded dataset, stopped and resumed through the API."""

from __future__ import annotations

import io
import json
import stat
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from models.settings import Settings
from tests.conftest import wait_ready
from tests.fake_engine import FakeEngine
from tests.training_helpers import FAST_TARGETS, shape_image
from training.config import LoraOptions

CPU_LAUNCH = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


@pytest.fixture
def dataset_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={
        "datasets_dir": tmp_path / "datasets", "training_accelerate_config": None, "training_launch_args": CPU_LAUNCH,
        "training_stop_timeout_s": 30.0, "preload_default_model": False, "dataset_max_files": 20,
        "dataset_max_bytes": 200_000,
    })


@pytest.fixture
def api(dataset_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The real training manager behind a fake generation engine: these routes never generate."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with TestClient(create_app(dataset_settings, engine=FakeEngine())) as client:
        wait_ready(client)
        yield client


def png(colour: str = "red", shape: str = "circle", size: tuple[int, int] = (80, 64)) -> bytes:
    stream = io.BytesIO()
    shape_image(colour, shape, size).save(stream, "PNG")
    return stream.getvalue()


def zip_of(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return stream.getvalue()


def captioned_zip(prefix: str = "shapes/") -> bytes:
    members = {}
    for colour in ("red", "green", "blue"):
        for shape in ("square", "circle"):
            members[f"{prefix}{colour}-{shape}.png"] = png(colour, shape)
            members[f"{prefix}{colour}-{shape}.txt"] = f"a {colour} {shape}\n".encode()
    members["__MACOSX/shapes/._red-square.png"] = b"mac clutter"
    return zip_of(members)


def upload_zip(client: TestClient, name: str, data: bytes, **form: str):
    return client.post(f"/datasets/{name}", files={"files": ("upload.zip", data, "application/zip")}, data=form)


def everything_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")} if folder.exists() else set()


def test_a_zip_is_unpacked_listed_and_deleted(api, dataset_settings):
    response = upload_zip(api, "shapes", captioned_zip())
    assert response.status_code == 201, response.text
    assert response.headers["location"] == "/datasets/shapes"
    described = response.json()
    assert (described["name"], described["layout"], described["images"], described["captioned"]) == (
        "shapes", "captions", 6, 6)
    folder = dataset_settings.datasets_dir / "shapes"
    assert (folder / "red-square.png").is_file() and (folder / "red-square.txt").read_text() == "a red square\n"
    assert not (folder / "__MACOSX").exists()

    assert [item["name"] for item in api.get("/datasets").json()["datasets"]] == ["shapes"]
    assert api.get("/datasets/shapes").json()["images"] == 6
    again = upload_zip(api, "shapes", captioned_zip())
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    assert upload_zip(api, "shapes", captioned_zip(prefix=""), replace="true").status_code == 201

    assert api.delete("/datasets/shapes").status_code == 200
    assert api.get("/datasets/shapes").status_code == 404
    assert api.get("/datasets").json() == {"datasets": []}
    assert everything_under(dataset_settings.datasets_dir) == set()


def test_images_and_captions_sent_one_by_one(api, dataset_settings):
    files = [("files", ("a.png", png("red"), "image/png")), ("files", ("a.txt", b"a red circle", "text/plain")),
             ("files", ("b.png", png("blue"), "image/png"))]
    # b.png has no caption: refused, unless a caption for the rest is given.
    refused = api.post("/datasets/two", files=files)
    assert refused.status_code == 422 and "b.png" in refused.json()["detail"]
    response = api.post("/datasets/two", files=files, data={"caption": "a photo of sks shape"})
    assert response.status_code == 201, response.text
    assert response.json()["captioned"] == 2
    assert (dataset_settings.datasets_dir / "two" / "b.txt").read_text().strip() == "a photo of sks shape"

    # Images alone: a DreamBooth instance folder.
    alone = api.post("/datasets/subject", files=[("files", (f"{i}.png", png(), "image/png")) for i in range(3)])
    assert alone.status_code == 201 and alone.json()["layout"] == "images" and alone.json()["captioned"] == 0


def test_metadata_jsonl_and_nested_images(api):
    rows = [{"file_name": "images/a.png", "text": "a red circle"}, {"file_name": "images/b.png", "text": "b"}]
    members = {"metadata.jsonl": "\n".join(json.dumps(row) for row in rows).encode(),
               "images/a.png": png("red"), "images/b.png": png("blue")}
    response = upload_zip(api, "meta", zip_of(members))
    assert response.status_code == 201, response.text
    assert (response.json()["layout"], response.json()["captioned"]) == ("metadata.jsonl", 2)
    unlisted = upload_zip(api, "meta2", zip_of({**members, "images/c.png": png("green")}))
    assert unlisted.status_code == 422 and "images/c.png" in unlisted.json()["detail"]
    nested = upload_zip(api, "nested", zip_of({"x/a.png": png(), "x/a.txt": b"a", "y/b.png": png(), "y/b.txt": b"b"}))
    assert nested.status_code == 422 and "subfolders" in nested.json()["detail"]


@pytest.mark.parametrize(
    "members, links, status, message",
    [
        ({"ok.png": png(), "../escape.png": png()}, None, 422, "../escape.png: names with '..'"),
        ({"ok.png": png(), "a/../../escape.png": png()}, None, 422, "names with '..'"),
        ({"ok.png": png(), "/tmp/sdserve-absolute-escape.png": png()}, None, 422, "absolute names are refused"),
        ({"ok.png": png(), "C:/escape.png": png()}, None, 422, "absolute names are refused"),
        ({"ok.png": png(), "dir\\..\\..\\escape.png": png()}, None, 422, "backslashes"),
        ({"ok.png": png()}, {"link.png": "../../escape.png"}, 422, "link.png: is a symbolic link"),
        ({"ok.png": png(), "notes.pdf": b"%PDF-1.4"}, None, 422, "notes.pdf: only images"),
        ({"ok.png": png(), "fake.png": b"this is not a picture"}, None, 422, "fake.png is not an image"),
        ({"ok.png": png(), "ok.txt": "caf\xe9".encode("latin-1")}, None, 422, "ok.txt is not UTF-8 text"),
        ({"ok.png": png(), "run.sh": b"#!/bin/sh\nrm -rf /\n"}, None, 422, "run.sh: only images"),
        ({f"{i}.png": png() for i in range(21)}, None, 413, "21 files; a dataset may hold at most 20"),
        ({"big.png": b"\0" * 300_000}, None, 413, "unpacks to 300000 bytes; the limit is 200000"),
        ({"cut.png": png(size=(64, 64))[:200]}, None, 422, "cut.png is not an image"),
    ],
)
def test_bad_zips_are_refused_and_write_nothing(api, dataset_settings, tmp_path, members, links, status, message):
    before = everything_under(tmp_path)
    response = upload_zip(api, "bad", zip_of(members, links))
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    # Nothing outside the datasets folder, nothing left inside it.
    assert everything_under(dataset_settings.datasets_dir) == set()
    assert everything_under(tmp_path) - before <= {"datasets"}
    assert not Path("/tmp/sdserve-absolute-escape.png").exists()
    assert not (tmp_path / "escape.png").exists() and not (dataset_settings.datasets_dir.parent / "escape.png").exists()


@pytest.mark.parametrize(
    "files, form, status, message",
    [
        ([("files", ("../escape.png", png(), "image/png"))], {}, 422, "send plain file names"),
        ([("files", ("a.png", png(), "image/png")), ("files", ("a.png", png(), "image/png"))], {}, 422,
         "a.png appears twice"),
        ([("files", ("a.png", png(), "image/png")), ("files", ("b.zip", b"PK", "application/zip"))], {}, 422,
         "send one zip file alone"),
        ([("files", ("x.zip", b"not a zip", "application/zip"))], {}, 422, "x.zip is not a readable zip file"),
        ([("files", ("a.png", png(), "image/png"))], {"caption": " "}, 422, "caption must not be blank"),
    ],
)
def test_bad_multipart_uploads_are_refused(api, dataset_settings, files, form, status, message):
    response = api.post("/datasets/bad", files=files, data=form)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert everything_under(dataset_settings.datasets_dir) == set()


def test_bad_names_and_unknown_datasets(api):
    assert api.post("/datasets/.hidden", files={"files": ("a.png", png(), "image/png")}).status_code == 422
    assert api.get("/datasets/nope").status_code == 404
    assert api.delete("/datasets/nope").json()["detail"] == "no dataset 'nope' in the datasets folder"


def test_datasets_need_an_admin_key_when_keys_are_configured(dataset_settings):
    keyed = dataset_settings.model_copy(update={"api_keys": [SecretStr("user-key-0123456789")],
                                                "admin_keys": [SecretStr("admin-key-0123456789")]})
    user, admin = ({"X-API-Key": "user-key-0123456789"}, {"X-API-Key": "admin-key-0123456789"})
    with TestClient(create_app(keyed, engine=FakeEngine())) as client:
        wait_ready(client)
        data = {"files": ("upload.zip", captioned_zip(), "application/zip")}
        assert client.post("/datasets/shapes", files=data).status_code == 401
        assert client.post("/datasets/shapes", files=data, headers=user).status_code == 403
        assert client.get("/datasets", headers=user).status_code == 403  # names what is on the server
        assert everything_under(keyed.datasets_dir) == set()
        assert client.post("/datasets/shapes", files=data, headers=admin).status_code == 201
        assert client.get("/datasets", headers=admin).json()["datasets"][0]["name"] == "shapes"
        assert client.delete("/datasets/shapes", headers=user).status_code == 403
        assert client.delete("/datasets/shapes", headers=admin).status_code == 200


def test_a_dataset_upload_may_exceed_the_general_body_limit_but_not_its_own(dataset_settings):
    small_bodies = dataset_settings.model_copy(update={"max_body_bytes": 4096, "dataset_max_bytes": 2**21})
    with TestClient(create_app(small_bodies, engine=FakeEngine())) as client:
        wait_ready(client)
        assert upload_zip(client, "shapes", captioned_zip()).status_code == 201  # > 4096 bytes
        huge = client.post("/datasets/huge", files={"files": ("a.zip", b"\0" * (2**21 + 2**20 + 1), "x/zip")})
        assert huge.status_code == 413
        assert client.post("/jobs", content=b"x" * 8192, headers={"Content-Type": "application/json"}
                           ).status_code == 413
    assert everything_under(small_bodies.datasets_dir) == {"shapes", *(f"shapes/{colour}-{shape}.{suffix}"
        for colour in ("red", "green", "blue") for shape in ("square", "circle") for suffix in ("png", "txt"))}


def test_an_uploaded_dataset_is_allowed_whatever_training_dirs_says(dataset_settings, tmp_path):
    elsewhere = dataset_settings.model_copy(update={"training_dirs": [tmp_path / "elsewhere"]})
    with TestClient(create_app(elsewhere, engine=FakeEngine())) as client:
        wait_ready(client)
        assert upload_zip(client, "shapes", captioned_zip()).status_code == 201
        checked = client.app.state.training._checked(LoraOptions(dataset=Path("shapes"), base="demo"))
        assert checked.dataset == (elsewhere.datasets_dir / "shapes").resolve()
        outside = client.post("/train", json={"kind": "lora", "args": {"dataset": str(tmp_path / "x")}})
        assert outside.status_code == 422 and "outside the folders training may use" in outside.json()["detail"]


def test_resume_is_refused_clearly_when_there_is_nothing_to_resume(dataset_settings, monkeypatch):
    # Records of an earlier server: one run cancelled before its first checkpoint, one that succeeded.
    for run_id, state in (("lora-early", "cancelled"), ("lora-done", "succeeded")):
        folder = dataset_settings.output_dir / "training" / run_id
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({
            "id": run_id, "kind": "lora", "state": state, "created_at": time.time(),
            "options": {"dataset": "x", "base": "demo", "output_dir": str(folder), "run_id": run_id}}))
    with TestClient(create_app(dataset_settings, engine=FakeEngine())) as client:
        wait_ready(client)
        assert client.get("/train/lora-early").json()["resumable"] is False
        early = client.post("/train/lora-early/resume")
        assert early.status_code == 409 and "stopped before its first checkpoint" in early.json()["detail"]
        done = client.post("/train/lora-done/resume")
        assert done.status_code == 409 and "is succeeded: only a cancelled" in done.json()["detail"]
        assert client.post("/train/nope/resume").status_code == 404
        owned = client.post("/train", json={"kind": "lora", "args": {
            "dataset": "x", "output_dir": str(dataset_settings.output_dir / "training" / "lora-early"),
            "resume_from_checkpoint": "latest"}})
        assert owned.status_code == 422 and "POST /train/{id}/resume" in owned.json()["detail"]


def wait_for(client: TestClient, run_id: str, condition, timeout_s: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/train/{run_id}").json()
        if condition(run):
            return run
        time.sleep(0.25)
    raise TimeoutError(f"run {run_id}: {run}\n{client.get(f'/train/{run_id}/log').text[-3000:]}")


@pytest.mark.slow
def test_an_uploaded_dataset_trains_stops_and_resumes_through_the_api(api, dataset_settings):
    assert upload_zip(api, "shapes", captioned_zip()).status_code == 201
    # Few steps (the suite's time), checkpoints every 2 so a cancel soon after step 3 has one to resume from.
    args = {"dataset": "shapes", "base": "demo", "resolution": 64, "train_batch_size": 2, "max_train_steps": 60,
            "learning_rate": 1e-2, "unet_target_modules": FAST_TARGETS, "seed": 1, "logging_steps": 1,
            "checkpointing_steps": 2, "validation_prompts": ["a red square"], "validation_steps": 1000,
            "validation_inference_steps": 2, "register": "uploaded-shapes"}
    started = api.post("/train", json={"kind": "lora", "args": args})
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    assert api.delete("/datasets/shapes").status_code == 409  # in use by the run

    running = wait_for(api, run_id, lambda run: (run["progress"] or {}).get("step", 0) >= 3)
    cancelled = api.delete(f"/train/{run_id}").json()
    assert cancelled["state"] == "cancelled" and cancelled["resumable"] is True, cancelled
    stopped_at = api.get(f"/train/{run_id}").json()["progress"]["step"]
    assert running["progress"]["step"] <= stopped_at < 60

    # Its progress lines, as the page reads them, from an offset.
    page = api.get(f"/train/{run_id}/events").json()
    steps = [event for event in page["events"] if event["event"] == "step"]
    assert [event["step"] for event in steps] == list(range(1, stopped_at + 1))
    assert page["state"] == "cancelled"
    assert api.get(f"/train/{run_id}/events", params={"offset": page["offset"]}).json()["events"] == []

    # Resumed: the same run goes on from its checkpoint to the end and registers itself.
    resumed = api.post(f"/train/{run_id}/resume")
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["state"] in ("queued", "running") and resumed.json()["resumes"] == 1
    done = wait_for(api, run_id, lambda run: run["state"] not in ("queued", "running"))
    assert done["state"] == "succeeded", api.get(f"/train/{run_id}/log").text[-3000:]
    assert done["progress"]["step"] == 60 and done["registered_as"] == "uploaded-shapes"
    later = api.get(f"/train/{run_id}/events", params={"offset": page["offset"]}).json()["events"]
    start = next(event for event in later if event["event"] == "start")
    checkpoint = Path(start["resume_from"]).name
    assert checkpoint.startswith("checkpoint-") and int(checkpoint.split("-")[1]) <= stopped_at
    assert next(event for event in later if event["event"] == "step")["step"] == int(checkpoint.split("-")[1]) + 1

    # Its pictures: the final validation image, the loss plot, the grid; nothing else of the folder.
    validation = next(event for event in later if event["event"] == "validation")
    image = api.get(validation["urls"][0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    assert api.get(done["links"]["loss_plot"]).status_code == 200
    assert api.get(done["links"]["validation_grid"]).status_code == 200
    assert api.get(f"/train/{run_id}/files/../../registry.yaml").status_code == 404
    assert api.get(f"/train/{run_id}/files/options.json").status_code == 404
    assert api.delete("/datasets/shapes").status_code == 200  # free again
