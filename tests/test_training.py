"""The training scripts on the demo model, on CPU: loss, weights format, resume, DreamBooth, options, datasets."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from models.registry import Registry
from models.registry import builtins as demo
from tests.training_helpers import fast_options, instance_images, shapes_dataset
from training import train_dreambooth_lora, train_lora
from training.adapters import WEIGHTS_NAME, read_metadata
from training.config import DreamBoothOptions, LoraOptions, parse_options
from training.dataset_files import DatasetError, file_sha256, find_captioned_images
from training.loop import TrainingStopped, list_checkpoints, train
from training.progress import PROGRESS_FILE, read_progress


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, above all on a shared CPU where spare threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_pipeline(settings) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(demo.ensure_builtin("tiny", settings.cache_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipeline: StableDiffusionPipeline, prompt: str, seed: int, steps: int) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipeline(prompt, num_inference_steps=steps, guidance_scale=7.0, width=64, height=64,
                     generator=generator).images[0]
    return np.asarray(image, dtype=np.float64)


def test_lora_lowers_loss_and_writes_weights_diffusers_loads(settings, tmp_path, capsys):
    dataset = shapes_dataset(tmp_path / "shapes")
    options = LoraOptions(**fast_options(
        dataset=dataset, output_dir=tmp_path / "run", max_train_steps=40, lora_alpha=8, checkpointing_steps=20,
        validation_prompts=["a red square"], validation_steps=20, register="shapes-lora", trigger_words=["shapes"],
    ))
    result = train(options, train_lora.build_data, settings=settings)

    assert result.steps == 40
    first, last = statistics.mean(result.losses[:8]), statistics.mean(result.losses[-8:])
    assert last < first * 0.9, (first, last)

    weights = tmp_path / "run" / WEIGHTS_NAME
    metadata = read_metadata(weights)
    assert metadata["base_model"] == "demo" and len(metadata["base_sha256"]) == 64
    assert (metadata["rank"], metadata["alpha"], metadata["steps"]) == ("4", "8.0", "40")
    assert json.loads(metadata["unet_target_modules"]) == options.unet_target_modules
    assert json.loads(metadata["trigger_words"]) == ["shapes"]
    assert len(metadata["dataset_sha256"]) == 64 and metadata["num_examples"] == "8"
    assert all(key.startswith("unet.") for key in load_file(weights))
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["checkpoint-20", "checkpoint-40"]
    assert sorted(path.name for path in (tmp_path / "run" / "validation").iterdir()) == [
        "step-000020-prompt-0-0.png", "step-000040-prompt-0-0.png"]

    steps = [event for event in read_progress(tmp_path / "run" / PROGRESS_FILE) if event["event"] == "step"]
    assert [event["step"] for event in steps] == list(range(1, 41))
    assert {"loss", "lr", "steps_per_s"} <= set(steps[0])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["step"] for line in printed if line["event"] == "step"] == list(range(1, 41))
    assert printed[-1]["event"] == "done" and printed[-1]["registered"] == "shapes-lora"

    entry = Registry(settings.registry_path).get("shapes-lora")
    assert (entry.kind, entry.base, entry.created_by) == ("lora", "demo", result.run_id)
    assert entry.source == str(weights.resolve()) and entry.sha256 == file_sha256(weights)
    assert entry.trigger_words == ["shapes"]

    # Plain diffusers, no sdserve code: the file loads, changes what the model draws, and draws what the trained
    # model drew for the last validation image (same prompt, seed, size and steps).
    pipeline = demo_pipeline(settings)
    before = render(pipeline, "a red square", seed=7, steps=3)
    pipeline.load_lora_weights(str(weights.parent), weight_name=WEIGHTS_NAME)
    after = render(pipeline, "a red square", seed=7, steps=3)
    assert np.abs(after - before).mean() > 2.0
    validation = np.asarray(Image.open(tmp_path / "run" / "validation" / "step-000040-prompt-0-0.png"), np.float64)
    assert np.abs(after - validation).mean() < 0.5


def test_stopped_and_resumed_run_ends_with_the_same_weights(settings, tmp_path):
    """Random crops and flips, accumulation, warmup + cosine: the resumed run must still match to the bit."""
    dataset = shapes_dataset(tmp_path / "shapes")
    common = fast_options(
        dataset=dataset, max_train_steps=8, train_batch_size=2, gradient_accumulation_steps=2, crop="random",
        random_flip=True, lr_scheduler="cosine", lr_warmup_steps=2, checkpointing_steps=2, checkpoints_total_limit=2,
        train_text_encoder=True, noise_offset=0.05, snr_gamma=5.0,
    )
    straight = train(LoraOptions(output_dir=tmp_path / "straight", **common), train_lora.build_data, settings=settings)

    stopped_dir = tmp_path / "stopped"
    with pytest.raises(TrainingStopped) as stopped:
        train(LoraOptions(output_dir=stopped_dir, **common), train_lora.build_data, settings=settings,
              should_stop=lambda step: step == 3)  # mid-epoch (2 steps per epoch), between two checkpoints
    assert stopped.value.step == 3
    assert [path.name for path in list_checkpoints(stopped_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert not (stopped_dir / WEIGHTS_NAME).exists()

    resumed = train(LoraOptions(output_dir=stopped_dir, resume_from_checkpoint="latest", **common),
                    train_lora.build_data, settings=settings)
    assert resumed.steps == 8
    starts = [event for event in read_progress(stopped_dir / PROGRESS_FILE) if event["event"] == "start"]
    assert starts[1]["resume_from"].endswith("checkpoint-3") and starts[0]["run_id"] == resumed.run_id
    assert resumed.losses == straight.losses[3:]
    expected, actual = load_file(straight.weights), load_file(resumed.weights)
    assert expected.keys() == actual.keys() and any(key.startswith("text_encoder.") for key in actual)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    # The limit keeps the two newest checkpoints.
    assert [path.name for path in list_checkpoints(stopped_dir)] == ["checkpoint-6", "checkpoint-8"]


def test_dreambooth_with_prior_preservation_renders_class_images_and_trains(settings, tmp_path):
    options = DreamBoothOptions(**fast_options(
        instance_data_dir=instance_images(tmp_path / "subject"), instance_prompt="a photo of sks ball",
        with_prior_preservation=True, class_prompt="a photo of a ball", num_class_images=5,
        class_generation_steps=2, prior_loss_weight=0.5, output_dir=tmp_path / "run", max_train_steps=6,
        train_batch_size=2, checkpointing_steps=3, mixed_precision="bf16", gradient_checkpointing=True,
        cache_latents=True, random_flip=True,
    ))
    result = train(options, train_dreambooth_lora.build_data, settings=settings)

    class_images = sorted((tmp_path / "run" / "class_images").glob("*.png"))
    assert len(class_images) == 5
    assert result.steps == 6 and all(np.isfinite(result.losses))
    metadata = read_metadata(result.weights)
    assert metadata["instance_prompt"] == "a photo of sks ball"
    assert metadata["class_prompt"] == "a photo of a ball"
    assert metadata["num_examples"] == "8"  # 3 instance + 5 class images
    assert json.loads(metadata["trigger_words"]) == ["a photo of sks ball"]

    # Enough class images now: a second run renders none.
    stamps = [path.stat().st_mtime_ns for path in class_images]
    again = options.model_copy(update={"output_dir": tmp_path / "again", "class_data_dir": tmp_path / "run" /
                                       "class_images", "max_train_steps": 1})
    train(again, train_dreambooth_lora.build_data, settings=settings)
    assert [path.stat().st_mtime_ns for path in sorted(class_images)] == stamps
    events = [event["event"] for event in read_progress(tmp_path / "again" / PROGRESS_FILE)]
    assert "class_images" not in events


# -- options -------------------------------------------------------------------------------------------------------
def test_flags_override_a_toml_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('dataset = "shapes"\nmax-train-steps = 50\nseed = 1\nregister = "from-file"\n')
    options = parse_options(LoraOptions, ["--config", str(config), "--max-train-steps", "3", "--no-random-flip"])
    assert (options.max_train_steps, options.seed, options.register_as) == (3, 1, "from-file")
    assert options.dataset == Path("shapes") and options.random_flip is False


def test_flags_override_a_yaml_file_and_accept_both_spellings(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: data/shapes\nrank: 8\nmax-train-steps: 100\nvalidation_prompts: [a, b]\n")
    options = parse_options(LoraOptions, ["--config", str(config), "--rank", "16", "--learning_rate=3e-4",
                                          "--train-text-encoder", "--register", "mine"])
    assert (options.rank, options.max_train_steps, options.learning_rate) == (16, 100, 3e-4)
    assert options.validation_prompts == ["a", "b"] and options.train_text_encoder
    assert options.register_as == "mine" and options.alpha == 16.0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dataset", "d", "--rank", "0"], "rank: Input should be greater than or equal to 1"),
        (["--dataset", "d", "--resolution", "100"], "resolution: Input should be a multiple of 8"),
        (["--dataset", "d", "--cache-latents", "--crop", "random"], "cannot be combined with crop=random"),
        (["--rank", "4"], "dataset: is required"),
        (["--dataset", "d", "--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
    ],
)
def test_bad_options_exit_with_a_message(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_options(LoraOptions, arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('instance_data_dir = "x"\ninstance_prompt = "sks"\nlearning_rat = 1e-4\n')
    with pytest.raises(SystemExit):
        parse_options(DreamBoothOptions, ["--config", str(config)])
    assert "learning_rat: is not an option of this script" in capsys.readouterr().err


def test_prior_preservation_needs_a_class_prompt():
    with pytest.raises(ValueError, match="needs class_prompt"):
        DreamBoothOptions(instance_data_dir="x", instance_prompt="sks", with_prior_preservation=True)


# -- datasets ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["metadata", "captions", "csv"])
def test_all_three_dataset_layouts_give_the_same_examples(tmp_path, layout):
    examples = find_captioned_images(shapes_dataset(tmp_path / layout, layout))
    assert sorted((example.image.name, example.caption) for example in examples)[:2] == [
        ("blue-circle.png", "a blue circle"), ("blue-square.png", "a blue square")]
    assert len(examples) == 8


def test_dataset_problems_are_named(tmp_path):
    folder = shapes_dataset(tmp_path / "shapes", "captions")
    (folder / "red-circle.txt").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no .txt caption \(red-circle.png\)"):
        find_captioned_images(folder)
    with pytest.raises(DatasetError, match="does not exist"):
        find_captioned_images(tmp_path / "nowhere")
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "metadata.jsonl").write_text('{"file_name": "../shapes/red-square.png", "text": "x"}\n')
    with pytest.raises(DatasetError, match="line 1: ../shapes/red-square.png points outside the dataset folder"):
        find_captioned_images(escaping)


def test_a_missing_dataset_stops_the_script_before_anything_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_lora.main(["--dataset", str(tmp_path / "nowhere"), "--base", "not-even-checked"])
    assert exit_info.value.code == 2
    assert f"dataset {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_dreambooth_lora.main(["--instance-data-dir", str(tmp_path), "--instance-prompt", "sks"])
    assert f"instance_data_dir {tmp_path} has no images" in capsys.readouterr().err
