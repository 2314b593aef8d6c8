"""Every route fuzzed from the app's own OpenAPI schema (schemathesis): no 5xx, and every answer as published
(declared status, content type, body schema, headers). Issue 10, points 7 and 9.

Two passes: every operation against the fake engine (routing, validation, translation, the error shapes), and
the generation, job, image and registry routes against the real engine on the demo model, with limits small
enough that a fuzzed request runs in milliseconds. Examples are few and bounded, so the file takes well under a
minute; the seeds are fixed, so a failure reproduces.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from models.settings import Settings
from tests.fake_engine import FakeEngine

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
FUZZ = hypothesis_settings(
    max_examples=12, deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
)
# Routes that start processes or stream until a job ends; the fake-engine pass covers their validation.
REAL_ENGINE_SKIPS = r"^/(train|jobs/\{job_id\}/events|load-controlnet|loras|load-lora|unload-controlnet)"


def fuzz_settings(folder: Path, model_cache: Path | None = None) -> Settings:
    return Settings(
        registry_path=folder / "registry.yaml", output_dir=folder / "outputs", data_dir=folder / "data",
        datasets_dir=folder / "datasets", cache_dir=model_cache or folder / "cache", device="cpu", default_model="demo",
        max_width=128, max_height=128, max_steps=3, max_images=2, queue_size=64, save_images=False,
        max_body_bytes=2 * 2**20, max_input_pixels=256 * 256, preload_default_model=model_cache is not None,
    )


statuses: Counter[str] = Counter()


def fuzz(schema) -> dict[str, str]:
    """Run every operation of `schema` for FUZZ's examples; the failures by operation (empty when none). The
    statuses answered are counted in `statuses`, so a test can check the fuzzer got past validation."""
    statuses.clear()
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        # Valid requests (by the schema) and invalid ones (a wrong type, a missing field, out of range).
        strategy = st.one_of(operation.as_strategy(mode) for mode in GenerationMode)

        @FUZZ
        @seed(10)
        @given(case=strategy)
        def run(case) -> None:
            response = case.call_and_validate(checks=CHECKS)
            statuses[f"{case.operation.label} {response.status_code}"] += 1

        try:
            run()
        except Exception as error:  # noqa: BLE001 - every failing operation is reported, not only the first
            failures[operation.label] = str(error)[:3000]
    return failures


def test_every_route_on_the_fake_engine(tmp_path: Path):
    app = create_app(fuzz_settings(tmp_path), engine=FakeEngine(queue_size=10**6))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert len(list(schema.get_all_operations())) > 40
    failures = fuzz(schema)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    assert sum(count for label, count in statuses.items() if label.endswith(" 200")) > 40, statuses


# The published schema leaves sizes, steps and counts open (their limits are settings); for the real engine the
# fuzzer keeps them small and always sends them, so that valid requests run (in milliseconds) rather than all
# answering 422.
SMALL_FIELDS = {  # names -> (minimum, maximum, multiple of)
    ("width", "height", "W", "H"): (64, 128, 8),
    ("steps", "num_inference_steps", "ddim_steps", "inference_steps"): (1, 3, 1),
    ("number_of_images", "num_images", "n", "batch_size", "n_iter", "n_samples", "total_nm_img_prompt"): (1, 1, 1),
}


def with_small_numbers(schema: dict) -> dict:
    for component_name, component in schema["components"]["schemas"].items():
        if not component_name.endswith(("Body", "Request")) and not component_name.startswith("Body_"):
            continue  # answers are left as published
        for name, field in component.get("properties", {}).items():
            for names, (low, high, step) in SMALL_FIELDS.items():
                if name in names:
                    for variant in [field, *field.get("anyOf", [])]:
                        if variant.get("type") == "integer":
                            variant.update(minimum=low, maximum=high, multipleOf=step)
                    if high > 1:  # always sent, so that the server's larger defaults do not apply
                        component.setdefault("required", []).append(name)
    return schema


def test_generation_job_image_and_registry_routes_on_the_real_engine(tmp_path: Path, model_cache: Path):
    app = create_app(fuzz_settings(tmp_path, model_cache))
    schema = schemathesis.openapi.from_dict(with_small_numbers(app.openapi()))
    schema.app = app
    schema = schema.exclude(path_regex=REAL_ENGINE_SKIPS)
    failures = fuzz(schema)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    succeeded = {label.rsplit(" ", 1)[0] for label in statuses if label.endswith((" 200", " 202"))}
    assert {"POST /text2img", "POST /sdapi/v1/txt2img", "GET /jobs"} <= succeeded, statuses
