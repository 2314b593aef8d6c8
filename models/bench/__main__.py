"""Every comparison of issue 15 in one run; writes bench.md (a Markdown table) and bench.json into --out.

    python -m models.bench                                    # the full run (about 13 minutes on 2 CPU cores)
    python -m models.bench --rows server fast-path --repeats 3
    python -m models.bench --tiny --out /tmp/bench             # seconds: what CI runs to keep the command working
    python -m models.bench --device cuda --sd15-steps 20 --sd15-repeats 5

Rows: server (server vs bare pipe()), per-request (seed 000's pipeline per request vs the server), concurrency
(1/4/16 clients, with micro-batching when the server has it), lora (switching and resident memory over 300 requests),
models (switching between two cached bases), cold-start, fast-path (OpenVINO UNet + VAE decoder vs eager), torch-options
(channels_last, one thread, torch.compile vs eager; not in the default set), training (steps/s and peak memory
with and without latent caching and gradient checkpointing; with --diffusers-script PATH, diffusers' own
train_text_to_image_lora.py beside them), profile (py-spy samples of the server answering requests; needs py-spy on
PATH or --py-spy; not in the default set), replicas (Ray Serve with 2 engine replicas vs 1; needs the ray extra; not
in the default set).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from models.bench import profile as profiling
from models.bench import replicas, report, rows, training_rows
from models.bench.stats import Comparison, Skipped

logger = logging.getLogger("models.bench")

ROWS: dict[str, Callable[[rows.Context], list[rows.Row]]] = {
    "server": rows.server_vs_bare,
    "per-request": rows.per_request_pipeline,
    "concurrency": rows.concurrency,
    "lora": rows.lora_switching,
    "models": rows.model_switching,
    "cold-start": rows.cold_start,
    "fast-path": rows.fast_path,
    "torch-options": rows.torch_options,
    "replicas": replicas.replicas,
}
DEFAULT_ROWS = ["server", "per-request", "concurrency", "lora", "models", "cold-start", "fast-path", "training"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=[*ROWS, "training", "profile"], default=DEFAULT_ROWS)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where bench.md and bench.json go")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/sdserve"),
                        help="builtin models and OpenVINO exports, kept between runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="the smallest sizes: checks the command, measures little")
    parser.add_argument("--repeats", type=int, help="alternating rounds per row (default 5)")
    parser.add_argument("--demo-size", type=int)
    parser.add_argument("--demo-steps", type=int)
    parser.add_argument("--sd15-size", type=int)
    parser.add_argument("--sd15-steps", type=int)
    parser.add_argument("--sd15-repeats", type=int)
    parser.add_argument("--fast-models", nargs="+", choices=list(rows.BUILTINS))
    parser.add_argument("--clients", type=int, nargs="+")
    parser.add_argument("--batch-window-ms", type=int, help="micro-batching window for the 'on' rows (default 20)")
    parser.add_argument("--lora-requests", type=int, help="requests per side of the LoRA row (default 300)")
    parser.add_argument("--switch-requests", type=int)
    parser.add_argument("--cold-starts", type=int)
    parser.add_argument("--train-models", nargs="+", default=None, choices=list(rows.BUILTINS))
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--train-resolution", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--diffusers-script", type=Path, default=None,
                        help="a copy of diffusers' examples/text_to_image/train_text_to_image_lora.py, run beside the "
                             "training rows on the same data and settings (needs torchvision and datasets)")
    parser.add_argument("--py-spy", help="the py-spy executable for the profile row (default: py-spy on PATH)")
    parser.add_argument("--profile-requests", type=int, default=10)
    return parser.parse_args(argv)


def config_from(arguments: argparse.Namespace, work: Path) -> rows.Config:
    config = rows.Config(out=arguments.out, work=work, cache_dir=arguments.cache_dir.resolve(),
                         device=arguments.device)
    if arguments.tiny:
        config.repeats, config.demo_size, config.demo_steps = 2, 64, 2
        config.concurrency_steps = 2
        config.fast_models, config.clients, config.concurrency_rounds = ["demo"], [1, 2], 1
        config.lora_requests, config.switch_requests, config.cold_starts, config.block = 4, 4, 1, 2
        config.small_steps = 2
    for name in ("repeats", "demo_size", "demo_steps", "sd15_size", "sd15_steps", "sd15_repeats", "fast_models",
                 "clients", "batch_window_ms", "lora_requests", "switch_requests", "cold_starts"):
        value = getattr(arguments, name)
        if value is not None:
            setattr(config, name, value)
    return config


def main(argv: list[str] | None = None) -> int:
    arguments = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress
    started, load_start = time.perf_counter(), _load()
    meta = {"command": "python -m models.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_start": load_start,
            "machine": report.machine(arguments.device)}
    comparisons: list[Comparison] = []
    skipped: list[Skipped] = []
    training: list[training_rows.TrainingResult] = []
    profile: profiling.Profile | None = None
    with tempfile.TemporaryDirectory(prefix="sdserve-bench-") as scratch:
        config = config_from(arguments, Path(scratch))
        meta["config"] = {key: str(value) for key, value in vars(config).items()}
        context = rows.Context(config)
        try:
            for name in arguments.rows:
                logger.info("row %s", name)
                row_started = time.perf_counter()
                if name == "training":
                    results, not_run = _training(context, arguments)
                    training += results
                    skipped += not_run
                elif name == "profile":
                    py_spy = profiling.find_py_spy(arguments.py_spy)
                    if py_spy is None:
                        skipped.append(Skipped("profile", "py-spy is not installed (pip install py-spy)"))
                    else:
                        profile = profiling.profile_server(context, py_spy, arguments.profile_requests)
                else:
                    for row in ROWS[name](context):
                        (skipped if isinstance(row, Skipped) else comparisons).append(row)
                logger.info("row %s took %.0fs", name, time.perf_counter() - row_started)
        finally:
            context.close()
    meta |= {"wall_s": time.perf_counter() - started, "load_end": _load()}
    table, data = report.write(arguments.out, meta, comparisons, skipped, training, profile)
    sys.stdout.write(table.read_text(encoding="utf-8"))
    logger.info("wrote %s and %s", table, data)
    return 0


def _training(context: rows.Context, arguments: argparse.Namespace
              ) -> tuple[list[training_rows.TrainingResult], list[Skipped]]:
    models = arguments.train_models or ["demo"]
    steps = arguments.train_steps or (2 if arguments.tiny else 8)
    resolution = arguments.train_resolution or (64 if arguments.tiny else 128)
    results, skipped = training_rows.training(context, models, steps, resolution, arguments.train_batch,
                                              arguments.diffusers_script)
    failed = [result for result in results if result.returncode != 0]
    if failed:
        raise RuntimeError(f"training failed for {[r.variant for r in failed]}; see {context.logs}")
    return results, skipped


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "-"


if __name__ == "__main__":
    sys.exit(main())
