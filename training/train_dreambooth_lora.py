"""DreamBooth-LoRA: teach the base one subject from a few images and an instance prompt ("a photo of sks dog").

With --with-prior-preservation the run also trains on class images ("a photo of a dog") so the base keeps its
idea of the class; missing class images are rendered by the base itself, through the server's generation code.

    accelerate launch --config_file accelerate_config.yaml training/train_dreambooth_lora.py \\
        --base demo --instance-data-dir datasets/dog --instance-prompt "a photo of sks dog" \\
        --with-prior-preservation --class-prompt "a photo of a dog" --register sks-dog

Run with --help for every option; the loop both scripts share is training/loop.py. torch and diffusers are
imported only once the options and the images are checked, so --help and mistakes answer at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    # Run as a file (`accelerate launch training/train_dreambooth_lora.py`): import the project, not this folder.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from training.config import DreamBoothOptions, parse_options
from training.dataset_files import DatasetError, Example, find_images

if TYPE_CHECKING:
    from training.loop import RunContext, TrainingData

logger = logging.getLogger(__name__)

CLASS_IMAGE_GUIDANCE = 7.5


def find_instances(options: DreamBoothOptions) -> list[Example]:
    images = find_images(options.instance_data_dir, "instance_data_dir")
    if not images:
        raise DatasetError(f"instance_data_dir {options.instance_data_dir} has no images")
    return [Example(image=path, caption=options.instance_prompt) for path in images]


def build_data(context: RunContext) -> TrainingData:
    from training.data import ImageCaptionDataset, PairedDataset
    from training.loop import TrainingData

    options = context.options
    assert isinstance(options, DreamBoothOptions)
    instances = find_instances(options)
    metadata = {"instance_prompt": options.instance_prompt}
    trigger_words = options.trigger_words or [options.instance_prompt]
    dataset = ImageCaptionDataset(instances, context.resolution, options.crop, options.random_flip, context.seed)
    if not options.with_prior_preservation:
        return TrainingData(dataset=dataset, examples=instances, trigger_words=trigger_words, metadata=metadata)

    assert options.class_prompt is not None  # checked by DreamBoothOptions
    class_dir = options.class_data_dir or context.output_dir / "class_images"
    ensure_class_images(context, class_dir)
    classes = [Example(image=path, caption=options.class_prompt, prior=True)
               for path in find_images(class_dir, "class_data_dir")[: options.num_class_images]]
    class_dataset = ImageCaptionDataset(classes, context.resolution, options.crop, options.random_flip, context.seed)
    metadata |= {"class_prompt": options.class_prompt, "prior_loss_weight": str(options.prior_loss_weight)}
    return TrainingData(dataset=PairedDataset(dataset, class_dataset), examples=instances + classes,
                        trigger_words=trigger_words, metadata=metadata, prior_loss_weight=options.prior_loss_weight)


def ensure_class_images(context: RunContext, class_dir: Path) -> None:
    """Render the class images that are missing with the base (main process), before any LoRA layer exists."""
    options = context.options
    assert isinstance(options, DreamBoothOptions) and options.class_prompt is not None
    if context.accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
        have = len(find_images(class_dir))
        missing = options.num_class_images - have
        if missing > 0:
            logger.info("rendering %d class images of %r into %s", missing, options.class_prompt, class_dir)
            context.report("class_images", have=have, rendering=missing, folder=str(class_dir))
        index = have
        while index < options.num_class_images:
            count = min(options.sample_batch_size, options.num_class_images - index)
            rendered = context.render(options.class_prompt, context.seed + index, context.resolution,
                                      options.class_generation_steps, CLASS_IMAGE_GUIDANCE, count)
            for image in rendered:
                image.save(_free_name(class_dir, index))
                index += 1
    context.accelerator.wait_for_everyone()


def _free_name(folder: Path, index: int) -> Path:
    path = folder / f"class-{index:05d}.png"
    while path.exists():
        index += 100_000
        path = folder / f"class-{index:05d}.png"
    return path


def main(argv: list[str] | None = None) -> int:
    options = parse_options(DreamBoothOptions, argv, check=find_instances)
    from training.loop import run

    return run(options, build_data)


if __name__ == "__main__":
    sys.exit(main())
