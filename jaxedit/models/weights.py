"""The declarative HF <-> jaxedit weight map, one table per family.

Each `Entry` names one HF tensor, the jaxedit param paths it fills (inside `params`, with the
layer index for stacked block params) and a pair of small functions converting between the
HF layout (torch `Linear`: [out, in]) and ours ([in, out] kernels). Loading and exporting are
the same table read in the two directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from jaxedit.models.config import ModelConfig

Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    hf: str
    paths: tuple[Path_, ...]
    layer: int | None
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]


def _t(a: np.ndarray) -> tuple[np.ndarray, ...]:
    # A view: the loader copies it into its stacked buffer anyway (one copy, not two).
    return (a.T,)


def _t_back(parts: tuple[np.ndarray, ...]) -> np.ndarray:
    return np.ascontiguousarray(parts[0].T)


def _id(a: np.ndarray) -> tuple[np.ndarray, ...]:
    return (a,)


def _id_back(parts: tuple[np.ndarray, ...]) -> np.ndarray:
    return parts[0]


def _linear(hf: str, path: Path_, layer: int | None, bias: bool) -> list[Entry]:
    out = [Entry(f"{hf}.weight", (path + ("kernel",),), layer, _t, _t_back)]
    if bias:
        out.append(Entry(f"{hf}.bias", (path + ("bias",),), layer, _id, _id_back))
    return out


def _norm(hf: str, path: Path_, layer: int | None, bias: bool, scale_name="weight") -> list[Entry]:
    out = [Entry(f"{hf}.{scale_name}", (path + ("scale",),), layer, _id, _id_back)]
    if bias:
        out.append(Entry(f"{hf}.bias", (path + ("bias",),), layer, _id, _id_back))
    return out


B = ("blocks",)


def _gpt2(cfg: ModelConfig) -> Iterator[Entry]:
    D = cfg.d_model
    # Conv1D weights are stored [in, out] already; c_attn fuses q, k, v along `out`.
    split3 = lambda a: tuple(np.ascontiguousarray(x) for x in np.split(a, 3, axis=-1))
    join3 = lambda parts: np.concatenate(parts, axis=-1)
    yield Entry("transformer.wte.weight", (("embed",),), None, _id, _id_back)
    yield Entry("transformer.wpe.weight", (("pos_embed",),), None, _id, _id_back)
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}"
        yield from _norm(f"{p}.ln_1", B + ("ln1",), i, True)
        yield from _norm(f"{p}.ln_2", B + ("ln2",), i, True)
        qkv = tuple(B + ("attn", n, "kernel") for n in "qkv")
        yield Entry(f"{p}.attn.c_attn.weight", qkv, i, split3, join3)
        qkv_b = tuple(B + ("attn", n, "bias") for n in "qkv")
        yield Entry(f"{p}.attn.c_attn.bias", qkv_b, i, split3, join3)
        for hf, ours in (
            ("attn.c_proj", ("attn", "o")),
            ("mlp.c_fc", ("mlp", "up")),
            ("mlp.c_proj", ("mlp", "down")),
        ):
            yield Entry(f"{p}.{hf}.weight", (B + ours + ("kernel",),), i, _id, _id_back)
            yield Entry(f"{p}.{hf}.bias", (B + ours + ("bias",),), i, _id, _id_back)
    yield from _norm("transformer.ln_f", ("final_norm",), None, True)
    del D


def _gptj(cfg: ModelConfig) -> Iterator[Entry]:
    yield Entry("transformer.wte.weight", (("embed",),), None, _id, _id_back)
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}"
        yield from _norm(f"{p}.ln_1", B + ("ln1",), i, True)
        for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
            yield from _linear(f"{p}.attn.{hf}", B + ("attn", ours), i, False)
        yield from _linear(f"{p}.mlp.fc_in", B + ("mlp", "up"), i, True)
        yield from _linear(f"{p}.mlp.fc_out", B + ("mlp", "down"), i, True)
    yield from _norm("transformer.ln_f", ("final_norm",), None, True)
    yield from _linear("lm_head", ("lm_head",), None, True)


def _gpt_neox(cfg: ModelConfig) -> Iterator[Entry]:
    H, K = cfg.n_heads, cfg.head_dim

    # query_key_value rows are laid out per head: [H, (q|k|v), K] -> three [D, H*K] kernels.
    def split_w(a):
        a = a.reshape(H, 3, K, -1)
        return tuple(np.ascontiguousarray(a[:, j].reshape(H * K, -1).T) for j in range(3))

    def join_w(parts):
        return np.stack([p.T.reshape(H, K, -1) for p in parts], 1).reshape(3 * H * K, -1)

    def split_b(a):
        a = a.reshape(H, 3, K)
        return tuple(np.ascontiguousarray(a[:, j].reshape(H * K)) for j in range(3))

    def join_b(parts):
        return np.stack([p.reshape(H, K) for p in parts], 1).reshape(3 * H * K)

    yield Entry("gpt_neox.embed_in.weight", (("embed",),), None, _id, _id_back)
    for i in range(cfg.n_layers):
        p = f"gpt_neox.layers.{i}"
        yield from _norm(f"{p}.input_layernorm", B + ("ln1",), i, True)
        yield from _norm(f"{p}.post_attention_layernorm", B + ("ln2",), i, True)
        qkv = tuple(B + ("attn", n, "kernel") for n in "qkv")
        yield Entry(f"{p}.attention.query_key_value.weight", qkv, i, split_w, join_w)
        if cfg.qkv_bias:
            qkv_b = tuple(B + ("attn", n, "bias") for n in "qkv")
            yield Entry(f"{p}.attention.query_key_value.bias", qkv_b, i, split_b, join_b)
        yield from _linear(f"{p}.attention.dense", B + ("attn", "o"), i, cfg.attn_out_bias)
        yield from _linear(f"{p}.mlp.dense_h_to_4h", B + ("mlp", "up"), i, True)
        yield from _linear(f"{p}.mlp.dense_4h_to_h", B + ("mlp", "down"), i, True)
    yield from _norm("gpt_neox.final_layer_norm", ("final_norm",), None, True)
    if not cfg.tie_embeddings:
        yield from _linear("embed_out", ("lm_head",), None, False)


def _llama(cfg: ModelConfig) -> Iterator[Entry]:
    yield Entry("model.embed_tokens.weight", (("embed",),), None, _id, _id_back)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        yield from _norm(f"{p}.input_layernorm", B + ("ln1",), i, False)
        yield from _norm(f"{p}.post_attention_layernorm", B + ("ln2",), i, False)
        for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            yield from _linear(f"{p}.self_attn.{hf}", B + ("attn", ours), i, cfg.qkv_bias)
        yield from _linear(f"{p}.self_attn.o_proj", B + ("attn", "o"), i, cfg.attn_out_bias)
        for name in ("gate", "up", "down"):
            yield from _linear(f"{p}.mlp.{name}_proj", B + ("mlp", name), i, cfg.mlp_bias)
    yield from _norm("model.norm", ("final_norm",), None, False)
    if not cfg.tie_embeddings:
        yield from _linear("lm_head", ("lm_head",), None, False)


_TABLES = {"gpt2": _gpt2, "gptj": _gptj, "gpt_neox": _gpt_neox, "llama": _llama}

# Names some checkpoints use for the same tensors (older / newer transformers versions).
ALIASES = {
    "embed_out.weight": ("gpt_neox.embed_out.weight", "lm_head.weight"),
    "lm_head.weight": ("model.lm_head.weight",),
}


def entries(cfg: ModelConfig) -> list[Entry]:
    return list(_TABLES[cfg.family](cfg))
