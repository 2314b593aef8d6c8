"""The benchmark command keeps working: `python -m models.bench --tiny` writes every row (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.bench.__main__ import DEFAULT_ROWS
from models.bench.report import markdown
from models.bench.stats import Comparison, Side, Skipped, percentile
from tests.conftest import ROOT


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


@pytest.mark.slow
def test_tiny_run_writes_the_table_and_json_with_every_row(tmp_path: Path, model_cache: Path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, "-m", "models.bench", "--tiny", "--out", str(out),
                                "--cache-dir", str(model_cache)], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=1500)
    assert completed.returncode == 0, completed.stderr[-4000:]
    table = (out / "bench.md").read_text(encoding="utf-8")
    data = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    rows = [row["row"] for row in data["comparisons"]]
    expected = ["server vs bare pipe()", "seed 000 design vs server", "concurrency 1, micro-batching off",
                "concurrency 2, micro-batching off", "concurrency 1, micro-batching on",
                "concurrency 2, micro-batching on", "LoRA switching", "model switching (two cached bases)",
                "cold start to first image", "fast path (OpenVINO UNet) vs eager"]
    assert sorted(rows) == sorted(expected)
    for row in data["comparisons"]:
        assert row["a"]["n"] >= 1 and row["b"]["n"] >= 1 and row["ratio"] > 0, row
        assert f"| {row['row']} |" in table
    assert [result["variant"] for result in data["training"]] == [
        "plain", "latent caching", "gradient checkpointing", "both"]
    assert all(result["returncode"] == 0 and result["steps_per_s"] > 0 for result in data["training"])
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
