"""Loading and the pitfalls of reading real configs: safetensors folders (tied lm_head
absent), 4.x and 5.x rope fields, the fp32 RoPE table, Qwen3's own head_dim and the
attention scale, refusals of what the kernels cannot do, K cached after RoPE and Qwen3's
k-norm, and transformers' own model code hosting our kernels through AttentionInterface."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from arena import KVSpec, PagedArena
from engine import LLM, ModelConfig, SamplingParams, load_model
from engine.model import AttentionMetadata, CausalLM, rms_norm, rope_inv_freq
from tests.test_engine import (MAX_TOKENS, PROMPTS, reference, tiny_hf, to_dtype,  # noqa: F401
                               torch_kernels)


def prefill_in_own_arena(model: CausalLM, prompt: list[int], block_size: int = 4):
    """Run ``model`` over one whole prompt in a fresh arena of our own, the way an engine
    plugs the arena in: a pool leases blocks, the block table row and slot mapping say
    where each token's K/V go. Returns (fp32 logits ``[len(prompt), vocab]``, arena, ids)."""
    c = model.cfg
    spec = KVSpec(c.num_layers, c.num_kv_heads, c.head_dim, block_size=block_size,
                  dtype=model.dtype)
    arena = PagedArena(spec, 1 << 20, "cpu", granularity=4096, max_seqs=1)
    n = len(prompt)
    pool = arena.pool("mine")
    pool.resize(spec.blocks_for(n))
    ids = pool.allocate(spec.blocks_for(n))
    arena.tables.add(0)
    arena.tables.append(0, ids)
    pos = np.arange(n)
    meta = AttentionMetadata(
        positions=torch.from_numpy(pos),
        slot_mapping=torch.from_numpy(ids[pos // block_size] * block_size + pos % block_size),
        block_tables=arena.tables.device_table[:1], seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), decode_only=False)
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(prompt), meta, arena.kv_cache)
        return model.logits(hidden), arena, ids


def cached_k(arena, ids, layer: int, n: int, block_size: int = 4) -> torch.Tensor:
    """K ``[n, kv_heads, head_dim]`` of one sequence's first ``n`` tokens."""
    k = arena.kv_cache(layer)[torch.from_numpy(ids), 0]
    return k.reshape(-1, *k.shape[-2:])[:n]


# ------------------------------------------------------------------------------ safetensors
@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_folder_loads_equal_to_the_object(tmp_path, tie, torch_kernels):
    from safetensors import safe_open

    hf = tiny_hf("qwen2", tie=tie)
    hf.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert files
    names = {k for f in files for k in safe_open(str(f), "pt").keys()}
    assert ("lm_head.weight" in names) == (not tie)   # a tied lm_head is not in the file
    a, b = load_model(hf), load_model(str(tmp_path))
    assert a.dtype == b.dtype == torch.float32 and a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    if tie:
        outs = LLM(str(tmp_path), block_size=4).generate(
            PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [o.token_ids for o in outs] == [t for t, _ in reference("qwen2")]


def test_missing_or_misshapen_weights_are_named(tmp_path):
    from safetensors.torch import save_file

    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(str(tmp_path))
    sd["lm_head.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \(3, 3\)"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="preset"):
        load_model("llama-9b:random")


def test_random_presets_generate():
    llm = LLM("tiny-qwen3:random", block_size=4, seed=3)
    assert llm.model.cfg.head_dim == 32 and llm.model.dtype == torch.float32
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    again = LLM("tiny-qwen3:random", block_size=4, seed=3).generate(
        [[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert again.token_ids == out.token_ids


# ------------------------------------------------------------------------------ configs
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
BASE = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_rope_fields_of_4x_and_5x_configs_read_the_same():
    v4 = ModelConfig.from_hf({**BASE, "rope_theta": 5000.0,
                              "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    v4_old = ModelConfig.from_hf({**BASE, "rope_theta": 5000.0,
                                  "rope_scaling": {"type": "llama3", **LLAMA3}})
    v5 = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "llama3",
                                                          "rope_theta": 5000.0, **LLAMA3}})
    assert v4 == v4_old == v5 and v5.rope_theta == 5000.0
    assert ModelConfig.from_hf(BASE).rope_theta == 10000.0   # neither field: the default


def test_llama3_frequencies_equal_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, rope_theta=5000.0,
                     rope_scaling={"rope_type": "llama3", **LLAMA3})   # 4.x and 5.x alike
    theirs = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0]
    ours = rope_inv_freq(ModelConfig.from_hf(hf))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    plain = rope_inv_freq(ModelConfig.from_hf({**BASE, "rope_theta": 5000.0}))
    assert not torch.equal(ours, plain)


def test_rope_table_is_fp32_in_half_precision_models():
    """The angles position x frequency are computed from fp32 frequencies and only cos/sin
    are cast. transformers' ``model.to(float16)`` casts its frequency buffer too, and that
    table is visibly off at long positions."""
    hf = tiny_hf("qwen3")
    fp32_table = to_dtype(tiny_hf("qwen3"), torch.float16)
    model = load_model(fp32_table)
    assert model.dtype == torch.float16 and model.inv_freq.dtype == torch.float32
    pos = torch.arange(0, 4000, 7)
    cos, sin = model.rope_cos_sin(pos)
    x = torch.zeros(1, pos.numel(), 8, dtype=torch.float16)
    hcos, hsin = fp32_table.model.rotary_emb(x, pos[None])
    assert torch.equal(cos, hcos[0]) and torch.equal(sin, hsin[0])
    fp16_table = hf.to(torch.float16)
    assert fp16_table.model.rotary_emb.inv_freq.dtype == torch.float16
    bad_cos, _ = fp16_table.model.rotary_emb(x, pos[None])
    assert (bad_cos[0] - cos).abs().max() > 0.1


@pytest.mark.parametrize("fields, named", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128},
     "sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"use_attention_sinks": True}, "use_attention_sinks"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gemma2"}, "model_type"),
])
def test_what_the_kernels_cannot_do_is_refused(fields, named):
    with pytest.raises(ValueError, match=named):
        ModelConfig.from_hf({**BASE, **fields})


def test_qwen2_ignores_an_unused_sliding_window_and_qwen3_reads_head_dim():
    assert ModelConfig.from_hf({**BASE, "model_type": "qwen2", "sliding_window": 4096,
                                "use_sliding_window": False}).qkv_bias
    q3 = ModelConfig.from_hf({**BASE, "model_type": "qwen3", "head_dim": 32})
    assert q3.head_dim == 32 and q3.qk_norm and q3.scaling == 32 ** -0.5


def test_attention_scale_is_passed_explicitly(monkeypatch, torch_kernels):
    """Qwen3 head_dim 32 with 4 heads of a 64-wide model: the kernels' default scale (from
    the query's head_dim) happens to agree here, so check the model passes its own."""
    seen = []
    for name in ("paged_prefill_attention", "paged_decode_attention"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _f=real, **k: seen.append(k.get("scale")) or _f(*a, **k))
    LLM(tiny_hf("qwen3"), block_size=4).generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    assert seen and all(s == 32 ** -0.5 for s in seen)


# ------------------------------------------------------------------------------ transformers
def test_transformers_attention_interface_hosts_our_kernels(torch_kernels):
    """transformers' own Qwen3 code, its attention replaced through AttentionInterface by a
    function that writes K/V into an arena and calls paged_prefill_attention, gives the
    logits of our model; the K it hands over (after k-norm and RoPE) is the K our model
    cached; transformers' eager attention agrees with both."""
    from transformers import AttentionInterface

    hf = tiny_hf("qwen3")
    c = ModelConfig.from_hf(hf.config)
    spec = KVSpec(c.num_layers, c.num_kv_heads, c.head_dim, block_size=4, dtype=torch.float32)
    arena = PagedArena(spec, 1 << 20, "cpu", granularity=4096, max_seqs=1)
    pool = arena.pool("hf")
    prompt = PROMPTS[2]
    n = len(prompt)
    pool.resize(spec.blocks_for(n))
    ids = pool.allocate(spec.blocks_for(n))
    pos = np.arange(n)
    slots = torch.from_numpy(ids[pos // 4] * 4 + pos % 4)
    table = torch.from_numpy(ids.astype(np.int32))[None]
    handed_k = {}

    def paged(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        q = query[0].transpose(0, 1)                 # [S, heads, head_dim]
        k, v = key[0].transpose(0, 1).contiguous(), value[0].transpose(0, 1).contiguous()
        handed_k[module.layer_idx] = k
        cache = arena.kv_cache(module.layer_idx)
        kernels.write_kv(cache, k, v, slots)
        o = kernels.paged_prefill_attention(q, cache, table, torch.tensor([n], dtype=torch.int32),
                                            torch.tensor([0, n], dtype=torch.int32), scale=scaling)
        return o[None], None

    AttentionInterface.register("kvarena_paged", paged)
    with torch.no_grad():
        eager = hf(torch.tensor([prompt]), use_cache=False).logits[0]
        if hasattr(hf, "set_attn_implementation"):
            hf.set_attn_implementation("kvarena_paged")
        else:   # transformers 4.x before set_attn_implementation
            hf.config._attn_implementation = "kvarena_paged"
        hosted = hf(torch.tensor([prompt]), use_cache=False).logits[0]
    ours, our_arena, our_ids = prefill_in_own_arena(load_model(hf), prompt)
    scale = eager.abs().max().item()
    assert (hosted - ours).abs().max().item() <= 1e-5 * scale
    assert (eager - ours).abs().max().item() <= 1e-5 * scale
    for layer in range(c.num_layers):
        torch.testing.assert_close(cached_k(our_arena, our_ids, layer, n), handed_k[layer],
                                   rtol=1e-5, atol=1e-5)
    # transformers hands over K after k-norm and RoPE; without RoPE it would differ
    m = load_model(hf)
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    x = torch.nn.functional.embedding(torch.tensor(prompt), m.params["model.embed_tokens.weight"])
    h = rms_norm(x, m.params["model.layers.0.input_layernorm.weight"], c.rms_norm_eps)
    k = (h @ m.params["0.qkv"][q_rows:q_rows + kv_rows].T).view(n, c.num_kv_heads, c.head_dim)
    k = rms_norm(k, m.params["model.layers.0.self_attn.k_norm.weight"], c.rms_norm_eps)
    assert not torch.allclose(cached_k(our_arena, our_ids, 0, n)[1:], k[1:], atol=1e-3)
