"""Building a :class:`~engine.model.CausalLM` from what a user has: a transformers model
object, a local folder in Hugging Face layout (config.json + *.safetensors), or a preset
name with random weights at a real model's geometry. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from .config import ModelConfig, preset
from .model import CausalLM

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16}


def resolve_dtype(dtype: Any, default: torch.dtype) -> torch.dtype:
    """``"auto"``/None -> ``default``; a name or torch dtype among fp32/fp16/bf16."""
    if dtype is None or dtype == "auto":
        dtype = default
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def _safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: {folder} has no *.safetensors file")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def _random(model: CausalLM, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Normal(0, initializer_range) matrices and unit norms, made on the model's device."""
    gen = torch.Generator(model.device).manual_seed(seed)
    std = model.cfg.initializer_range
    for name, shape in model.expected_shapes().items():
        if len(shape) == 1 and "norm" in name:
            yield name, torch.ones(shape, device=model.device, dtype=model.dtype)
        else:
            t = torch.empty(shape, device=model.device, dtype=model.dtype)
            yield name, t.normal_(0.0, std, generator=gen)


def load_model(model: Any, *, dtype: Any = "auto", device: str | torch.device = "cpu",
               seed: int = 0) -> CausalLM:
    """A ready :class:`CausalLM` from:

    * a transformers ``PreTrainedModel`` (weights copied from its state dict; ``"auto"``
      dtype: the model's);
    * a path to a folder with ``config.json`` and ``*.safetensors`` (``"auto"``: the
      config's ``dtype``/``torch_dtype``, else float32);
    * a preset name ``"NAME:random"`` (see :data:`engine.config.PRESETS`; ``"auto"``:
      bfloat16 on CUDA, float32 on CPU), weights drawn with ``seed``;
    * a :class:`CausalLM` (returned as is: ``dtype`` must be ``"auto"`` or its dtype and
      ``device`` its device, else ValueError — it is never converted behind your back).
    """
    if isinstance(model, CausalLM):
        want = torch.device(device)
        if want.type != model.device.type or (want.index is not None
                                              and want.index != model.device.index):
            raise ValueError(f"device={str(want)!r} but the CausalLM given is on "
                             f"{model.device}; move it first or pass its device")
        if dtype != "auto" and resolve_dtype(dtype, model.dtype) != model.dtype:
            raise ValueError(f"dtype={dtype!r} but the CausalLM given is {model.dtype}; "
                             f"pass dtype='auto' or build it in the dtype you want")
        return model
    device = torch.device(device)
    if hasattr(model, "state_dict") and hasattr(model, "config"):
        cfg = ModelConfig.from_hf(model.config)
        first = next(iter(model.parameters()))
        m = CausalLM(cfg, resolve_dtype(dtype, first.dtype), device)
        m.load(model.state_dict().items())
        return m
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        cfg = ModelConfig.from_folder(model)
        m = CausalLM(cfg, resolve_dtype(dtype, DTYPES.get(cfg.torch_dtype or "", torch.float32)),
                     device)
        m.load(_safetensors(Path(model)))
        return m
    if isinstance(model, str) and model.endswith(":random"):
        cfg = preset(model)
        auto = torch.bfloat16 if device.type == "cuda" else torch.float32
        m = CausalLM(cfg, resolve_dtype(dtype, auto), device)
        m.load(_random(m, seed))
        return m
    raise ValueError(f"model must be a transformers PreTrainedModel, a folder with config.json "
                     f"and *.safetensors, or a preset 'NAME:random'; got {model!r}")
