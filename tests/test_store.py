"""The jobs database (SQLAlchemy + Alembic), PNG metadata, and the job event history; no model needed."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from PIL import Image
from sqlalchemy import inspect

from models.engine.worker import Job
from models.errors import ImageNotFound
from models.jobs.image_files import a1111_parameters, read_metadata, save_png, sdserve_metadata
from models.jobs.records import image_path
from models.jobs.store import MIGRATIONS_DIR, Base, ImageRecord, Store, StoreUnavailable
from models.types import ActiveLora, GenerationRequest, GenerationResult, JobOptions, JobStatus


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'sdserve.db'}"


def job_values(job_id: str, status: str = "queued", prompt: str = "a red fox", **extra) -> dict:
    values = dict(
        id=job_id, task="text2img", status=status, prompt=prompt, model="demo", loras=[], parameters={"steps": 4},
        steps=4, output_format="png", created_at=datetime.now(timezone.utc),
    )
    return values | extra


def image_values(image_id: str, job_id: str, prompt: str, model: str = "demo", path: str = "images/x.png") -> dict:
    return dict(
        id=image_id, job_id=job_id, index=0, seed=1, width=64, height=64, model=model, prompt=prompt,
        path=path, sha256="0" * 64, size_bytes=1, parameters_text="x", created_at=datetime.now(timezone.utc),
    )


def test_store_creates_the_database_at_the_latest_migration(tmp_path):
    store = Store(sqlite_url(tmp_path))
    assert (tmp_path / "data" / "sdserve.db").is_file()
    assert {"jobs", "images", "alembic_version"} <= set(inspect(store.engine).get_table_names())
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert current == ScriptDirectory.from_config(config).get_current_head()
    with store.engine.connect() as connection:  # the models and the migrations describe the same schema
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.close()
    Store(sqlite_url(tmp_path)).close()  # opening again upgrades nothing and loses nothing


def test_jobs_survive_reopening_and_unfinished_ones_become_interrupted(tmp_path):
    store = Store(sqlite_url(tmp_path))
    store.save_job(job_values("a" * 32, status="succeeded", seeds=[5], timings={"inference_s": 1.5}))
    store.save_job(job_values("b" * 32, status="queued"))
    store.save_job(job_values("c" * 32, status="queued"))
    store.save_job({"id": "c" * 32, "status": "running", "step": 3})
    store.close()

    reopened = Store(sqlite_url(tmp_path))
    assert reopened.mark_interrupted("the server stopped") == 2
    done = reopened.get_job("a" * 32)
    assert done.status == "succeeded" and done.seeds == [5] and done.timings == {"inference_s": 1.5}
    assert done.created_at.tzinfo is not None
    for job_id in ("b" * 32, "c" * 32):
        record = reopened.get_job(job_id)
        assert record.status == "interrupted" and record.error == "the server stopped"
        assert record.finished_at is not None
    assert reopened.get_job("c" * 32).step == 3
    assert reopened.mark_interrupted("again") == 0


def test_in_memory_database_is_shared_across_threads():
    store = Store("sqlite://")
    writer = threading.Thread(target=store.save_job, args=(job_values("d" * 32),))
    writer.start()
    writer.join()
    assert store.get_job("d" * 32).prompt == "a red fox"


def test_an_unreachable_database_stops_the_start_with_its_url_and_setting(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreUnavailable, match=r"cannot open the jobs database sqlite:///.*SDSERVE_DATABASE_URL"):
        Store(f"sqlite:///{tmp_path / 'file' / 'sdserve.db'}")


def test_image_filters_escape_wildcards_and_page(tmp_path):
    store = Store(sqlite_url(tmp_path))
    store.save_job(job_values("a" * 32, status="succeeded"))
    prompts = ["a red fox", "100% cotton shirt", "a fox in the snow", "a cat"]
    store.add_images([ImageRecord(**image_values(f"{index:032x}", "a" * 32, prompt)) for index, prompt in
                      enumerate(prompts)])
    store.add_images([ImageRecord(**image_values("f" * 32, "a" * 32, "a FOX", model="other"))])

    foxes, total = store.list_images(10, 0, prompt="fox")
    assert total == 3 and {image.prompt for image in foxes} == {"a red fox", "a fox in the snow", "a FOX"}
    literal, total = store.list_images(10, 0, prompt="0%")
    assert total == 1 and literal[0].prompt == "100% cotton shirt"
    assert store.list_images(10, 0, prompt="_")[1] == 0
    assert store.list_images(10, 0, model="other")[1] == 1
    page, total = store.list_images(2, 2)
    assert total == 5 and len(page) == 2


def test_image_path_never_leaves_the_output_folder(tmp_path):
    output = tmp_path / "outputs"
    (output / "images").mkdir(parents=True)
    (output / "images" / "ok.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("no")
    record = ImageRecord(**image_values("1" * 32, "a" * 32, "x", path="images/ok.png"))
    assert image_path(output, record) == (output / "images" / "ok.png").resolve()
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "images/missing.png"):
        record.path = bad
        with pytest.raises(ImageNotFound):
            image_path(output, record)


def test_png_carries_a1111_parameters_and_a_reproducible_request(tmp_path):
    request = GenerationRequest(task="img2img", prompt="a fox", negative_prompt="blurry", steps=20, seed=41,
                                guidance_scale=6.5, image=Image.new("RGB", (64, 64), "red"), scheduler="euler_a")
    image = Image.new("RGB", (64, 64), "blue")
    lora = ActiveLora("style", "style", 0.8, ("pastel",), sha256="ab" * 32)
    result = GenerationResult(images=[image, image], seeds=[41, 42], model="demo", prompt="a fox, pastel",
                              negative_prompt="blurry", width=64, height=64, steps=20, guidance_scale=6.5,
                              strength=0.6, scheduler="euler_a", scheduler_name="euler_a", loras=(lora,),
                              model_sha256="cd" * 32)
    parameters = a1111_parameters(result, 1)
    assert parameters.splitlines() == [
        "a fox, pastel <lora:style:0.8>",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: euler_a, CFG scale: 6.5, Seed: 42, Size: 64x64, Model hash: cdcdcdcdcd, Model: demo, "
        'Denoising strength: 0.6, Lora hashes: "style: abababababab", Version: sdserve',
    ]
    metadata = sdserve_metadata(request, result, 1, "j" * 32)
    saved = save_png(image, tmp_path / "images" / "x.png", parameters, metadata)
    assert saved.path.is_file() and len(saved.sha256) == 64
    text, data = read_metadata(saved.path)
    assert text == parameters
    assert data["request"] == {
        "task": "img2img", "prompt": "a fox, pastel", "negative_prompt": "blurry", "model": "demo", "width": 64,
        "height": 64, "steps": 20, "cfg_scale": 6.5, "seed": 42, "number_of_images": 1, "scheduler": "euler_a",
        "strength": 0.6, "loras": [{"name": "style", "scale": 0.8}],
    }
    assert len(data["image_digest"]) == 64
    assert not list((tmp_path / "images").glob(".saving-*"))  # the temporary file was renamed, not left behind


# -- job events ---------------------------------------------------------------------------------------------------
def make_job() -> Job:
    return Job(request=GenerationRequest(task="text2img", prompt="x", seed=1), options=JobOptions(),
               seed_origin="client", model="demo")


def test_job_events_replay_current_state_to_late_subscribers():
    job = make_job()
    assert job.subscribe(lambda event: None) == []
    job.emit("queued", position=2)
    job.emit("queued", position=1)
    late = job.subscribe(lambda event: None)
    assert [(event.kind, event.position) for event in late] == [("queued", 1)]

    job.status = JobStatus.running
    job.emit("started")
    job.emit("progress", step=1, total_steps=4)
    job.emit("progress", step=2, total_steps=4)
    running = job.subscribe(lambda event: None)
    assert [event.kind for event in running] == ["started", "progress"]
    assert (running[1].status, running[1].step, running[1].total_steps) == (JobStatus.running, 2, 4)

    job.status = JobStatus.cancelled
    job.emit("cancelled", detail="cancelled")
    assert job.emit("progress", step=3, total_steps=4) is None  # nothing follows the end
    finished = job.subscribe(lambda event: None)
    assert [(event.kind, event.status) for event in finished] == [("cancelled", JobStatus.cancelled)]
    assert [event.seq for event in late + running + finished] == [2, 3, 5, 6]


def test_job_listeners_see_every_event_once_in_order_across_threads():
    job = make_job()
    seen: list[int] = []
    job.subscribe(lambda event: seen.append(event.seq))
    job.subscribe(lambda event: 1 / 0)  # a broken listener is logged, never stops the others
    threads = [threading.Thread(target=lambda: [job.emit("progress", step=1) for _ in range(200)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == list(range(1, 801))


def test_unsubscribed_listener_hears_nothing_more():
    job = make_job()
    heard: list[str] = []

    def listener(event):
        heard.append(event.kind)

    job.subscribe(listener)
    job.emit("queued", position=1)
    job.unsubscribe(listener)
    job.emit("started")
    assert heard == ["queued"] and not job.watched
