"""The embedded engine's decoder: the Llama family's forward written out over transformers'
own parameters, with a KV cache allocated once per batch.

What SGLang and vLLM do with their own model code, for the architectures the trainer builds
(RMSNorm, RoPE, grouped-query attention, SwiGLU; Qwen2's QKV bias, Qwen3's QK norm, tied
embeddings): the q/k/v and gate/up projections are one matmul each, the cache is written in
place and no per-step attention mask or cache object is built. At rollout batch sizes on a CPU
a transformers decoding step is mostly the per-module overhead around small matmuls; this
forward computes the same thing with fewer, larger operations (`benchmarks/README.md` has the
measured ratio). Its logits equal transformers' to float rounding (tests/test_fast_decode.py).

`fuse(model)` makes each layer's q/k/v (and gate/up) weights views into one tensor, so weight
updates copied into the HF parameters land in the fused ones with no further copy. A model
this does not cover (`unsupported(config)` says why) decodes through transformers.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
# Rope types whose inverse frequencies are fixed at build time (dynamic ones rescale per call).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported(config) -> Optional[str]:
    """Why transformers' model with this config cannot decode here (None: it can)."""
    kind = getattr(config, "model_type", None)
    if kind not in _ARCHITECTURES:
        return f"model_type {kind!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
            or {})
    if not isinstance(rope, dict):
        return f"rope parameters {rope!r}"
    if rope.get("rope_type", rope.get("type", "default")) not in _STATIC_ROPE:
        return f"rope_type {rope.get('rope_type')!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "a sliding attention window"
    return None


def fuse(model: torch.nn.Module) -> List[Dict[str, Optional[torch.Tensor]]]:
    """Back each layer's q/k/v weights (and biases) and gate/up weights (and biases) by one
    tensor, the parameters becoming views into it: updates copied into the parameters land in
    the fused tensors, which the `Decoder` reads. Returns them per layer."""
    fused = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = [a.q_proj, a.k_proj, a.v_proj], [mlp.gate_proj, mlp.up_proj]
        fused.append({"qkv": _fuse(qkv, "weight"), "qkv_bias": _fuse(qkv, "bias"),
                      "gate_up": _fuse(gate_up, "weight"),
                      "gate_up_bias": _fuse(gate_up, "bias")})
    return fused


def _fuse(linears, attr: str) -> Optional[torch.Tensor]:
    parts = [getattr(m, attr) for m in linears]
    if parts[0] is None:
        return None
    joined = torch.cat([p.data for p in parts])
    start = 0
    for p in parts:
        p.data = joined[start:start + p.shape[0]]
        start += p.shape[0]
    return joined


class Decoder:
    """One batch's decode over `model` (fused): `prefill` the left-padded prompts, then `step`
    one token per row; `select` keeps a subset of rows (finished ones dropped)."""

    def __init__(self, model: torch.nn.Module, fused, batch: int, max_len: int):
        """fused: `fuse(model)`'s tensors; batch, max_len: the cache's rows and positions."""
        cfg = model.config
        inner = model.model
        self.eps = cfg.rms_norm_eps
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.embed, self.norm = inner.embed_tokens.weight, inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.layers = []
        for layer, joined in zip(inner.layers, fused):
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                joined, w_in=layer.input_layernorm.weight,
                w_post=layer.post_attention_layernorm.weight,
                o=a.o_proj.weight, o_bias=a.o_proj.bias,
                q_norm=getattr(getattr(a, "q_norm", None), "weight", None),
                k_norm=getattr(getattr(a, "k_norm", None), "weight", None),
                down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias))
        dtype, dev = self.embed.dtype, self.embed.device
        shape = (batch, self.nkv, max_len, self.hd)
        self.cache = [(torch.empty(shape, dtype=dtype, device=dev),
                       torch.empty(shape, dtype=dtype, device=dev)) for _ in self.layers]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        self.length = 0

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
                ) -> torch.Tensor:
        """ids, mask, positions [B, S] (left-padded) -> the last position's logits [B, V]."""
        s = ids.shape[1]
        self.valid[:, :s] = mask.bool()
        causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        # A pad position may see itself: no query row is fully masked (that would be NaN).
        allowed = (causal & self.valid[:, None, :s]) | torch.eye(s, dtype=torch.bool,
                                                                device=ids.device)
        return self._forward(ids, positions, allowed[:, None])

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B] -> the next logits [B, V]."""
        self.valid[:, self.length] = True
        allowed = self.valid[:, None, None, :self.length + 1]
        return self._forward(tokens[:, None], positions[:, None], allowed)

    def select(self, rows: torch.Tensor) -> None:
        self.cache = [(k[rows], v[rows]) for k, v in self.cache]
        self.valid = self.valid[rows]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # transformers' order: normalise in fp32, back to the input dtype, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor
                 ) -> torch.Tensor:
        b, s = ids.shape
        start, end = self.length, self.length + s
        x = F.embedding(ids, self.embed)
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype)[:, None]  # [B, 1, S, D]
        sin = (emb.sin() * self.rope_scale).to(x.dtype)[:, None]
        nh, nkv, hd = self.nh, self.nkv, self.hd
        for layer, (keys, values) in zip(self.layers, self.cache):
            h = self._rms(x, layer["w_in"])
            q, k, v = F.linear(h, layer["qkv"], layer["qkv_bias"]).split(
                [nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = q.view(b, s, nh, hd)
            k = k.view(b, s, nkv, hd)
            if layer["q_norm"] is not None:  # Qwen3: RMSNorm over each head
                q, k = self._rms(q, layer["q_norm"]), self._rms(k, layer["k_norm"])
            q = self._rope(q.transpose(1, 2), cos, sin)
            keys[:, :, start:end] = self._rope(k.transpose(1, 2), cos, sin)
            values[:, :, start:end] = v.view(b, s, nkv, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end],
                                               attn_mask=allowed, enable_gqa=nh != nkv)
            x = x + F.linear(o.transpose(1, 2).reshape(b, s, nh * hd), layer["o"],
                             layer["o_bias"])
            h = self._rms(x, layer["w_post"])
            gate, up = F.linear(h, layer["gate_up"], layer["gate_up_bias"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["down"], layer["down_bias"])
        self.length = end
        return F.linear(self._rms(x[:, -1], self.norm), self.lm_head)

