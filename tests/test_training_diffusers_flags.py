"""Commands written for diffusers' example scripts (train_text_to_image_lora.py, train_dreambooth_lora.py) run
unchanged: their flag spellings, with their meanings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.registry import Registry
from tests.conftest import ROOT
from tests.training_helpers import instance_images, shapes_dataset
from tests.utils import from_b64, pixels
from training import train_dreambooth_lora
from training.adapters import WEIGHTS_NAME, read_metadata
from training.config import DreamBoothOptions, LoraOptions, parse_options
from training.progress import PROGRESS_FILE, read_progress


def test_every_diffusers_flag_means_what_it_means_there(tmp_path):
    lora = parse_options(LoraOptions, [
        "--pretrained_model_name_or_path=sd15-random", "--train_data_dir=data/naruto", "--output_dir=out/naruto",
        "--max_train_steps=15000", "--train_batch_size=1", "--learning_rate=1e-04", "--rank=8",
        "--resolution=512", "--mixed_precision=fp16", "--gradient_accumulation_steps=4",
        "--checkpointing_steps=500", "--resume_from_checkpoint=latest", "--validation_prompt=cute dragon creature",
        "--num_validation_images=4", "--center_crop", "--random_flip", "--lr_scheduler=cosine",
        "--lr_warmup_steps=10", "--snr_gamma=5.0", "--noise_offset=0.1", "--seed=42", "--validation_epochs=2",
        "--caption_column=text", "--image_column=image", "--dataloader_num_workers=2", "--max_grad_norm=1",
        "--checkpoints_total_limit=3", "--scale_lr", "--train_text_encoder",
    ])
    assert (lora.base, lora.dataset, lora.output_dir) == ("sd15-random", Path("data/naruto"), Path("out/naruto"))
    assert (lora.max_train_steps, lora.train_batch_size, lora.learning_rate, lora.rank) == (15000, 1, 1e-4, 8)
    assert (lora.resolution, lora.mixed_precision, lora.gradient_accumulation_steps) == (512, "fp16", 4)
    assert (lora.checkpointing_steps, lora.resume_from_checkpoint) == (500, "latest")
    assert lora.validation_prompts == ["cute dragon creature"] and lora.num_validation_images == 4
    assert (lora.crop, lora.random_flip, lora.lr_scheduler, lora.lr_warmup_steps) == ("center", True, "cosine", 10)
    assert (lora.snr_gamma, lora.noise_offset, lora.seed, lora.validation_epochs) == (5.0, 0.1, 42, 2)
    assert lora.scale_lr and lora.train_text_encoder and lora.checkpoints_total_limit == 3
    assert parse_options(LoraOptions, ["--train_data_dir=d", "--no-center_crop"]).crop == "random"

    dreambooth = parse_options(DreamBoothOptions, [
        "--pretrained_model_name_or_path=demo", "--instance_data_dir=dog", "--instance_prompt=a photo of sks dog",
        "--class_data_dir=dogs", "--class_prompt=a photo of dog", "--with_prior_preservation",
        "--prior_loss_weight=1.0", "--num_class_images=50", "--sample_batch_size=2", "--train_text_encoder",
        "--output_dir=out/dog", "--push_to_hub",
    ])
    assert (dreambooth.instance_data_dir, dreambooth.class_data_dir) == (Path("dog"), Path("dogs"))
    assert (dreambooth.instance_prompt, dreambooth.class_prompt) == ("a photo of sks dog", "a photo of dog")
    assert dreambooth.with_prior_preservation and dreambooth.num_class_images == 50
    assert dreambooth.sample_batch_size == 2 and dreambooth.train_text_encoder
    # push_to_hub publishes: here that is the registry, under the output folder's name (nothing is uploaded).
    assert dreambooth.register_as == "dog"

    # The same spellings in a config file and in POST /train's args.
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": "demo", "train_data_dir": "d",
                                  "validation_prompt": "a fox", "push_to_hub": True, "hub_model_id": "me/foxes"}))
    from_file = parse_options(LoraOptions, ["--config", str(config)])
    assert (from_file.base, from_file.validation_prompts, from_file.register_as) == ("demo", ["a fox"], "foxes")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--train_data_dir=d", "--center_crop", "--crop=random"], "center_crop=True and crop=random contradict"),
        (["--train_data_dir=d", "--push_to_hub"], "push_to_hub registers the result under hub_model_id or output_dir"),
        (["--train_data_dir=d", "--push_to_hub", "--hub_model_id=a/b", "--register=c"], "would register 'b'"),
        (["--train_data_dir=d", "--use_8bit_adam"], "use_8bit_adam needs the bitsandbytes package"),
    ],
)
def test_contradictions_and_missing_packages_are_named(arguments, message, capsys):
    if "--use_8bit_adam" in arguments:
        pytest.importorskip("pytest")  # always there; the check below needs bitsandbytes to be absent
        if __import__("importlib").util.find_spec("bitsandbytes"):
            pytest.skip("bitsandbytes is installed here")
    with pytest.raises(SystemExit) as exit_info:
        parse_options(LoraOptions, arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_report_to_tensorboard_needs_tensorboard(capsys):
    if __import__("importlib").util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed: test_tensorboard_logs_the_run covers it")
    with pytest.raises(SystemExit):
        parse_options(LoraOptions, ["--train_data_dir=d", "--report_to=tensorboard"])
    assert "report_to=tensorboard needs the tensorboard package (pip install tensorboard)" in capsys.readouterr().err


def test_tensorboard_logs_the_run(settings, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional and not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training import train_lora
    from training.loop import train

    options = LoraOptions(base="demo", dataset=shapes_dataset(tmp_path / "shapes"), output_dir=tmp_path / "run",
                          resolution=64, max_train_steps=3, train_batch_size=4, seed=1, report_to="tensorboard",
                          validation_prompts=["a red square"], validation_inference_steps=2)
    train(options, train_lora.build_data, settings=settings)
    runs = list((tmp_path / "run" / "logs").glob("sdserve-lora*"))
    assert runs, sorted((tmp_path / "run").rglob("*"))
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]
    assert events.Tags()["images"]


def test_a_diffusers_dreambooth_command_trains_and_registers(settings, tmp_path, monkeypatch):
    """train_dreambooth_lora.py's documented shape, run in-process for two steps."""
    for name, value in {"SDSERVE_REGISTRY_PATH": settings.registry_path, "SDSERVE_CACHE_DIR": settings.cache_dir,
                        "SDSERVE_OUTPUT_DIR": settings.output_dir}.items():
        monkeypatch.setenv(name, str(value))
    from models.settings import get_settings

    get_settings.cache_clear()
    # main() installs its Ctrl-C / SIGTERM handlers; pytest's own come back afterwards.
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    output = tmp_path / "sks-ball"
    try:
        code = train_dreambooth_lora.main([
            "--pretrained_model_name_or_path=demo", f"--instance_data_dir={instance_images(tmp_path / 'ball')}",
            f"--output_dir={output}", "--instance_prompt=a photo of sks ball", "--resolution=64",
            "--train_batch_size=1", "--gradient_accumulation_steps=1", "--checkpointing_steps=100",
            "--learning_rate=1e-4", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
            "--validation_prompt=A photo of sks ball in a bucket", "--validation_epochs=50", "--seed=0",
            "--with_prior_preservation", "--class_prompt=a photo of a ball", "--num_class_images=2",
            "--sample_batch_size=2", "--class_generation_steps=2", "--validation_inference_steps=2",
            "--push_to_hub",
        ])
    finally:
        get_settings.cache_clear()
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert code == 0
    assert len(list((output / "class_images").glob("*.png"))) == 2
    entry = Registry(settings.registry_path).get("sks-ball")
    assert entry.kind == "lora" and entry.source == str((output / WEIGHTS_NAME).resolve())
    assert read_metadata(output / WEIGHTS_NAME)["instance_prompt"] == "a photo of sks ball"


@pytest.mark.slow
def test_a_diffusers_text_to_image_command_trains_registers_and_serves(client, settings, tmp_path):
    """The shape of diffusers' documented train_text_to_image_lora.py command, under accelerate launch, on the
    demo model; the running server then serves the result by the name --push_to_hub gave it."""
    dataset = shapes_dataset(tmp_path / "shapes")  # metadata.jsonl with file_name and text, as imagefolder reads
    output = settings.output_dir / "training" / "sd-shapes-model-lora"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=1", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no",
        "training/train_lora.py",
        "--pretrained_model_name_or_path=demo",
        f"--train_data_dir={dataset}", "--caption_column=text", "--image_column=image",
        "--resolution=64", "--center_crop", "--random_flip",
        "--train_batch_size=4",
        "--max_train_steps=6", "--checkpointing_steps=3",
        "--learning_rate=1e-02", "--lr_scheduler=constant", "--lr_warmup_steps=0",
        "--seed=42",
        f"--output_dir={output}",
        "--validation_prompt=a red square", "--num_validation_images=1", "--validation_epochs=1",
        "--resume_from_checkpoint=latest",
        "--push_to_hub", "--hub_model_id=someone/shapes-lora",
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                       SDSERVE_REGISTRY_PATH=str(settings.registry_path), SDSERVE_CACHE_DIR=str(settings.cache_dir),
                       SDSERVE_OUTPUT_DIR=str(settings.output_dir))
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]

    events = read_progress(output / PROGRESS_FILE)
    last = [event for event in events if event["event"] == "step"][-1]
    assert (last["step"], last["max_steps"]) == (6, 6)
    # --validation_epochs 1: 8 images in batches of 4 are two steps an epoch; the last round is the end's.
    assert [event["step"] for event in events if event["event"] == "validation"] == [2, 4, 6]
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (output / "loss.png").is_file() and (output / "validation_grid.png").is_file()

    listed = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert listed["shapes-lora"]["kind"] == "lora" and listed["shapes-lora"]["base"] == "demo"
    request = {"prompt": "a red square", "seed": 7, "steps": 3, "cfg_scale": 7.0, "width": 64, "height": 64}
    plain = client.post("/text2img", json=request)
    served = client.post("/text2img", json={**request, "loras": [{"name": "shapes-lora", "scale": 1.0}]})
    assert plain.status_code == 200 and served.status_code == 200, served.text
    difference = np.abs(pixels(from_b64(served.json()["images"][0])) - pixels(from_b64(plain.json()["images"][0])))
    assert difference.mean() > 1.0, "the LoRA did not change the image"
