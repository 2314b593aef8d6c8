"""Full text-to-image training: every weight of the UNet and text encoder learns, from a base or from scratch.

The default `shapes` model is made by this script (the exact command is in models/weights/shapes-v2.manifest.json):

    OMP_NUM_THREADS=1 accelerate launch --cpu --num_processes 1 training/train_text_to_image.py \\
        --from-scratch shapes-tiny --shapes-dataset 200000 --seed 0 --train-vae-decoder ...

Or fine-tune all weights of a registered base on captioned images (the same layouts as train_lora.py):

    accelerate launch training/train_text_to_image.py --base demo --dataset datasets/shapes --register my-model

Run with --help for every option; the loop every script shares is training/loop.py. torch and diffusers are
imported only once the options and the dataset are checked, so --help and mistakes answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    # Run as a file (`accelerate launch training/train_text_to_image.py`): import the project, not this folder.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from training.config import TextToImageOptions, parse_options
from training.dataset_files import Example, find_captioned_images

if TYPE_CHECKING:
    from training.loop import RunContext, TrainingData


def check_dataset(options: TextToImageOptions) -> list[Example]:
    if options.dataset is None:
        return []
    return find_captioned_images(options.dataset, options.image_column, options.caption_column,
                                 options.caption_extension)


def build_data(context: RunContext) -> TrainingData:
    from training.data import ImageCaptionDataset
    from training.loop import TrainingData
    from training.shapes_data import GENERATOR_VERSION, ShapesDataset

    options = context.options
    assert isinstance(options, TextToImageOptions)
    if options.shapes_dataset is not None:
        dataset = ShapesDataset(options.shapes_dataset, context.seed, context.resolution, options.caption_dropout)
        metadata = {"dataset": "shapes", "shapes_generator_version": str(GENERATOR_VERSION),
                    "num_examples": str(options.shapes_dataset)}
        return TrainingData(dataset=dataset, examples=[], trigger_words=options.trigger_words, metadata=metadata)
    examples = check_dataset(options)
    dataset = ImageCaptionDataset(examples, context.resolution, options.crop, options.random_flip, context.seed,
                                  caption_dropout=options.caption_dropout)
    return TrainingData(dataset=dataset, examples=examples, trigger_words=options.trigger_words,
                        metadata={"dataset": str(options.dataset)})


def main(argv: list[str] | None = None) -> int:
    options = parse_options(TextToImageOptions, argv, check=check_dataset)
    from training.loop import run

    return run(options, build_data)


if __name__ == "__main__":
    sys.exit(main())
