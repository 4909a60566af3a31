"""The decoder: pre-norm RMSNorm, rotary embeddings (Hugging Face `rotate_half` layout), grouped-query attention
through `F.scaled_dot_product_attention` (packed rows on a GPU: variable-length flash attention), SwiGLU MLP, and a
preallocated KV cache.

Parameter names follow Hugging Face Llama (`model.layers.0.self_attn.q_proj.weight`, ...), so Llama / Qwen2 weights
load unchanged and LoRA target names match PEFT's.
"""
from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .loss import CHUNK_LOGITS, linear_cross_entropy

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_ARGS = inspect.signature(varlen_attn).parameters
    _VARLEN_CAUSAL = {"is_causal": True} if "is_causal" in _VARLEN_ARGS else {"window_size": (-1, 0)}
except ImportError:
    varlen_attn, _VARLEN_ARGS = None, {}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight (as HF Llama / Qwen2 do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [positions, head_dim]: theta_i = base^(-2i/d), features duplicated ([f, f]) as in HF's
    rotate_half layout, fp32. Tables, not cos/sin of each call's positions: a compiled graph would otherwise fuse the
    trigonometry into every attention layer's rotary kernel, forward and backward (~9% of a `small` training step)."""

    def __init__(self, head_dim: int, base: float, max_positions: int):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._build(max_positions, device=None)

    def _build(self, positions: int, device: torch.device | None) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.base ** exponents)
        freqs = torch.arange(positions, device=device).float()[:, None] * inv_freq  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def reset(self, device: torch.device) -> None:
        """Recompute the tables after the module was built on the meta device."""
        self._build(len(self.cos), device)

    def extend(self, positions: int) -> None:
        """Grow the tables to cover `positions` (a cache longer than max_position_embeddings)."""
        if positions > len(self.cos):
            self._build(positions, self.cos.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[position_ids].to(dtype)[:, None], self.sin[position_ids].to(dtype)[:, None]  # [B, 1, T, D]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values, one [batch, kv_heads, max_len, head_dim] pair per layer.

    `length` counts the positions already written; a forward pass writes its T new positions at
    [length, length + T) in every layer and then advances `length` by T. A forward given `cache_position` instead
    (static shapes, for compiled / CUDA-graph decoding) writes at those positions, attends over the whole buffer
    under a mask, and leaves `length` alone. Separate tensors per layer (not slices of one) let a compiled step
    update them in place instead of copying the whole cache every step.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        for t in (*self.k, *self.v):  # fixed addresses let CUDA graphs capture the in-place writes
            torch._dynamo.mark_static_address(t)
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.k[layer], self.v[layer]
        if cache_position is not None:  # static shapes: write at a position tensor, attend over the whole buffer
            k_cache.index_copy_(2, cache_position, k)
            v_cache.index_copy_(2, cache_position, v)
            return k_cache, v_cache
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        return k_cache[:, :, :end], v_cache[:, :, :end]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        qkv_bias = config.qkv_bias or config.attention_bias
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.o_proj = nn.Linear(d, d, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, cache_position: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(mask, Packed):
            return self.o_proj(packed_attention(q, k, v, mask).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)
        # No mask: plain causal over the T new tokens (training, a prefill), or a single new token seeing the whole
        # cache. Without a cache it is causal whatever T is (one token alone is both), which keeps it a Python bool when
        # T is symbolic (dynamic shapes): SDPA refuses a SymBool, and a checkpointed block's graph would break there.
        is_causal = mask is None and (cache is None or T > 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query, key and value projections of x (a subclass may compute them jointly)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, cache_position=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm: HF's `model.` prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes (packed rows)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.cummax(idx * starts, dim=1).values


class Packed(NamedTuple):
    """Packed rows for variable-length attention, in place of a mask: where each sequence of the flattened [B x T]
    rows starts (int32 [N + 1], the last entry B x T). A sequence attends causally within itself."""

    cu_seqlens: torch.Tensor


def packed_sequences(segment_ids: torch.Tensor) -> Packed:
    """The sequences of packed rows: a new one wherever the segment id changes, and at each row's start."""
    B, T = segment_ids.shape
    flat = segment_ids.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::T] = True
    begin = starts.nonzero().flatten()
    return Packed(torch.cat([begin, begin.new_full((1,), B * T)]).to(torch.int32))


def varlen_usable(device: torch.device, dtype: torch.dtype, grouped: bool) -> bool:
    """Flash attention over variable-length sequences: on CUDA, in (or autocast to) 16 bits, grouped queries only
    where this torch's kernel takes them."""
    if varlen_attn is None or device.type != "cuda" or (grouped and "enable_gqa" not in _VARLEN_ARGS):
        return False
    half = (torch.bfloat16, torch.float16)
    return dtype in half or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Causal attention inside each packed sequence: q [B, H, T, D], k / v [B, H_kv, T, D] -> [B, T, H, D]."""
    B, H, T, D = q.shape
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(B * T, t.shape[1], D).to(dtype)

    extra = {"enable_gqa": True} if k.shape[1] != H else {}
    y = varlen_attn(flat(q), flat(k), flat(v), packed.cu_seqlens, packed.cu_seqlens, T, T, **_VARLEN_CAUSAL, **extra)
    return y.view(B, T, H, D)


def build_mask(T: int, past: int, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
               device: torch.device) -> torch.Tensor:
    """Boolean [B or 1, 1, T, past + T] mask: causal, minus padded keys, minus keys of other segments.

    Every query keeps its own position, so a padded query attends to itself instead of to nothing (a row of all
    -inf would give NaN); its output is never used.
    """
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask | (k_pos == q_pos)[None, None]


class Transformer(nn.Module):
    """Decoder-only language model. `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.loss_chunk_logits = CHUNK_LOGITS  # logits materialized at a time by the fused loss (model/loss.py)
        self.z_loss = 0.0  # the training loss adds z_loss x logsumexp^2 per token (PretrainConfig.z_loss)
        if self.model.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, 0.02), zero biases, unit norms; the residual projections (o_proj, down_proj) get the std
        scaled by 1/sqrt(2 * layers) (GPT-2) so depth keeps the residual stream's variance in check."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for layer in self.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.mul_(1 / math.sqrt(2 * self.config.num_hidden_layers))

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the embedding (and an untied head) to `vocab_size` rows for tokens added to the tokenizer; new rows
        start at the mean of the old ones, so a new token begins as an average token rather than noise."""
        old = self.model.embed_tokens.weight
        if vocab_size <= old.shape[0]:
            return

        def grown(weight: torch.Tensor) -> nn.Parameter:
            extra = weight.mean(0, keepdim=True).expand(vocab_size - weight.shape[0], -1)
            return nn.Parameter(torch.cat([weight, extra]), requires_grad=weight.requires_grad)
        self.model.embed_tokens.weight = grown(old)
        self.model.embed_tokens.num_embeddings = vocab_size
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.model.embed_tokens.weight
        max_len = max_len or self.config.max_position_embeddings
        self.model.rotary.extend(max_len)
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                cache_position: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, vocab], or the mean cross-entropy when `labels` is given.

        labels: already shifted (labels[b, t] is the target after input t); IGNORE_INDEX (-100) is skipped.
        attention_mask: [B, past + T], 1 for real tokens and 0 for padding (left or right), HF semantics.
        segment_ids: [B, T] packed rows; attention stays inside a segment and positions restart per segment.
        cache: a KVCache; the T new tokens are written after its `length` positions, which then advances.
        cache_position: [T] absolute slots for the new tokens in a static-shape decode step (see KVCache); then
        attention_mask, if given, covers the whole cache buffer.
        logits_to_keep: when > 0, logits only for the last that many positions (a prefill needs one: projecting a
        long prompt onto a 152k vocabulary is most of its cost).
        """
        if cache_position is not None:
            return self._static_step(input_ids, cache, cache_position, attention_mask, logits_to_keep)
        T = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        position_ids, mask = self._positions_and_mask(input_ids, past, attention_mask, position_ids, segment_ids)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        if labels is not None:
            return self.norm_loss(x, labels)  # the final norm, then the head fused with the loss
        return self.lm_head(self.model.norm(x[:, -logits_to_keep:] if logits_to_keep else x))

    def _positions_and_mask(self, input_ids: torch.Tensor, past: int, attention_mask: torch.Tensor | None,
                            position_ids: torch.Tensor | None, segment_ids: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each new token's position, and the attention mask (None when plain causal attention is exact; `Packed`
        sequences for packed rows where variable-length attention runs)."""
        B, T = input_ids.shape
        if position_ids is None:
            if segment_ids is not None:
                position_ids = segment_positions(segment_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        self.model.rotary.extend(past + T)
        grouped = self.config.num_key_value_heads != self.config.num_attention_heads
        if (segment_ids is not None and attention_mask is None and past == 0
                and varlen_usable(input_ids.device, self.model.embed_tokens.weight.dtype, grouped)):
            return position_ids, packed_sequences(segment_ids)
        needs_mask = attention_mask is not None or segment_ids is not None or (past > 0 and T > 1)
        mask = build_mask(T, past, attention_mask, segment_ids, input_ids.device) if needs_mask else None
        return position_ids, mask

    def _static_step(self, input_ids: torch.Tensor, cache: KVCache, cache_position: torch.Tensor,
                     attention_mask: torch.Tensor | None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits for T new tokens at slots `cache_position`, with shapes fixed by the cache (no host syncs)."""
        B, T = input_ids.shape
        k_pos = torch.arange(cache.max_len, device=input_ids.device)
        mask = (k_pos[None, :] <= cache_position[:, None])[None, None]  # [1, 1, T, max_len]
        if attention_mask is None:
            position_ids = cache_position.expand(B, T)
        else:  # left padding: a token's position counts the real tokens before it
            mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos[None, :] == cache_position[:, None])
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, cache_position)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, cache_position)
        return self.lm_head(self.model.norm(x[:, -logits_to_keep:] if logits_to_keep else x))

    def norm_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model.norm(x), labels)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy in fp32 over labelled positions (0 when none is labelled; no host sync), fused
        with the lm_head a chunk of tokens at a time (model/loss.py): the full logits are never materialized. In
        training mode it adds the z-loss, if any; evaluation measures plain cross-entropy."""
        z_loss = self.z_loss if self.training else 0.0
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, self.loss_chunk_logits, z_loss)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
