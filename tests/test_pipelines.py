"""The pipeline cache: one load per base, derived pipelines share weights, an LRU bound."""

from __future__ import annotations

from models.engine.device import select_device
from models.engine.pipelines import PipelineCache
from models.registry import Registry, RegistryEntry


def make_cache(settings, **overrides) -> PipelineCache:
    settings = settings.model_copy(update=overrides)
    registry = Registry(settings.registry_path)
    return PipelineCache(settings, registry, select_device(settings))


def test_derived_pipelines_share_the_base_components(settings):
    cache = make_cache(settings)
    text2img, model = cache.get("demo", "text2img")
    img2img, _ = cache.get("demo", "img2img")
    inpainting, _ = cache.get("demo", "inpainting")
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(inpainting).__name__ == "StableDiffusionInpaintPipeline"
    assert img2img.unet is text2img.unet and inpainting.vae is text2img.vae
    assert img2img.text_encoder is text2img.text_encoder
    assert cache.get("demo", "img2img")[0] is img2img
    assert model.weight_bytes > 0


def test_least_recently_used_base_is_unloaded(settings):
    cache = make_cache(settings, max_loaded_models=2)
    for name in ("a", "b", "c"):
        cache.registry.register(name, RegistryEntry(source="demo:tiny"))
    cache.get("a", "text2img")
    cache.get("b", "text2img")
    cache.get("a", "text2img")
    cache.get("c", "text2img")
    assert cache.loaded_names() == ["a", "c"]


def test_memory_budget_unloads(settings):
    cache = make_cache(settings, memory_budget_gb=1e-6)
    cache.registry.register("other", RegistryEntry(source="demo:tiny"))
    cache.get("demo", "text2img")
    cache.get("other", "text2img")
    assert cache.loaded_names() == ["other"]
