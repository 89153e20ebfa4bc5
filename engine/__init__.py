"""A small reference engine: real decoder-only models (Llama 2/3, Mistral, Qwen2, Qwen3)
served through the scheduler's loop, the arena and the paged kernels.

    from engine import LLM, SamplingParams
    llm = LLM("/models/Qwen3-0.6B", device="cuda", memory_policy="windowed")
    outs = llm.generate([[9707, 11, 1879]], SamplingParams(max_tokens=16))

Layering: engine -> scheduler -> arena -> kernels; nothing below imports the engine.
"""
from .config import PRESETS, ModelConfig
from .llm import LLM, RequestOutput
from .model import AttentionMetadata, CausalLM
from .sampling import SamplingParams
from .step import ModelStep
from .weights import load_model

__all__ = ["LLM", "SamplingParams", "RequestOutput", "ModelConfig", "PRESETS", "CausalLM",
           "AttentionMetadata", "ModelStep", "load_model"]
