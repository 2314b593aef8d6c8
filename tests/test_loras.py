"""LoRA at serving time, on the demo model: layouts and formats, checkpoints, scales, switching without leaks,
read-once caching, the /loras routes, and the safety rules (allowed folders, pickle, broken files)."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from models.registry import Registry, RegistryEntry
from models.registry import builtins as demo
from models.settings import Settings
from models.sources import allowed_roots
from tests.conftest import wait_ready
from tests.lora_factory import (
    kohya_state_dict,
    random_lora,
    save_diffusers,
    save_kohya,
    save_state_dict,
)
from tests.utils import gradient_image, half_mask, to_b64

FAST = {"prompt": "a red fox", "seed": 11, "steps": 2, "width": 64, "height": 64}


@dataclass
class Library:
    """LoRA files on disk. A, B and C are three different random LoRAs for the demo model."""

    root: Path

    def __truediv__(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """Every file the tests use, built once; each test gets its own copy inside its allowed folders."""
    root = tmp_path_factory.mktemp("lora-library")
    model = demo.ensure_builtin("tiny", model_cache)
    a, b, c = (random_lora(model, seed) for seed in (1, 2, 3))
    save_diffusers(a, root / "a")  # a/pytorch_lora_weights.safetensors
    save_diffusers(b, root / "b")
    save_diffusers(c, root / "c")
    save_diffusers(a, root / "a-named", weight_name="my_style.safetensors")
    save_diffusers(a, root / "a-peft", peft_keys=True)
    save_kohya(a, root / "a-kohya.safetensors")
    save_kohya(a, root / "a-kohya-folder" / "style_v1.safetensors")
    save_kohya(a, root / "a-kohya-half-alpha.safetensors", alpha=2)  # rank 4: alpha 2 scales the LoRA by 0.5
    save_diffusers(a, root / "a-pickle", safe=False)  # a-pickle/pytorch_lora_weights.bin
    # Training runs: the highest step holds A, the others B and C (lexical order would pick B).
    save_diffusers(b, root / "run-diffusers" / "checkpoint-500")
    save_diffusers(a, root / "run-diffusers" / "checkpoint-1000")
    save_diffusers(c, root / "run-diffusers" / "checkpoint-200")
    save_kohya(b, root / "run-kohya" / "style-000500.safetensors")
    save_kohya(a, root / "run-kohya" / "style-001000.safetensors")
    save_kohya(c, root / "run-kohya" / "style-000200.safetensors")
    save_diffusers(b, root / "run-steps", weight_name="step_900.safetensors")
    save_diffusers(a, root / "run-steps", weight_name="step_1200.safetensors")
    save_kohya(b, root / "run-kohya-final" / "style-000900.safetensors")
    save_kohya(a, root / "run-kohya-final" / "style.safetensors")  # the finished file of the run
    # Broken and foreign files.
    (root / "corrupt.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all}......")
    save_diffusers(random_lora(model, 4, cross_attention_dim=48), root / "other-architecture")
    good = kohya_state_dict(a)
    unet_only = {key: value for key, value in good.items() if key.startswith("lora_unet_")}
    wrong_text_encoder = {
        key: value.repeat(1, 2) if key.endswith("lora_down.weight") else value
        for key, value in good.items() if key.startswith("lora_te_")
    }
    # The UNet part fits, the text encoder part does not: a half-loaded adapter must not stay behind.
    save_state_dict(unet_only | wrong_text_encoder, root / "half-fits.safetensors")
    save_state_dict({"transformer.blocks.0.attn.to_q.lora_A.weight": a.unet[next(iter(a.unet))]},
                    root / "no-matching-layers.safetensors")
    # Rank 64 (about 1.3 MB each), so that keeping a copy per request would show in the memory test.
    for seed, name in ((5, "big-x"), (6, "big-y"), (7, "big-z")):
        save_diffusers(random_lora(model, seed, rank=64, magnitude=0.1), root / name)
    return root


@pytest.fixture
def loras(library: Path, settings: Settings) -> Library:
    """A copy of the library inside the registry's folder, one of the default allowed folders."""
    target = settings.registry_path.parent / "loras"
    shutil.copytree(library, target)
    return Library(target)


def generate(client: TestClient, loras: list | None = None, task: str = "text2img", **extra) -> dict:
    body = {**FAST, **extra}
    if loras is not None:
        body["loras"] = loras
    if task != "text2img":
        body.setdefault("image", to_b64(gradient_image(64, 64)))
        body.setdefault("strength", 0.9)
    if task == "inpainting":
        body["mask_image"] = to_b64(half_mask(64, 64))
    response = client.post(f"/{task}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def image(client: TestClient, loras: list | None = None, task: str = "text2img", **extra) -> str:
    return generate(client, loras, task, **extra)["images"][0]


def refused(client: TestClient, loras: list, status: int) -> str:
    response = client.post("/text2img", json={**FAST, "loras": loras})
    assert response.status_code == status, response.text
    return response.json()["detail"]


def adapters(client: TestClient) -> list[str]:
    return client.get("/pipeline-state").json()["loaded_adapters"]


def register(client: TestClient, name: str, source: Path, **fields) -> None:
    response = client.post("/models", json={"name": name, "kind": "lora", "source": str(source), **fields})
    assert response.status_code == 201, response.text


class FileReads:
    """Counts reads of LoRA weight files: diffusers reads safetensors through safetensors.torch.load_file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path):
        self.reads: list[str] = []
        original = safetensors.torch.load_file

        def counting(filename, *args, **kwargs):
            if Path(filename).resolve().is_relative_to(folder.resolve()):
                self.reads.append(Path(filename).name)
            return original(filename, *args, **kwargs)

        monkeypatch.setattr(safetensors.torch, "load_file", counting)


# -- layouts and formats ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "folder, file",
    [
        ("a", "pytorch_lora_weights.safetensors"),  # diffusers training output
        ("a-named", "my_style.safetensors"),  # diffusers layout, another file name
        ("a-peft", "pytorch_lora_weights.safetensors"),  # PEFT key names
        ("a-kohya-folder", "style_v1.safetensors"),  # kohya layout
    ],
)
def test_each_layout_loads_by_path_folder_and_registry_name(client, loras, folder, file):
    base = image(client)
    by_file = image(client, [{"name": str(loras / folder / file)}])
    by_folder = image(client, [{"name": str(loras / folder), "weight_name": file}])
    register(client, "my-lora", loras / folder, weight_name=file)
    by_name = image(client, ["my-lora"])
    assert by_file == by_folder == by_name
    assert by_file != base
    # Same weights in every layout: the same image, whatever the key format.
    assert by_file == image(client, [str(loras / "a")])


def test_folder_without_weight_name_finds_the_default_or_lone_file(client, loras):
    assert image(client, [str(loras / "a")]) == image(client, [str(loras / "a-kohya-folder")])


def test_kohya_alpha_is_honoured(client, loras):
    half_by_alpha = image(client, [str(loras / "a-kohya-half-alpha.safetensors")])
    assert half_by_alpha == image(client, [{"name": str(loras / "a-kohya.safetensors"), "scale": 0.5}])
    assert half_by_alpha != image(client, [str(loras / "a-kohya.safetensors")])


@pytest.mark.parametrize("run", ["run-diffusers", "run-kohya", "run-steps", "run-kohya-final"])
def test_folder_of_checkpoints_resolves_to_the_highest_step(client, loras, run):
    reference = image(client, [str(loras / "a")])
    assert image(client, [str(loras / run)]) == reference
    files = [lora["file"] for lora in client.get("/loras").json()["loaded"]["demo"]]
    chosen = {"run-diffusers": "checkpoint-1000", "run-kohya": "style-001000", "run-steps": "step_1200",
              "run-kohya-final": "style.safetensors"}[run]
    assert chosen in files[-1]


def test_pickle_is_refused_unless_allowed(client, loras, settings):
    detail = refused(client, [str(loras / "a-pickle")], 422)
    assert "pickle" in detail and "SDSERVE_ALLOW_PICKLE" in detail
    assert adapters(client) == []
    reference = image(client, [str(loras / "a")])
    with TestClient(create_app(settings.model_copy(update={"allow_pickle": True}))) as trusting:
        wait_ready(trusting)
        assert image(trusting, [str(loras / "a-pickle")]) == reference


def test_hugging_face_repo_id_loads_from_the_local_cache_only(client, loras, tmp_path, monkeypatch):
    hub = tmp_path / "hf-hub"
    repo = hub / "models--someone--fox-style"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    blob = repo / "blobs" / "f00d"
    blob.parent.mkdir()
    shutil.copy(loras / "a" / "pytorch_lora_weights.safetensors", blob)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / "pytorch_lora_weights.safetensors")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert image(client, ["someone/fox-style"]) == image(client, [str(loras / "a")])
    detail = refused(client, ["someone/not-downloaded"], 404)
    assert "hf download someone/not-downloaded" in detail


# -- scales and switching ----------------------------------------------------------------------------------------
def test_two_loras_with_scales_differ_from_each_alone(client, loras):
    both = generate(client, [{"name": str(loras / "a"), "scale": 1.0}, {"name": str(loras / "b"), "scale": 0.5}])
    assert [(lora["adapter_name"], lora["scale"]) for lora in both["parameters"]["loras"]] == [("a", 1.0), ("b", 0.5)]
    a_alone = image(client, [{"name": str(loras / "a"), "scale": 1.0}])
    b_alone = image(client, [{"name": str(loras / "b"), "scale": 0.5}])
    assert len({both["images"][0], a_alone, b_alone, image(client)}) == 4
    # Back to the pair: the same image as the first time, whatever ran in between.
    assert image(client, [{"name": str(loras / "a")}, {"name": str(loras / "b"), "scale": 0.5}]) == both["images"][0]


def test_scale_zero_gives_the_base_image(client, loras):
    register(client, "fox-style", loras / "a", trigger_words=["in fox style"])
    base = image(client)
    assert image(client, [{"name": "fox-style", "scale": 0}]) == base
    assert image(client, [{"name": str(loras / "a"), "scale": 0}, {"name": str(loras / "b"), "scale": 0}]) == base


@pytest.mark.parametrize("task", ["text2img", "img2img", "inpainting"])
def test_base_request_after_lora_requests_gives_the_same_bytes(client, loras, task):
    """The derived img2img and inpainting pipelines share the base's UNet, so LoRAs apply there too."""
    before = image(client, task=task)
    with_lora = image(client, [str(loras / "a")], task=task)
    image(client, [str(loras / "b"), {"name": str(loras / "c"), "scale": 0.7}], task=task)
    assert with_lora != before
    assert image(client, task=task) == before
    assert image(client, [str(loras / "a")], task=task) == with_lora


def test_registry_default_scale_and_trigger_words(client, loras):
    register(client, "fox-style", loras / "a", scale=0.6, trigger_words=["in fox style"])
    used = generate(client, ["fox-style"])
    assert used["parameters"]["loras"] == [
        {"name": "fox-style", "adapter_name": "fox-style", "scale": 0.6, "trigger_words": ["in fox style"]}
    ]
    by_path = image(client, [{"name": str(loras / "a"), "scale": 0.6}], prompt=FAST["prompt"] + ", in fox style")
    assert used["images"][0] == by_path
    overridden = generate(client, [{"name": "fox-style", "scale": 1.0}])
    assert overridden["parameters"]["loras"][0]["scale"] == 1.0
    assert overridden["images"][0] != used["images"][0]


def test_every_record_of_a_lora_request_says_what_ran_and_reposting_it_gives_the_same_bytes(settings, loras):
    """A LoRA registered at scale 0.5 with a trigger word, asked for without a scale: the answer, the saved PNG's
    A1111 text and JSON, and the recorded job (after a restart) all say 0.5 and the prompt with the trigger word,
    and posting the saved request again makes the same pixels."""
    uncached = settings.model_copy(update={"result_cache_size": 0})
    with TestClient(create_app(uncached)) as client:
        wait_ready(client)
        register(client, "fox-style", loras / "a", scale=0.5, trigger_words=["in fox style"])
        live = generate(client, ["fox-style"], save=True)
        used = {"name": "fox-style", "adapter_name": "fox-style", "scale": 0.5, "trigger_words": ["in fox style"]}
        assert live["parameters"]["loras"] == [used]
        client.app.state.engine.recorder.flush()
        listed = client.get("/images").json()["images"][0]
        assert listed["prompt"] == "a red fox, in fox style"
        assert listed["parameters"].startswith("a red fox, in fox style <lora:fox-style:0.5>\n")
        png = Image.open(io.BytesIO(client.get(listed["url"]).content))
        saved_request = json.loads(png.text["sdserve"])["request"]
        assert saved_request["prompt"] == "a red fox, in fox style"
        assert saved_request["loras"] == [{"name": "fox-style", "scale": 0.5}]
        again = client.post("/text2img", json={key: value for key, value in saved_request.items() if key != "task"})
        assert again.status_code == 200, again.text
        assert again.json()["images"] == live["images"]
        assert again.json()["parameters"]["loras"] == [used]
    with TestClient(create_app(uncached)) as restarted:  # only the database remembers the job now
        wait_ready(restarted)
        recorded = restarted.get(f"/jobs/{live['job_id']}").json()["result"]
        assert recorded["images"] == live["images"]
        assert recorded["parameters"] == live["parameters"]


def test_lora_is_read_from_disk_once(client, loras, monkeypatch):
    files = FileReads(monkeypatch, loras.root)
    for _ in range(3):
        image(client, [str(loras / "a")])
        image(client, [str(loras / "a"), {"name": str(loras / "b"), "scale": 0.3}])
        image(client)
    image(client, [str(loras / "a")], task="img2img")
    image(client, [str(loras / "a")], task="inpainting")
    assert sorted(files.reads) == ["pytorch_lora_weights.safetensors"] * 2  # a once, b once
    uses = {lora["adapter_name"]: lora["uses"] for lora in client.get("/loras").json()["loaded"]["demo"]}
    assert uses == {"a": 8, "b": 3}


def test_a_changed_file_is_read_again(client, loras):
    file = loras / "a-kohya.safetensors"
    first = image(client, [str(file)])
    shutil.copy(loras / "run-kohya" / "style-000500.safetensors", file)  # B's weights, same name
    os.utime(file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert image(client, [str(file)]) == image(client, [str(loras / "b")]) != first


def test_least_recently_used_adapter_is_unloaded_past_the_bound(settings, loras, monkeypatch):
    files = FileReads(monkeypatch, loras.root)
    with TestClient(create_app(settings.model_copy(update={"max_loras": 2}))) as client:
        wait_ready(client)
        base = image(client)
        first_a = image(client, [str(loras / "a")])
        image(client, [str(loras / "b")])
        image(client, [str(loras / "c")])
        assert adapters(client) == ["b", "c"]
        assert image(client, [str(loras / "a")]) == first_a  # read again, same result
        assert adapters(client) == ["c", "a"]
        assert len(files.reads) == 4
        assert image(client) == base
        three = [str(loras / "a"), str(loras / "b"), str(loras / "c")]
        assert "only 2 are kept loaded per model (SDSERVE_MAX_LORAS)" in refused(client, three, 422)


def test_loras_per_request_have_a_limit_of_their_own(settings, loras):
    """SDSERVE_MAX_LORAS_PER_REQUEST bounds one request; SDSERVE_MAX_LORAS how many stay loaded."""
    with TestClient(create_app(settings.model_copy(update={"max_loras_per_request": 1}))) as client:
        wait_ready(client)
        message = refused(client, [str(loras / "a"), str(loras / "b")], 422)
        assert "2 LoRAs in one request; at most 1 (SDSERVE_MAX_LORAS_PER_REQUEST)" in message
        assert client.get("/loras").json()["loaded"] == {"demo": []}  # refused before anything was loaded


def test_unloading_the_base_drops_its_adapters(client, loras):
    with_lora = image(client, [str(loras / "a")])
    assert client.app.state.engine.worker.call(lambda cache: cache.evict("demo")).result(timeout=30)
    assert client.get("/loras").json()["loaded"] == {}
    assert image(client, [str(loras / "a")]) == with_lora


@pytest.mark.slow
def test_memory_stays_flat_over_hundreds_of_requests_switching_loras(client, loras):
    three = [str(loras / "big-x"), str(loras / "big-y"), str(loras / "big-z")]

    def cycle(times: int) -> None:
        for index in range(times):
            lora = three[index % 3]
            image(client, [{"name": lora, "scale": 0.5 + index % 2 / 2}], seed=index % 5)
            if index % 7 == 0:
                image(client, seed=index % 5)

    cycle(24)  # warm: every adapter loaded, allocator pools filled
    before = _resident_bytes()
    cycle(180)
    growth = _resident_bytes() - before
    assert adapters(client) == ["big-x", "big-y", "big-z"]
    assert growth < 24 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MB"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- safety and errors -----------------------------------------------------------------------------------------------
def test_paths_outside_the_allowed_folders_are_refused(client, loras, library, settings):
    outside = library / "a" / "pytorch_lora_weights.safetensors"
    os.symlink(outside, loras / "link.safetensors")
    escaping = [
        str(outside),
        str(loras / ".." / ".." / library.name / "a"),
        f"../{library.name}/a",
        str(loras / "link.safetensors"),
        {"name": str(loras / "a"), "weight_name": "../../../etc/passwd"},
        "/etc/passwd",
    ]
    for reference in escaping:
        detail = refused(client, [reference], 403)
        assert "SDSERVE_LORA_ROOTS" in detail
        if reference == str(loras / "link.safetensors"):
            assert str(library) not in detail  # where a link points is not disclosed
    # Registering it through the API is refused; an entry written into the registry file by hand is refused on use.
    sneaky = {"name": "sneaky", "kind": "lora", "source": str(library / "a")}
    assert client.post("/models", json=sneaky).status_code == 403
    Registry(settings.registry_path).register("sneaky", RegistryEntry(kind="lora", source=str(library / "a")))
    refused(client, ["sneaky"], 403)
    assert client.post("/loras", json={"path": str(outside)}).status_code == 403
    assert adapters(client) == []


def test_symlink_that_stays_inside_the_allowed_folders_loads(client, loras):
    os.symlink(loras / "a" / "pytorch_lora_weights.safetensors", loras / "alias.safetensors")
    assert image(client, [str(loras / "alias.safetensors")]) == image(client, [str(loras / "a")])


def test_allowed_folders_default_and_setting(settings, tmp_path):
    roots = allowed_roots(settings)
    assert settings.registry_path.parent.resolve() in roots
    assert settings.output_dir.resolve() in roots
    assert settings.cache_dir.resolve() in roots
    assert len(roots) == 4
    explicit = Settings(registry_path=settings.registry_path, lora_roots=f"{tmp_path / 'x'}{os.pathsep}/srv/loras")
    assert allowed_roots(explicit) == [(tmp_path / "x").resolve(), Path("/srv/loras")]


def test_lora_in_a_training_output_folder_loads(client, loras, settings):
    run = settings.output_dir / "training" / "run-1"
    shutil.copytree(loras / "run-diffusers", run)
    assert image(client, [str(run)]) == image(client, [str(loras / "a")])


@pytest.mark.parametrize(
    "name, status, message",
    [
        ("corrupt.safetensors", 422, "could not be read"),
        ("other-architecture", 422, "another base architecture"),
        ("half-fits.safetensors", 422, "another base architecture"),
        ("no-matching-layers.safetensors", 422, "another base architecture"),
        ("missing.safetensors", 404, "no file or folder"),
        ("missing-folder/", 404, "no file or folder"),
    ],
)
def test_broken_or_foreign_file_changes_nothing(client, loras, name, status, message):
    base = image(client)
    with_a = image(client, [str(loras / "a")])
    assert adapters(client) == ["a"]
    detail = refused(client, [str(loras / name)], status)
    assert message in detail
    assert adapters(client) == ["a"]  # nothing half-loaded stays behind
    assert image(client) == base
    assert image(client, [str(loras / "a")]) == with_a


def test_bad_references_are_clear_4xx(client, loras):
    register(client, "fox-style", loras / "a")
    assert "registered LoRA (fox-style)" in refused(client, ["fox-stlye"], 404)
    assert "not a LoRA" in refused(client, ["demo"], 422)
    assert "listed twice" in refused(client, [str(loras / "a"), str(loras / "a" / "pytorch_lora_weights.safetensors")],
                                      422)
    assert "several weight files" in refused(client, [str(loras.root)], 422)
    response = client.post("/text2img", json={**FAST, "loras": [{"name": "x", "scale": 99}]})
    assert response.status_code == 422 and "scale" in response.json()["detail"]
    response = client.post("/text2img", json={**FAST, "loras": [{"name": "x", "sclae": 1}]})
    assert response.status_code == 422


# -- the /loras routes -----------------------------------------------------------------------------------------------
def test_preload_list_use_and_unload(client, loras, monkeypatch):
    files = FileReads(monkeypatch, loras.root)
    register(client, "fox-style", loras / "b", scale=0.8, trigger_words=["foxy"])
    response = client.post("/loras", json={"path": str(loras / "a"), "adapter_name": "mine", "scale": 0.5})
    assert response.status_code == 200, response.text
    assert response.json()["adapter_name"] == "mine" and response.json()["scale"] == 0.5
    listed = client.get("/loras").json()
    assert [(lora["adapter_name"], lora["scale"], lora["preloaded"]) for lora in listed["loaded"]["demo"]] == [
        ("mine", 0.5, True)
    ]
    assert [(lora["name"], lora["scale"], lora["trigger_words"]) for lora in listed["registered"]] == [
        ("fox-style", 0.8, ["foxy"])
    ]
    used = generate(client, ["mine"])
    assert used["parameters"]["loras"][0]["scale"] == 0.5
    assert used["images"][0] == image(client, [{"name": str(loras / "a"), "scale": 0.5}])
    assert image(client) != used["images"][0]  # preloading does not apply it to requests that do not name it
    assert files.reads == ["pytorch_lora_weights.safetensors"]

    worker = client.app.state.engine.worker
    assert worker.call(lambda cache: cache.preloaded_lora_names("demo")).result(timeout=30) == ["mine"]
    state = client.get("/pipeline-state/").json()
    assert state["base_model"] == "demo" and state["loaded_adapters"] == ["mine"]
    assert state["device"] == "cpu" and state["dtype"] == "float32" and state["scheduler"] == "DDIMScheduler"

    deleted = client.delete("/loras/mine")
    assert deleted.status_code == 200 and deleted.json() == {"unloaded": {"demo": ["mine"]}}
    assert client.get("/loras").json()["loaded"] == {"demo": []}
    assert adapters(client) == []
    assert client.delete("/loras/mine").status_code == 404
    assert client.post("/loras", json={"path": str(loras / "a"), "adapter_name": "bad name"}).status_code == 422


@pytest.mark.parametrize("how", ["query", "json", "form"])
def test_seed_003_load_lora_route(client, loras, how):
    fields = {"lora_path": str(loras / "run-diffusers"), "adapter_name": "seed3", "lora_scale": "0.75"}
    if how == "query":
        response = client.post("/load-lora/", params=fields)
    elif how == "json":
        response = client.post("/load-lora/", json=fields | {"lora_scale": 0.75})
    else:
        response = client.post("/load-lora/", data=fields)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter_name"] == "seed3" and body["scale"] == 0.75 and "checkpoint-1000" in body["file"]
    assert "loaded" in body["message"]
    assert generate(client, ["seed3"])["parameters"]["loras"][0]["scale"] == 0.75
    missing = client.post("/load-lora/", json={"adapter_name": "x"})
    assert missing.status_code == 422 and "lora_path" in missing.json()["detail"]


def test_pipeline_state_lists_derived_pipelines(client, loras):
    image(client, [str(loras / "a")], task="img2img")
    state = client.get("/pipeline-state").json()
    assert state["derived_pipelines"] == ["img2img"]
    assert state["models"][0]["applied_loras"] == [{"adapter_name": "a", "scale": 1.0}]
