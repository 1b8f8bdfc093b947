"""A Llama-3 forward pass in plain torch over a static KV cache: batched prefill of packed prompts, and a decode step
whose shapes are fixed per (batch, cache length) bucket so that it can be captured in a CUDA graph.

Why not transformers: its continuous-batching manager (``reference_engine.CBEngine``) runs sdpa without CUDA graphs
and is CPU-bound at ~75 ms a token on an H100 (README), so its decode power is close to idle. This module is the
arithmetic of the same random-init Llama-3-8B-shaped model (the layout, RMSNorm, rotary embedding, grouped-query
attention and SwiGLU of transformers' ``LlamaForCausalLM``; tests/test_graph_engine.py checks the greedy tokens
against it) written so that a decode step is one fixed sequence of kernels:

- **KV cache**: per layer ``[slots, kv_heads, max_len, head_dim]``. A request owns one slot (a row) for its life.
  The decode step for bucket ``(B, L)`` runs rows ``[0, B)`` over cache positions ``[0, L)``: rows nobody owns are
  computed and ignored, positions past a row's length are masked. Slots are handed out lowest first, so ``B`` stays
  near the number of requests; ``L`` is the smallest bucket that holds the longest row, so attention reads what is
  there, not the whole cache.
- **Decode inputs and outputs** live in fixed buffers (``in_tokens``, ``in_positions``; ``out_tokens``,
  ``out_logprobs``): a captured graph reads and writes the same addresses on every replay.
- **Prefill** packs the group's prompts into one token axis for every matrix product (no padding work) and pads
  only for attention (``scaled_dot_product_attention``, causal, per sequence). Only the last position of each prompt
  goes through the LM head.
- **Precision**: ``bf16``, ``fp16``, ``fp32`` (weights, activations and cache in that type; fp32 matrix products
  without TF32, torch's default), and ``fp8``: the transformer layers' weights in float8 e4m3 with one scale per
  matrix and activations quantized per tensor on the fly (``torch._scaled_mm``, Hopper's fp8 tensor cores); the
  embedding, LM head, norms and cache stay bf16.

Greedy decoding only; the log-probability of the chosen token is returned with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.gpu.reference_engine import ModelShape

DTYPES = ("bf16", "fp16", "fp32", "fp8")
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INIT_STD = 0.02  # transformers' initializer_range for Llama
RMS_EPS = 1e-5


def activation_dtype(dtype: str) -> torch.dtype:
    """The dtype of activations, KV cache, embedding and LM head for a model of precision ``dtype``."""
    if dtype not in _TORCH_DTYPE:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return _TORCH_DTYPE[dtype]


@dataclass(frozen=True, slots=True)
class Fp8Weight:
    """A weight matrix ``[out, in]`` in float8 e4m3 and the float32 scale that gives it back: w ~ data x scale."""

    data: torch.Tensor
    scale: torch.Tensor


Weight = torch.Tensor | Fp8Weight


def quantize_fp8(w: torch.Tensor) -> Fp8Weight:
    scale = (w.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    data = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(data, scale)


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """``x @ w.T``; for an fp8 weight, ``x`` is quantized per tensor and multiplied on the fp8 tensor cores."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xf = x2.float()
    x_scale = (xf.abs().amax() / FP8_MAX).clamp(min=1e-12)
    xq = (xf / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, w.data.t(), scale_a=x_scale, scale_b=w.scale, out_dtype=x.dtype)
    return y.reshape(*lead, y.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm (the mean square in float32, back to the input's dtype, times the weight) as torch's
    own ``rms_norm``, which computes it the same way and is one fused kernel on a GPU."""
    return F.rms_norm(x, (x.shape[-1],), weight, RMS_EPS)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


@dataclass(frozen=True, slots=True)
class Layer:
    attn_norm: torch.Tensor
    qkv: Weight  # [heads x hd + 2 x kv_heads x hd, hidden]: q, k, v stacked
    o: Weight
    mlp_norm: torch.Tensor
    gate_up: Weight  # [2 x intermediate, hidden]: gate, up stacked
    down: Weight


class StaticLlama:
    """Random-init weights, the KV cache and the decode buffers of one model on one device."""

    def __init__(
        self,
        shape: ModelShape,
        *,
        dtype: str = "bf16",
        device: str = "cuda",
        slots: int = 64,
        max_len: int = 2048,
        seed: int = 0,
    ) -> None:
        if shape.hidden_size % shape.num_attention_heads or shape.num_attention_heads % shape.num_key_value_heads:
            raise ValueError("hidden_size must divide into heads, and heads into kv_heads")
        if max_len > shape.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {shape.max_position_embeddings}")
        self.shape = shape
        self.dtype = dtype
        self.act = activation_dtype(dtype)
        self.device = torch.device(device)
        self.slots = slots
        self.max_len = max_len
        self.heads = shape.num_attention_heads
        self.kv_heads = shape.num_key_value_heads
        self.head_dim = shape.hidden_size // shape.num_attention_heads
        self.group = self.heads // self.kv_heads
        self.scale = self.head_dim**-0.5
        gen = torch.Generator(device=self.device).manual_seed(seed)
        h, i, hd = shape.hidden_size, shape.intermediate_size, self.head_dim
        qkv_out = (self.heads + 2 * self.kv_heads) * hd

        def matrix(rows: int, cols: int, quantize: bool) -> Weight:
            w = torch.empty(rows, cols, dtype=self.act, device=self.device).normal_(0.0, INIT_STD, generator=gen)
            return quantize_fp8(w) if quantize else w

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=self.act, device=self.device)

        fp8 = dtype == "fp8"
        self.embed = matrix(shape.vocab_size, h, False)
        self.layers = [
            Layer(
                attn_norm=ones(h),
                qkv=matrix(qkv_out, h, fp8),
                o=matrix(h, self.heads * hd, fp8),
                mlp_norm=ones(h),
                gate_up=matrix(2 * i, h, fp8),
                down=matrix(h, i, fp8),
            )
            for _ in range(shape.num_hidden_layers)
        ]
        self.final_norm = ones(h)
        self.lm_head = matrix(shape.vocab_size, h, False)
        cache = (slots, self.kv_heads, max_len, hd)
        self.k_cache = [torch.zeros(cache, dtype=self.act, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(cache, dtype=self.act, device=self.device) for _ in self.layers]
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.act).to(self.device)
        self.sin = emb.sin().to(self.act).to(self.device)
        self.positions = torch.arange(max_len, device=self.device)
        self.rows = torch.arange(slots, device=self.device)
        self.in_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.in_positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.out_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.out_logprobs = torch.zeros(slots, dtype=torch.float32, device=self.device)

    # --- sizes ---

    def parameters(self) -> int:
        def n(w: Weight) -> int:
            return (w.data if isinstance(w, Fp8Weight) else w).numel()

        per_layer = sum(n(getattr(self.layers[0], f)) for f in Layer.__dataclass_fields__) if self.layers else 0
        return n(self.embed) + n(self.lm_head) + n(self.final_norm) + per_layer * len(self.layers)

    def weight_bytes(self) -> int:
        def b(w: Weight) -> int:
            t = w.data if isinstance(w, Fp8Weight) else w
            return t.numel() * t.element_size()

        total = b(self.embed) + b(self.lm_head) + b(self.final_norm)
        return total + sum(b(getattr(layer, f)) for layer in self.layers for f in Layer.__dataclass_fields__)

    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * torch.finfo(self.act).bits // 8

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        """The weights under transformers' ``LlamaForCausalLM`` names (not for fp8), for the parity test."""
        if self.dtype == "fp8":
            raise ValueError("fp8 weights have no transformers counterpart here")
        h, hd = self.shape.hidden_size, self.head_dim
        out: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": self.embed,
            "model.norm.weight": self.final_norm,
            "lm_head.weight": self.lm_head,
        }
        for k, layer in enumerate(self.layers):
            assert isinstance(layer.qkv, torch.Tensor) and isinstance(layer.gate_up, torch.Tensor)
            p = f"model.layers.{k}."
            q_rows, kv_rows = self.heads * hd, self.kv_heads * hd
            out[p + "input_layernorm.weight"] = layer.attn_norm
            out[p + "self_attn.q_proj.weight"] = layer.qkv[:q_rows]
            out[p + "self_attn.k_proj.weight"] = layer.qkv[q_rows : q_rows + kv_rows]
            out[p + "self_attn.v_proj.weight"] = layer.qkv[q_rows + kv_rows :]
            out[p + "self_attn.o_proj.weight"] = layer.o  # type: ignore[assignment]
            out[p + "post_attention_layernorm.weight"] = layer.mlp_norm
            half = layer.gate_up.shape[0] // 2
            out[p + "mlp.gate_proj.weight"] = layer.gate_up[:half]
            out[p + "mlp.up_proj.weight"] = layer.gate_up[half:]
            out[p + "mlp.down_proj.weight"] = layer.down  # type: ignore[assignment]
        assert h == self.heads * hd
        return out

    # --- the two passes ---

    def _qkv(self, x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k (both rotated, in one pass) and v of tokens ``x`` ``[n, hidden]``: ``[n, heads | kv_heads, hd]``."""
        hd, n = self.head_dim, x.shape[0]
        qkv = linear(rms_norm(x, layer.attn_norm), layer.qkv)
        k_end = (self.heads + self.kv_heads) * hd
        qk = rope(qkv[:, :k_end].view(n, self.heads + self.kv_heads, hd), cos, sin)
        v = qkv[:, k_end:].view(n, self.kv_heads, hd)
        return qk[:, : self.heads], qk[:, self.heads :], v

    def _mlp(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        gate_up = linear(rms_norm(x, layer.mlp_norm), layer.gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return linear(F.silu(gate) * up, layer.down)

    def _pick(self, x_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(rms_norm(x_last, self.final_norm), self.lm_head).float()
        best = logits.max(dim=-1)
        return best.indices, best.values - torch.logsumexp(logits, dim=-1)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> tuple[list[int], list[float]]:
        """Run the prompts (each into its slot's cache from position 0) as one packed batch; return each one's first
        generated token and its log-probability. Every prompt must be non-empty and fit the cache."""
        if len(prompts) != len(slots) or not prompts:
            raise ValueError("one slot per prompt, at least one prompt")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.max_len:
            raise ValueError(f"prompt lengths must be in [1, {self.max_len}], got {min(lengths)}..{max(lengths)}")
        dev = self.device
        g, lmax = len(prompts), max(lengths)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
        lens = torch.tensor(lengths, dtype=torch.long, device=dev)
        seq = torch.repeat_interleave(torch.arange(g, device=dev), lens)
        starts = torch.cumsum(lens, 0) - lens
        pos = torch.arange(ids.shape[0], device=dev) - starts[seq]
        slot = torch.tensor(slots, dtype=torch.long, device=dev)[seq]
        last = starts + lens - 1
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        hd = self.head_dim
        x = F.embedding(ids, self.embed)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            q, k, v = self._qkv(x, layer, cos, sin)
            kc[slot, :, pos] = k
            vc[slot, :, pos] = v
            qp = torch.zeros(g, self.heads, lmax, hd, dtype=self.act, device=dev)
            kp = torch.zeros(g, self.kv_heads, lmax, hd, dtype=self.act, device=dev)
            vp = torch.zeros_like(kp)
            qp[seq, :, pos] = q
            kp[seq, :, pos] = k
            vp[seq, :, pos] = v
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=self.group > 1)
            x = x + linear(o[seq, :, pos].reshape(ids.shape[0], self.heads * hd), layer.o)
            x = x + self._mlp(x, layer)
        tokens, logprobs = self._pick(x[last])
        return tokens.tolist(), logprobs.tolist()

    def decode_step(self, batch: int, length: int) -> None:
        """One token for rows ``[0, batch)``: row r feeds ``in_tokens[r]`` at position ``in_positions[r]`` (written to
        the cache there) and attends to cache positions ``[0, in_positions[r]]`` within the first ``length``;
        ``out_tokens[r]`` and ``out_logprobs[r]`` get its next token. Fixed shapes for fixed (batch, length)."""
        tok, pos, rows = self.in_tokens[:batch], self.in_positions[:batch], self.rows[:batch]
        masked = (self.positions[:length].unsqueeze(0) > pos.unsqueeze(1)).view(batch, 1, 1, length)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        hidden = self.heads * self.head_dim
        x = F.embedding(tok, self.embed)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            q, k, v = self._qkv(x, layer, cos, sin)
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            keys, values = kc[:batch, :, :length], vc[:batch, :, :length]
            qg = (q * self.scale).view(batch, self.kv_heads, self.group, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).masked_fill(masked, -math.inf)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.act)
            x = x + linear(torch.matmul(probs, values).reshape(batch, hidden), layer.o)
            x = x + self._mlp(x, layer)
        tokens, logprobs = self._pick(x)
        self.out_tokens[:batch].copy_(tokens)
        self.out_logprobs[:batch].copy_(logprobs)

    def describe(self) -> dict[str, Any]:
        return {
            "shape": self.shape.name,
            "dtype": self.dtype,
            "parameters": self.parameters(),
            "weight_gb": round(self.weight_bytes() / 1e9, 2),
            "kv_slots": self.slots,
            "max_len": self.max_len,
            "kv_gb": round(self.kv_bytes_per_token() * self.slots * self.max_len / 1e9, 2),
        }
