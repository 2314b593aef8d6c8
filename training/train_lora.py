"""Text-to-image LoRA from captioned images.

    accelerate launch --config_file accelerate_config.yaml training/train_lora.py \\
        --base demo --dataset datasets/shapes --max-train-steps 200 --register shapes-lora
    python -m training.train_lora --config my_run.yaml

Run with --help for every option; the loop both scripts share is training/loop.py. torch and diffusers are
imported only once the options and the dataset are checked, so --help and mistakes answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    # Run as a file (`accelerate launch training/train_lora.py`): import the project, not this folder's modules.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from training.config import LoraOptions, parse_options
from training.dataset_files import Example, find_captioned_images

if TYPE_CHECKING:
    from training.loop import RunContext, TrainingData


def find_examples(options: LoraOptions) -> list[Example]:
    return find_captioned_images(options.dataset, options.image_column, options.caption_column,
                                 options.caption_extension)


def build_data(context: RunContext) -> TrainingData:
    from training.data import ImageCaptionDataset
    from training.loop import TrainingData

    options = context.options
    assert isinstance(options, LoraOptions)
    examples = find_examples(options)
    dataset = ImageCaptionDataset(examples, context.resolution, options.crop, options.random_flip, context.seed)
    return TrainingData(dataset=dataset, examples=examples, trigger_words=options.trigger_words,
                        metadata={"dataset": str(options.dataset)})


def main(argv: list[str] | None = None) -> int:
    options = parse_options(LoraOptions, argv, check=find_examples)
    from training.loop import run

    return run(options, build_data)


if __name__ == "__main__":
    sys.exit(main())
