"""Text-to-image LoRA from captioned images.

    accelerate launch --config_file accelerate_config.yaml training/train_lora.py \\
        --base demo --dataset datasets/shapes --max-train-steps 200 --register shapes-lora
    python -m training.train_lora --config my_run.yaml

Run with --help for every option; the shared loop is in training/loop.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch training/train_lora.py`): import the project, not this folder's modules.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from training.config import LoraOptions
from training.data import ImageCaptionDataset, find_captioned_images
from training.loop import RunContext, TrainingData, main


def build_data(context: RunContext) -> TrainingData:
    options = context.options
    assert isinstance(options, LoraOptions)
    examples = find_captioned_images(options.dataset, options.image_column, options.caption_column,
                                     options.caption_extension)
    dataset = ImageCaptionDataset(examples, context.resolution, options.crop, options.random_flip, context.seed)
    return TrainingData(dataset=dataset, examples=examples, trigger_words=options.trigger_words,
                        metadata={"dataset": str(options.dataset)})


if __name__ == "__main__":
    sys.exit(main(LoraOptions, build_data))
