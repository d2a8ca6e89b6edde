"""GLM-130B, in-house: one file that reads top to bottom (../shared/glm130b/SPEC.md §2).

Parameter names are the official checkpoint's keys (``transformer.layers.N.attention.
query_key_value.weight`` ...), so a merged state dict loads 1:1. The arithmetic follows
SwissArmyTransformer's GLM130B op for op in float16 so that logits match THUDM's code:

* RoPE (rotate-half, whole head dim) with angles computed in float16, positions too;
* per-head interleaved QKV rows: head j owns [q_j; k_j; v_j];
* DeepNorm post-LN residual taken from the *normalised* input, alpha = sqrt(2 * layers);
* GeGLU: first half linear, second half through exact (erf) GELU;
* scores scaled by 1 / (sqrt(hn) * (layer_id + 1)), masked with -10000, softmax in float32
  after multiplying back by (layer_id + 1);
* output tied to the word embeddings, no bias;
* row-parallel layers (attention.dense, mlp.dense_4h_to_h) add their bias after the product.

Inside the layers the layout is [seq, batch, hidden], as in SAT. bfloat16 and float32 run the
same code (probabilities are cast to the model's dtype instead of float16), for CPU speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each (S, B, H, hn)


@dataclass
class GLM130BConfig:
    num_layers: int = 70
    hidden_size: int = 12288
    inner_hidden_size: int = 32768
    vocab_size: int = 150528
    num_attention_heads: int = 96
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def rotary_tables(head_dim: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """cos, sin (length, head_dim) of GLM-130B's float16 angles, cast to ``dtype``."""
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).half()
    t = torch.arange(length, dtype=torch.float16)  # float16 positions: a trap kept on purpose
    freqs = torch.einsum("i,j->ij", t, inv_freq)  # float16 angles
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RowParallelLinear(nn.Linear):
    """Megatron's row-parallel layer: the bias is added after the (all-reduced) product, so in
    float16 it is rounded twice, as SAT computes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


class Attention(nn.Module):
    def __init__(self, config: GLM130BConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        s, b, _ = x.shape
        mixed = self.query_key_value(x).view(s, b, self.num_heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)  # (s, B, H, hn) each, per-head interleaved
        pos = position_ids.transpose(0, 1)  # (s, B)
        cos_p = F.embedding(pos, cos).unsqueeze(2)  # (s, B, 1, hn)
        sin_p = F.embedding(pos, sin).unsqueeze(2)
        q = (q * cos_p) + (rotate_half(q) * sin_p)
        k = (k * cos_p) + (rotate_half(k) * sin_p)
        if past is not None:
            k = torch.cat((past[0], k), dim=0)  # (S, B, H, hn): keys cached after RoPE
            v = torch.cat((past[1], v), dim=0)
        present = (k, v)

        coeff = float(self.layer_id + 1)
        q = q / (math.sqrt(self.head_dim) * coeff)
        sq, sk = q.size(0), k.size(0)
        q = q.reshape(sq, b * self.num_heads, self.head_dim)
        k = k.reshape(sk, b * self.num_heads, self.head_dim)
        scores = torch.baddbmm(torch.empty(b * self.num_heads, sq, sk, dtype=q.dtype,
                                           device=q.device),
                               q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2),
                               beta=0.0, alpha=1.0).view(b, self.num_heads, sq, sk)
        if not (mask.shape[-2] == 1 and bool(mask.all())):
            scores.masked_fill_(mask, -10000.0)  # (B, 1, sq, sk) True = masked
        probs = F.softmax(scores.float() * coeff, dim=-1).to(x.dtype)
        v = v.reshape(sk, b * self.num_heads, self.head_dim)
        context = torch.bmm(probs.view(b * self.num_heads, sq, sk), v.transpose(0, 1))
        context = context.view(b, self.num_heads, sq, self.head_dim).permute(2, 0, 1, 3)
        context = context.contiguous().view(sq, b, self.num_heads * self.head_dim)
        return self.dense(context), present


class MLP(nn.Module):
    def __init__(self, config: GLM130BConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.inner_hidden_size)
        self.dense_4h_to_h = RowParallelLinear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dense_h_to_4h(x).chunk(2, dim=x.ndim - 1)
        return self.dense_4h_to_h(x1 * F.gelu(x2))  # GeGLU, exact erf GELU on the second half


class Layer(nn.Module):
    def __init__(self, config: GLM130BConfig, layer_id: int) -> None:
        super().__init__()
        self.alpha = (2 * config.num_layers) ** 0.5
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = Attention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size,
                                                     eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attention_input = self.input_layernorm(x)
        attention_output, present = self.attention(attention_input, cos, sin, position_ids,
                                                   mask, past)
        x = attention_input * self.alpha + attention_output  # DeepNorm on the normalised input
        mlp_input = self.post_attention_layernorm(x)
        return mlp_input * self.alpha + self.mlp(mlp_input), present


class Transformer(nn.Module):
    def __init__(self, config: GLM130BConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GLM130B(nn.Module):
    def __init__(self, config: GLM130BConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotary(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.transformer.word_embeddings.weight.dtype
        cached = self._rotary
        if (cached is None or cached[0].size(0) < length or cached[0].dtype != dtype
                or cached[0].device != device):
            length = max(length, self.config.max_sequence_length)
            cos, sin = rotary_tables(self.config.head_dim, length, dtype)
            self._rotary = cached = (cos.to(device), sin.to(device))
        return cached

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past: KVCache | None = None,
                output_hidden: bool = False) -> tuple[torch.Tensor, KVCache, list[torch.Tensor]]:
        """input_ids, position_ids (B, T); attention_mask (B or 1, 1, T, S) bool, True = masked;
        past: the KV cache of the S - T earlier tokens. Returns logits (B, T, V), the new
        cache, and (with output_hidden) every layer's output (T, B, hidden)."""
        x = self.transformer.word_embeddings(input_ids).transpose(0, 1)  # (T, B, h)
        cos, sin = self.rotary(int(position_ids.max()) + 1, x.device)
        presents: KVCache = []
        hidden: list[torch.Tensor] = []
        for i, layer in enumerate(self.transformer.layers):
            x, present = layer(x, cos, sin, position_ids, attention_mask,
                               past[i] if past is not None else None)
            presents.append(present)
            if output_hidden:
                hidden.append(x)
        x = self.transformer.final_layernorm(x)
        logits = F.linear(x, self.transformer.word_embeddings.weight)  # tied, no bias
        return logits.transpose(0, 1).contiguous(), presents, hidden
