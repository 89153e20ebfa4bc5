"""The decoder-only model: Llama (2/3, Mistral), Qwen2 and Qwen3 in one module.

Per layer: RMSNorm -> q/k/v projections (Qwen2: bias) -> Qwen3's per-head q/k RMSNorm ->
RoPE at each token's absolute position -> ``kernels.write_kv`` of K (after RoPE) and V into
the arena's view of the layer -> paged attention over the cached context -> o projection
-> residual -> RMSNorm -> SwiGLU MLP -> residual. The model holds weights only; the KV
cache is the arena's, and which tokens go where is the :class:`AttentionMetadata` of the
step. Numerics follow transformers' reference code (fp32 norms and RoPE table, products in
the model's dtype) so that greedy tokens match it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import kernels

from .config import ModelConfig


@dataclass
class AttentionMetadata:
    """Where one step's tokens are and what they attend to (all on the model's device).

    ``positions`` int64 ``[T]`` (absolute position of every token in its sequence);
    ``slot_mapping`` int64 ``[T]`` (``block_id * block_size + offset``; < 0 skips);
    ``block_tables`` int32 ``[n, W]``; ``seq_lens`` int32 ``[n]`` (context with this step's
    tokens); ``query_start_loc`` int32 ``[n + 1]``; ``decode_only``: every sequence has
    exactly one token (the decode kernel runs instead of the prefill kernel).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    decode_only: bool


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32, scaled in ``x``'s dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in fp32 (fp16 would change tokens), with
    "linear" or "llama3" scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    s = cfg.rope_scaling
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(s["factor"])
    elif kind == "llama3":
        factor = float(s["factor"])
        lo, hi = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept; in between, a linear
        # blend in old_context / wavelen.
        blend = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(mid, (1 - blend) * inv / factor + blend * inv, scaled)
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by half-split pairs (the HF convention);
    ``cos``/``sin`` ``[T, head_dim]`` in ``x``'s dtype."""
    h = x.shape[-1] // 2
    rotated = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class CausalLM:
    """Weights of one model and its forward pass over a paged batch.

    Weight names are transformers' (``model.layers.{i}.self_attn.q_proj.weight`` ...); q, k
    and v are fused into one matrix, gate and up into another. Build with
    :func:`engine.weights.load_model`.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.params: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ weights
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight the model needs, by its transformers name, with its shape."""
        c = self.cfg
        h, q, kv, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, \
            c.intermediate_size
        shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, h)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (h,),
                           p + "post_attention_layernorm.weight": (h,),
                           p + "self_attn.q_proj.weight": (q, h),
                           p + "self_attn.k_proj.weight": (kv, h),
                           p + "self_attn.v_proj.weight": (kv, h),
                           p + "self_attn.o_proj.weight": (h, q),
                           p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
            if c.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,),
                               p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if c.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            if c.mlp_bias:
                shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,),
                               p + "mlp.down_proj.bias": (h,)})
            if c.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (c.head_dim,),
                               p + "self_attn.k_norm.weight": (c.head_dim,)})
        return shapes

    def load(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take weights from ``(name, tensor)`` pairs (any dtype and device; converted).

        Raises ValueError naming a missing or misshapen weight, or an unexpected one (rotary
        buffers excepted); nothing is kept in that case. A tied lm_head is the embedding.
        """
        want = self.expected_shapes()
        got: dict[str, torch.Tensor] = {}
        for name, t in named:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight"
                                                        and self.cfg.tie_word_embeddings):
                continue
            if name not in want:
                raise ValueError(f"weights: unexpected weight {name!r} for a "
                                 f"{self.cfg.model_type} model of this config")
            if tuple(t.shape) != want[name]:
                raise ValueError(f"weights: {name} has shape {tuple(t.shape)}, config says "
                                 f"{want[name]}")
            got[name] = t.detach().to(self.device, self.dtype)
        missing = sorted(set(want) - set(got))
        if missing:
            raise ValueError(f"weights: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        p = {}
        for i in range(self.cfg.num_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            p[f"{i}.qkv"] = torch.cat([got.pop(a + f"{x}_proj.weight") for x in "qkv"])
            if self.cfg.qkv_bias:
                p[f"{i}.qkv_bias"] = torch.cat([got.pop(a + f"{x}_proj.bias") for x in "qkv"])
            p[f"{i}.gate_up"] = torch.cat([got.pop(m + "gate_proj.weight"),
                                           got.pop(m + "up_proj.weight")])
            if self.cfg.mlp_bias:
                p[f"{i}.gate_up_bias"] = torch.cat([got.pop(m + "gate_proj.bias"),
                                                    got.pop(m + "up_proj.bias")])
        p.update(got)
        if self.cfg.tie_word_embeddings:
            p["lm_head.weight"] = p["model.embed_tokens.weight"]
        self.params = p

    # ------------------------------------------------------------------ forward
    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, head_dim]`` in the model's dtype for int64 ``positions`` ``[T]``;
        the angles are computed in fp32."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_cache: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Final hidden states ``[T, hidden_size]`` (model dtype) for int64 ``input_ids``
        ``[T]``; writes every token's K/V into ``kv_cache(layer)`` (the arena's views
        ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``) on the way."""
        c, p = self.cfg, self.params
        nq, nkv, d = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
        cos, sin = self.rope_cos_sin(meta.positions)
        x = F.embedding(input_ids, p["model.embed_tokens.weight"])
        for i in range(c.num_layers):
            pre = f"model.layers.{i}."
            h = rms_norm(x, p[pre + "input_layernorm.weight"], c.rms_norm_eps)
            qkv = F.linear(h, p[f"{i}.qkv"], p.get(f"{i}.qkv_bias"))
            q, k, v = qkv.split((nq, nkv, nkv), dim=-1)
            q, k = q.view(-1, c.num_heads, d), k.view(-1, c.num_kv_heads, d)
            v = v.view(-1, c.num_kv_heads, d)
            if c.qk_norm:   # Qwen3: per head, before RoPE
                q = rms_norm(q, p[pre + "self_attn.q_norm.weight"], c.rms_norm_eps)
                k = rms_norm(k, p[pre + "self_attn.k_norm.weight"], c.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache = kv_cache(i)
            kernels.write_kv(cache, k, v, meta.slot_mapping)   # K as attention sees it
            if meta.decode_only:
                o = kernels.paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens,
                                                   scale=c.scaling)
            else:
                o = kernels.paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens,
                                                    meta.query_start_loc, scale=c.scaling)
            x = x + F.linear(o.reshape(-1, nq), p[pre + "self_attn.o_proj.weight"],
                             p.get(pre + "self_attn.o_proj.bias"))
            h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], c.rms_norm_eps)
            gate, up = F.linear(h, p[f"{i}.gate_up"], p.get(f"{i}.gate_up_bias")).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, p[pre + "mlp.down_proj.weight"],
                             p.get(pre + "mlp.down_proj.bias"))
        return rms_norm(x, p["model.norm.weight"], c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[n, vocab_size]`` of hidden rows ``[n, hidden_size]``."""
        return F.linear(hidden, self.params["lm_head.weight"]).float()
