"""The OpenVINO fast path for CPUs: the pipeline's UNet exported once to OpenVINO, cached on disk, reused.

1. Identify: a digest of the UNet's config and weights (and the diffusers / OpenVINO versions that shape the
   export) names its cache folder, so a fine-tune, a new checkpoint or an upgrade exports again, and a restart
   or a second server on the same cache does not.
2. Export once: `openvino.convert_model` traces the torch UNet with dynamic batch, height, width and prompt length,
   and the IR (float32 weights, uncompressed) is saved atomically under a file lock into CACHE_DIR/openvino/.
3. Compile: OpenVINO's own compiled-blob cache (CACHE_DIR/openvino/compiled) makes later compiles an import.
4. Route each call: the torch UNet stays in the pipeline (diffusers, PEFT and the rest of the code see the real
   module); only its `forward` is replaced, by a function that runs the compiled model when the call is one the
   export covers, and the original forward otherwise.

LoRAs: a call whose UNet has LoRA adapters enabled (or merged) runs on the torch UNet, so LoRA images are exactly
the eager ones at eager speed, and requests without LoRAs keep the fast path. Calls with ControlNet residuals,
extra conditioning or latent sizes the traced graph does not cover run on torch the same way.

Only the generation worker calls into a pipeline, but the lock below keeps one infer request safe anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import diffusers
import torch
from filelock import FileLock

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the export changes (inputs, options), so cached IRs are made again
IR_NAME = "unet.xml"
# Arguments of UNet2DConditionModel.forward that the exported graph does not take: a call with any of them set runs
# on torch (ControlNet residuals, T2I adapters, SDXL-style added conditions, LCM timestep conditions, masks).
_UNCOVERED_ARGUMENTS = (
    "class_labels", "timestep_cond", "attention_mask", "added_cond_kwargs", "down_block_additional_residuals",
    "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask",
)


class OpenVinoMissing(RuntimeError):
    """The openvino package is not installed (it is the optional extra `openvino`)."""


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as error:
        raise OpenVinoMissing(
            "the OpenVINO backend needs the openvino package: pip install 'sdserve[openvino]' "
            "(or pip install openvino)"
        ) from error
    return openvino


def openvino_available() -> bool:
    try:
        _openvino()
    except OpenVinoMissing:
        return False
    return True


# -- 1. identity ---------------------------------------------------------------------------------------------------
def unet_identity(unet: torch.nn.Module) -> str:
    """A digest of what the exported graph depends on: config, every weight, and the exporting code's versions."""
    openvino = _openvino()
    digest = hashlib.sha256()
    config = json.dumps(dict(unet.config), sort_keys=True, default=str)
    digest.update(f"v{EXPORT_VERSION}|diffusers {diffusers.__version__}|openvino {openvino.__version__}|".encode())
    digest.update(config.encode())
    for name, tensor in unet.state_dict().items():
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# -- 2. export -------------------------------------------------------------------------------------------------------
class _UNetCall(torch.nn.Module):
    """The UNet call the pipelines make, with positional tensors only: what convert_model traces. The UNet is a
    submodule so that tracing sees its weights as parameters; its class's forward is called, never a replacement."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _latent_multiple(unet: torch.nn.Module) -> int:
    """Latent sizes the traced graph covers are multiples of this (the UNet's total downsampling)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _export(unet: torch.nn.Module, folder: Path) -> None:
    openvino = _openvino()
    side = 2 * _latent_multiple(unet)  # small: tracing runs the model once, and the shapes are made dynamic below
    example = (
        torch.zeros(2, unet.config.in_channels, side, side),
        torch.tensor(500.0),
        torch.zeros(2, 77, unet.config.cross_attention_dim),
    )
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing fixes shape-dependent branches (upsampling sizes, batch-size checks) as constants; the router
        # sends the shapes those constants do not cover to torch, so the tracer's warnings say nothing new.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = openvino.convert_model(_UNetCall(unet), example_input=example)
    model.reshape({
        model.inputs[0]: openvino.PartialShape([-1, unet.config.in_channels, -1, -1]),
        model.inputs[1]: openvino.PartialShape([]),
        model.inputs[2]: openvino.PartialShape([-1, -1, unet.config.cross_attention_dim]),
    })
    # Float32 weights on disk: fp16 compression would change the images.
    openvino.save_model(model, folder / IR_NAME, compress_to_fp16=False)
    logger.info("exported the UNet to OpenVINO in %.1fs into %s", time.perf_counter() - started, folder)


def ensure_exported(unet: torch.nn.Module, cache_dir: Path, identity: str) -> tuple[Path, bool]:
    """The folder of this UNet's IR, exporting it first if no earlier run did; and whether this call exported."""
    target = Path(cache_dir) / "openvino" / f"unet-{identity[:24]}"
    if (target / IR_NAME).exists():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / IR_NAME).exists():
            return target, False
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            _export(unet, scratch)
            (scratch / "identity.json").write_text(
                json.dumps({"identity": identity, "export_version": EXPORT_VERSION,
                            "class": type(unet).__name__}, indent=2), encoding="utf-8")
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target, True


# -- 3. compile ------------------------------------------------------------------------------------------------------
def _compile(folder: Path, cache_dir: Path) -> Any:
    openvino = _openvino()
    core = openvino.Core()
    blobs = Path(cache_dir) / "openvino" / "compiled"
    blobs.mkdir(parents=True, exist_ok=True)
    # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise pick bf16 and the images would drift.
    # As many threads as torch uses, so OMP_NUM_THREADS / torch.set_num_threads hold for the whole pipeline.
    config = {"CACHE_DIR": str(blobs), "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    started = time.perf_counter()
    compiled = core.compile_model(str(folder / IR_NAME), "CPU", config)
    logger.info("compiled the OpenVINO UNet in %.1fs", time.perf_counter() - started)
    return compiled


# -- 4. routing calls ------------------------------------------------------------------------------------------------
def lora_active(unet: torch.nn.Module) -> bool:
    """Whether a call through the UNet would apply LoRA weights (adapters enabled and active, or merged in)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer) and (
            module.merged or (not module.disable_adapters and module.active_adapters)
        ):
            return True
    return False


@dataclass
class OpenVinoUNet:
    """The compiled UNet attached to a torch UNet; `calls` counts where each UNet call ran."""

    unet: torch.nn.Module
    torch_forward: Any
    compiled: Any
    folder: Path
    exported: bool  # True when this load made the IR, False when it was found in the cache
    calls: dict[str, int] = field(default_factory=lambda: {"openvino": 0, "torch": 0})
    _request: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _told: set[str] = field(default_factory=set, repr=False)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        reason = self._uncovered(sample, timestep, encoder_hidden_states, args, kwargs)
        if reason is not None:
            self.calls["torch"] += 1
            if reason not in self._told:
                self._told.add(reason)
                logger.info("OpenVINO UNet: %s; such calls run on the torch UNet", reason)
            return self.torch_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict,
                                      **kwargs)
        self.calls["openvino"] += 1
        step = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0]
        with self._lock:
            if self._request is None:
                self._request = self.compiled.create_infer_request()
            self._request.infer(
                [sample.contiguous().numpy(), step.numpy(), encoder_hidden_states.contiguous().numpy()],
                share_inputs=True,
            )
            # The request reuses its output buffer on the next call: copy it out.
            noise = torch.from_numpy(self._request.get_output_tensor(0).data.copy())
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def _uncovered(self, sample: torch.Tensor, timestep: Any, hidden: torch.Tensor, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> str | None:
        """Why this call cannot run on the exported graph, or None when it can."""
        if args or any(kwargs.get(name) is not None for name in _UNCOVERED_ARGUMENTS):
            return "a call with extra conditioning (ControlNet, adapters, added conditions)"
        if kwargs.get("cross_attention_kwargs"):
            return "a call with cross-attention arguments"
        if sample.device.type != "cpu" or sample.dtype != torch.float32 or hidden.dtype != torch.float32:
            return "a call that is not float32 on the CPU"
        if torch.is_tensor(timestep) and timestep.numel() > 1 and not bool((timestep == timestep.flatten()[0]).all()):
            return "a call with a different timestep per image"
        multiple = _latent_multiple(self.unet)
        if sample.shape[-1] % multiple or sample.shape[-2] % multiple:
            return f"latents whose sides are not multiples of {multiple} (images not multiples of {8 * multiple})"
        if lora_active(self.unet):
            return "LoRA adapters are active"
        return None


def attach(unet: torch.nn.Module, cache_dir: Path) -> OpenVinoUNet:
    """Export (or find), compile, and route `unet`'s calls through OpenVINO. Call it before loading any LoRA."""
    existing = getattr(unet, "_sdserve_openvino", None)
    if existing is not None:
        return existing
    if lora_active(unet):
        raise ValueError("attach the OpenVINO UNet before loading LoRAs: the export must hold the base weights")
    torch_forward = unet.forward  # the class's bound forward, from before any replacement
    started = time.perf_counter()
    identity = unet_identity(unet)
    logger.info("UNet identity %s (%.1fs)", identity[:24], time.perf_counter() - started)
    folder, exported = ensure_exported(unet, cache_dir, identity)
    fast = OpenVinoUNet(unet=unet, torch_forward=torch_forward, compiled=_compile(folder, cache_dir),
                        folder=folder, exported=exported)
    # An instance attribute wins over the class's forward in nn.Module.__call__: every caller (the pipelines,
    # from_pipe derivatives sharing this UNet) now goes through the router, while PEFT and diffusers still see
    # the real UNet2DConditionModel.
    unet.forward = MethodType(lambda _unet, *a, **k: fast.forward(*a, **k), unet)
    unet._sdserve_openvino = fast
    return fast


def detach(unet: torch.nn.Module) -> None:
    """Give the UNet its torch forward back."""
    if getattr(unet, "_sdserve_openvino", None) is not None:
        del unet.forward
        del unet._sdserve_openvino
