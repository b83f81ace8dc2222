"""One frozen config for every GPT-style family.

Families differ only in these fields (and in their weight-name maps), never in model code. The
translation from / to HF `config.json` lives with each family in `jaxedit.models.families`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["gpt2", "gptj", "gpt_neox", "llama"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Dimension names: V vocab, D width, L layers, H query heads, G key/value heads,
    K head dim, F MLP width, P max positions.
    """

    model_type: str  # the HF model_type we came from / export to
    family: Family
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # G (grouped-query attention when G < H)
    head_dim: int  # K
    d_ff: int  # F
    max_positions: int  # P
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Literal["gelu_new", "gelu", "silu", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU: down(act(gate x) * up x)
    positional: Literal["learned", "rotary"] = "rotary"
    rotary_dim: int = 0  # rotated dims per head (partial rotary for GPT-J / NeoX)
    rotary_style: Literal["half", "interleaved"] = "half"  # NeoX/Llama rotate-half, GPT-J pairs
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # ("rope_type", "llama3"), ...
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)
    shared_parallel_norm: bool = False  # GPT-J: the MLP reads ln1 too (no ln2)
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def n_params_estimate(self) -> int:
        D, F, L, V = self.d_model, self.d_ff, self.n_layers, self.vocab_size
        attn = D * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = D * F * (3 if self.gated_mlp else 2)
        return L * (attn + mlp) + V * D * (1 if self.tie_embeddings else 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
        return cls(**d)
