"""ModelConfig: what the engine needs from a Hugging Face config, checked once.

Reads a transformers ``PretrainedConfig`` or a ``config.json`` dict of the Llama (Llama 2/3,
Mistral), Qwen2 and Qwen3 families, from transformers 4.x (``rope_theta`` +
``rope_scaling``) or 5.x (``rope_parameters``). Anything our kernels cannot do exactly —
sliding windows, attention sinks, logit softcapping, rope scaling that depends on the
batch — is refused with a ValueError naming the config field, never run approximately.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: rope types whose frequency table is a fixed function of the config (position-independent)
STATIC_ROPE = ("default", "linear", "llama3")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


@dataclass(frozen=True)
class ModelConfig:
    """Geometry and numerics of one decoder-only model (sizes in elements)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # {"rope_type": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False          # Qwen2; Llama/Qwen3 with attention_bias
    o_bias: bool = False            # Llama/Qwen3 with attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm over each head of q and k, before RoPE
    eos_token_ids: tuple[int, ...] = ()
    initializer_range: float = 0.02
    torch_dtype: str | None = None

    @property
    def scaling(self) -> float:
        """The softmax scale of attention (the families here use ``head_dim ** -0.5``)."""
        return self.head_dim ** -0.5

    @property
    def num_params(self) -> int:
        """Weights in all (embeddings and a separate lm_head included)."""
        h = self.hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h
        per_layer = attn + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    @classmethod
    def from_hf(cls, cfg: Any) -> "ModelConfig":
        """From a transformers config object or a config.json dict; ValueError naming the
        field for anything unsupported."""
        mt = _get(cfg, "model_type")
        if mt not in FAMILIES:
            raise ValueError(f"model_type must be one of {FAMILIES}, got {mt!r}")
        act = _get(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU MLP), got {act!r}")
        _refuse_unsupported(cfg)
        heads = int(_get(cfg, "num_attention_heads"))
        hidden = int(_get(cfg, "hidden_size"))
        kv = _get(cfg, "num_key_value_heads") or heads
        head_dim = _get(cfg, "head_dim") or hidden // heads   # Qwen3: its own field
        theta, scaling = _rope(cfg)
        bias = bool(_get(cfg, "attention_bias", False))
        eos = _get(cfg, "eos_token_id")
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple))
                                                             else [eos]))
        dtype = _get(cfg, "dtype") or _get(cfg, "torch_dtype")
        return cls(
            model_type=mt, vocab_size=int(_get(cfg, "vocab_size")), hidden_size=hidden,
            intermediate_size=int(_get(cfg, "intermediate_size")),
            num_layers=int(_get(cfg, "num_hidden_layers")), num_heads=heads,
            num_kv_heads=int(kv), head_dim=int(head_dim),
            rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(_get(cfg, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
            qkv_bias=bias or mt == "qwen2", o_bias=bias,
            mlp_bias=bool(_get(cfg, "mlp_bias", False)), qk_norm=mt == "qwen3",
            eos_token_ids=eos, initializer_range=float(_get(cfg, "initializer_range", 0.02)),
            torch_dtype=None if dtype is None else str(dtype).replace("torch.", ""))

    @classmethod
    def from_folder(cls, path: str | Path) -> "ModelConfig":
        """From ``path/config.json`` (Hugging Face layout)."""
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ValueError(f"model: {path} has no config.json")
        return cls.from_hf(json.loads(p.read_text()))


def _refuse_unsupported(cfg: Any) -> None:
    """Raise ValueError naming the field of a feature our kernels do not have."""
    sw = _get(cfg, "sliding_window")
    qwen = _get(cfg, "model_type") in ("qwen2", "qwen3")
    if sw is not None and (not qwen or _get(cfg, "use_sliding_window", False)):
        raise ValueError(f"sliding_window={sw}: sliding-window attention is not supported "
                         f"(the paged kernels attend over the whole context)")
    layer_types = _get(cfg, "layer_types") or ()
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types={list(layer_types)}: only full_attention layers are "
                         f"supported")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if _get(cfg, name) is not None:
            raise ValueError(f"{name}={_get(cfg, name)}: softcapping is not supported")
    for name in ("attention_sinks", "use_attention_sinks", "num_sink_tokens"):
        if _get(cfg, name):
            raise ValueError(f"{name}={_get(cfg, name)}: attention sinks are not supported")
    if (_get(cfg, "partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={_get(cfg, 'partial_rotary_factor')}: only "
                         f"full rotary embeddings are supported")


def _rope(cfg: Any) -> tuple[float, dict]:
    """(rope_theta, scaling dict with "rope_type") from 5.x ``rope_parameters`` or 4.x
    ``rope_theta`` + ``rope_scaling``."""
    params = _get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {}
    field_name = "rope_parameters" if _get(cfg, "rope_parameters") else "rope_scaling"
    params = dict(params)
    if params and all(isinstance(v, dict) for v in params.values()):   # per layer type (5.x)
        params = dict(params.get("full_attention", {}))
    # 4.x keeps the base at the top level (and its models read it there); 5.x inside
    # rope_parameters, with no top-level attribute.
    inner = params.pop("rope_theta", None)
    theta = _get(cfg, "rope_theta") or inner or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in STATIC_ROPE:
        raise ValueError(f"{field_name}: rope_type {rope_type!r} is not supported (supported: "
                         f"{', '.join(STATIC_ROPE)}); 'dynamic' and 'longrope' scale by the "
                         f"batch's longest position, which a paged batch does not have")
    params.pop("partial_rotary_factor", None)
    return float(theta), {"rope_type": rope_type, **params}


#: Geometries of public models (config.json fields), for ``"NAME:random"`` presets:
#: random weights at the real shape, for benchmarks. ``tiny-*`` are CPU-sized toys.
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192, eos_token_id=[128001, 128009]),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       eos_token_id=2),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                       max_position_embeddings=32768, eos_token_id=2),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=32768,
                       eos_token_id=151643),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                     max_position_embeddings=40960, eos_token_id=151645),
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=4096,
                       initializer_range=0.2, eos_token_id=2),
    "tiny-qwen3": dict(model_type="qwen3", vocab_size=512, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                       initializer_range=0.2, eos_token_id=2),
}


def preset(name: str) -> ModelConfig:
    """The config of preset ``name`` (with or without the ``:random`` suffix)."""
    base = name.removesuffix(":random")
    if base not in PRESETS:
        raise ValueError(f"model: unknown preset {name!r}; presets: "
                         f"{', '.join(f'{k}:random' for k in PRESETS)}")
    return replace(ModelConfig.from_hf(PRESETS[base]))
