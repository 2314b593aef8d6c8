"""The benchmark command keeps working: `python -m models.bench --tiny` writes every row (no timing asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from models.bench.__main__ import DEFAULT_ROWS
from models.bench.report import markdown
from models.bench.stats import Comparison, Side, Skipped, percentile


def test_statistics_and_verdicts():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
    slower = Comparison("server vs bare pipe()", "demo", "64x64", "s/image", Side("a", [1.1, 1.2, 1.3]),
                        Side("b", [1.0, 1.0, 1.0]))
    assert slower.ratio == pytest.approx(1.2) and slower.speedup == pytest.approx(1 / 1.2)
    more = Comparison("concurrency 4", "demo", "64x64", "images/s", Side("a", [3.0]), Side("b", [2.0]),
                      higher_is_better=True)
    table = markdown({"command": "python -m models.bench", "started": "now", "wall_s": 1.0, "load_start": "0",
                      "load_end": "0", "machine": {"cpu": "cpu", "logical_cpus": 2, "ram_gib": 1, "python": "3",
                                                   "torch": "2", "torch_threads": 2, "diffusers": "0",
                                                   "openvino": None, "device": "cpu"}},
                     [slower, more], [Skipped("concurrency, micro-batching on", "not yet")], [])
    assert "| server vs bare pipe() | demo | 64x64 | s/image | a | 1.200 |" in table
    assert "1.20x slower" in table and "1.50x the throughput" in table
    assert "- concurrency, micro-batching on: not yet" in table


def tiny_run(folder: Path) -> list[str]:
    return [sys.executable, "-m", "models.bench", "--tiny", "--out", str(folder / "bench"),
            "--cache-dir", str(folder / "cache")]  # its own cache: it builds beside the suite's fixtures


@pytest.mark.slow
@pytest.mark.runs_beside(command=tiny_run)
def test_tiny_run_writes_the_table_and_json_with_every_row(beside_run):
    assert beside_run.wait(timeout_s=1500) == 0, beside_run.stderr_tail()
    out = beside_run.folder / "bench"
    table = (out / "bench.md").read_text(encoding="utf-8")
    data = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    rows = [row["row"] for row in data["comparisons"]]
    expected = ["server vs bare pipe()", "seed 000 design vs server", "concurrency 1, micro-batching off",
                "concurrency 2, micro-batching off", "concurrency 1, micro-batching on",
                "concurrency 2, micro-batching on", "LoRA switching", "model switching (two cached bases)",
                "cold start to first image", "fast path (OpenVINO UNet + VAE decoder) vs eager"]
    assert sorted(rows) == sorted(expected)
    for row in data["comparisons"]:
        assert row["a"]["n"] >= 1 and row["b"]["n"] >= 1 and row["ratio"] > 0, row
        assert f"| {row['row']} |" in table
    assert [result["variant"] for result in data["training"]] == [
        "plain", "latent caching", "gradient checkpointing", "both"]
    assert all(result["returncode"] == 0 and result["steps_per_s"] > 0 for result in data["training"])
    assert "- training demo: diffusers train_text_to_image_lora.py: no --diffusers-script given" in table
    assert set(DEFAULT_ROWS) >= {"server", "concurrency", "training"}
    assert data["machine"]["logical_cpus"] >= 1


def test_profile_samples_are_grouped_by_the_deepest_stage():
    from models.bench.profile import summarise

    collapsed = "\n".join([
        "run (worker.py:1);__call__ (pipeline_stable_diffusion.py:9);forward (unets/unet_2d_condition.py:3);"
        "forward (torch/nn/modules/conv.py:5) 6",
        "run (worker.py:1);__call__ (pipeline_stable_diffusion.py:9);decode (autoencoders/vae.py:2) 3",
        "run (asyncio/base_events.py:1);encode (api/images.py:4);_save (PIL/PngImagePlugin.py:7) 1",
        "run (threading.py:982);_run (models/jobs.py:223);Queue.get (queue.py:171);Condition.wait (threading.py:3) 50",
    ])
    profile = summarise(collapsed, seconds=1.0, requests=1)
    assert profile.samples == 10 and profile.waiting == 50
    assert profile.stages == {"UNet": 0.6, "VAE decode": 0.3, "PNG encoding and saving": 0.1}
    assert profile.top_frames[0] == ("forward (torch/nn/modules/conv.py:5)", 0.6)


def test_diffusers_script_row_runs_a_given_script_and_says_why_when_it_cannot(tmp_path: Path):
    """diffusers' train_text_to_image_lora.py is not shipped: the row runs the user's copy with the same data and
    settings, reads its tqdm rate, and is reported as not run (with the reason) when absent or failing."""
    from types import SimpleNamespace

    from models.bench.training_rows import DIFFUSERS_VARIANT, _run_diffusers

    logs = tmp_path / "logs"
    logs.mkdir()
    ctx = SimpleNamespace(config=SimpleNamespace(work=tmp_path), logs=logs, server_env=dict,
                          folder=lambda model: tmp_path / "base")
    dataset = tmp_path / "shapes"
    args = (dataset, 3, 64, 2)

    missing = _run_diffusers(ctx, "demo", None, *args)
    assert isinstance(missing, Skipped) and "no --diffusers-script given" in missing.reason

    failing = tmp_path / "failing.py"
    failing.write_text("import sys\nsys.stderr.write(\"ModuleNotFoundError: No module named 'torchvision'\\n\")\n"
                       "sys.exit(1)\n")
    refused = _run_diffusers(ctx, "demo", failing, *args)
    assert isinstance(refused, Skipped) and "exited with 1: ModuleNotFoundError: No module named 'torchvision'" \
        in refused.reason

    stand_in = tmp_path / "train_text_to_image_lora.py"
    stand_in.write_text("import sys\nargs = sys.argv[1:]\nassert args[args.index('--rank') + 1] == '4'\n"
                        "assert args[args.index('--train_data_dir') + 1].endswith('shapes')\n"
                        "assert '--center_crop' in args\n"
                        "sys.stderr.write('Steps:  33%|###| 1/3 [00:01<00:02, 1.50it/s]\\r"
                        "Steps: 100%|#####| 3/3 [00:02<00:00, 2.25it/s, step_loss=0.1]\\n')\n")
    result = _run_diffusers(ctx, "demo", stand_in, *args)
    assert not isinstance(result, Skipped), result
    assert (result.variant, result.steps, result.resolution, result.batch) == (DIFFUSERS_VARIANT, 3, 64, 2)
    assert result.steps_per_s == pytest.approx(2.25) and result.peak_rss_mb > 0 and result.returncode == 0
