"""Regenerate the MEND parity golden (`tests/goldens/methods/mend/golden.npz`) from the reference
(eric-mitchell/mend).

    uv run python scripts/goldens_mend.py --mend-repo /path/to/eric-mitchell/mend

Needs PyTorch and transformers (`scripts/install_reference.sh`) and a checkout of the reference
repository (its path on the command line; nothing of it is copied into this repository).

What is computed with the reference's own code, on the tiny random GPT-2 of `tests/goldens/gpt2/`
(the same HF directory jaxedit's model-parity test reads):

1. the gradient factors: the reference's `hooks.hook_model` on the MLP kernels of both blocks
   (`c_fc` = jaxedit's `mlp_up`, `c_proj` = `mlp_out`) captures u (layer input) and δ (gradient
   at the layer output) while `losses.masked_log_probs`' NLL of a fixed edit input is
   back-propagated, as `algs/mend.py` `MEND.edit` does;
2. the reference `algs/mend.py` `MEND` object built on that model (shared editors per weight
   shape, modes = position in the shape's list, as the paper), whose `GradientTransform`s (IDMLP
   of `LRLinear` layers, u / δ normalisation) get fixed random weights, fixed normaliser
   statistics (eval mode) and fixed η;
3. per weight the transformed factors (ũ, δ̃) for the tokens the reference keeps (non-zero u and
   δ), the pseudo-gradient Σ_t ũ_t δ̃_tᵀ (the `einsum("bi,bj->ij")` of `MEND.edit` for GPT-2's
   [in, out] Conv1D kernels: jaxedit's layout) and ΔW = η ∇̃W.

Everything the comparison needs is written to the npz: token ids / mask / labels, editor weights,
normaliser statistics (mean, std, count), η, the factors, and the outputs.

Run-time patches (the reference is imported as is otherwise):
- `higher` and `hydra` are not installed here and are only *imported* by the reference
  (`algs/mend.py` uses `higher.patch.monkeypatch` after the pseudo-gradients, to build the edited
  functional model; `utils.py` imports hydra for its training entry point): empty stand-in modules
  are put in `sys.modules` when the real ones are missing;
- `MEND.edit` itself is not called: it ends in `higher`'s functional patching, which a pseudo-
  gradient does not need. Its first half (forward, NLL, backward, transform, einsum) is run step
  by step below with the reference's objects.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "tests" / "goldens" / "gpt2"
OUT = ROOT / "tests" / "goldens" / "methods" / "mend" / "golden.npz"
PROMPT = "The Eiffel Tower is located in"
TARGET = " Rome city"
LAYERS = (0, 1)
RANK = 8  # < the combined width 96: a genuinely low-rank LRLinear
N_HIDDEN = 1
SEED = 0


def _stub_missing(name: str) -> None:
    try:
        __import__(name)
    except ImportError:
        mod = types.ModuleType(name)
        if name == "higher":  # `from higher.patch import monkeypatch` at import time
            patch = types.ModuleType("higher.patch")
            patch.monkeypatch = None
            patch._MonkeyPatchBase = type("_MonkeyPatchBase", (), {})
            mod.patch = patch
            sys.modules["higher.patch"] = patch
        sys.modules[name] = mod


def import_reference(repo: Path):
    """The reference's `algs.mend` module and its `hooks`, `losses` (imported from `repo`)."""
    for name in ("higher", "hydra"):
        _stub_missing(name)
    sys.path.insert(0, str(repo))
    import algs.mend as ref_mend  # noqa: E402  (from the checkout)
    import losses as ref_losses  # noqa: E402

    return ref_mend, ref_losses


def _config(inner_params: list[str]):
    ns = types.SimpleNamespace
    mend_cfg = ns(
        one_sided=False,
        n_hidden=N_HIDDEN,
        hidden_dim=None,
        init="id",
        norm=True,
        combine=True,
        x_only=False,
        delta_only=False,
        act="relu",
        rank=RANK,
        mlp_class="IDMLP",
        shared=True,
    )
    return ns(model=ns(inner_params=inner_params, name="gpt2"), edit_lr=1e-4, mend=mend_cfg)


def edit_input(tok):
    """ids, attention mask and MEND labels (-100 outside the target) of prompt + target."""
    import torch

    p, t = tok.encode(PROMPT), tok.encode(TARGET)
    ids = torch.tensor([p + t])
    labels = torch.full_like(ids, -100)
    labels[0, len(p) :] = ids[0, len(p) :]
    return ids, torch.ones_like(ids), labels


def _randomise(gt, gen, torch) -> None:
    """Fixed random editor weights (not the identity) and normaliser statistics (eval mode)."""
    with torch.no_grad():
        for layer in gt.mlp.layers:
            layer.u.copy_(0.3 * torch.randn(layer.u.shape, generator=gen))
            layer.v.copy_(torch.randn(layer.v.shape, generator=gen) / layer.v.shape[1] ** 0.5)
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=gen))
            w = layer.mode_scale.weight
            w.copy_(1 + 0.2 * torch.randn(w.shape, generator=gen))
            layer.mode_shift.weight.copy_(0.1 * torch.randn(w.shape, generator=gen))
        for m, s in (("u_mean", "u_std"), ("v_mean", "v_std")):
            n = getattr(gt, m).shape[0]
            setattr(gt, m, 0.1 * torch.randn(n, generator=gen))
            setattr(gt, s, 0.5 + torch.rand(n, generator=gen))
        gt.k = torch.tensor([50.0])
        gt.norm_init = True
    gt.eval()


def compute(repo: Path) -> dict[str, np.ndarray]:
    import torch
    import transformers

    ref_mend, ref_losses = import_reference(repo)
    torch.manual_seed(SEED)
    model = transformers.GPT2LMHeadModel.from_pretrained(MODEL_DIR).float().eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(MODEL_DIR / "tokenizer.json"))
    inner = [f"transformer.h.{i}.mlp.{m}.weight" for i in LAYERS for m in ("c_fc", "c_proj")]
    cfg = _config(inner)
    editor = ref_mend.MEND(model, cfg, lambda: None)  # hooks the inner params
    gen = torch.Generator().manual_seed(SEED)
    for key in sorted(editor.mend.keys()):
        _randomise(editor.mend[key], gen, torch)
    with torch.no_grad():
        editor.edit_lrs.copy_(torch.tensor([2e-3, -1e-3, 5e-4, 3e-3]))

    ids, mask, labels = edit_input(tok)
    # MEND.edit's first half: forward, the NLL of the labels, backward (the hooks store u, δ)
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = ref_losses.masked_log_probs(logits, labels, shift=True)["nll"]
    loss.backward()
    params = dict(model.named_parameters())
    out: dict[str, np.ndarray] = {
        "ids": ids.numpy().astype(np.int32),
        "mask": mask.numpy().astype(bool),
        "labels": (labels != -100).numpy(),
        "loss": np.float32(loss.item()),
        "eta": editor.edit_lrs.detach().numpy().astype(np.float32),
        "rank": np.int32(RANK),
        "n_hidden": np.int32(N_HIDDEN),
    }
    for key in sorted(editor.mend.keys()):  # "(32, 64)", "(64, 32)": [in, out] of Conv1D
        gt, g = editor.mend[key], _group_name(key)
        out[f"{g}/k"] = gt.k.numpy().astype(np.float32)
        for a, b in (("u_mean", "u_mean"), ("u_std", "u_std"), ("v_mean", "d_mean")):
            out[f"{g}/{b}"] = getattr(gt, a).numpy()
        out[f"{g}/d_std"] = gt.v_std.numpy()
        for j, layer in enumerate(gt.mlp.layers):
            out[f"{g}/{j}/u"] = layer.u.detach().numpy()
            out[f"{g}/{j}/v"] = layer.v.detach().numpy()
            out[f"{g}/{j}/bias"] = layer.bias.detach().numpy()
            out[f"{g}/{j}/mode_scale"] = layer.mode_scale.weight.detach().numpy()
            out[f"{g}/{j}/mode_shift"] = layer.mode_shift.weight.detach().numpy()
    with torch.no_grad():
        for i, name in enumerate(inner):
            p = params[name]
            shape = editor.get_shape(p)
            mode = editor.shape_dict[shape].index(name)
            u, d = p.__x__, p.__delta__
            ut, dt = editor.mend[str(tuple(shape))](u, d, mode)
            w = _weight_name(name)
            out[f"{w}/u"] = u[0].numpy()  # [T I], every token
            out[f"{w}/d"] = d[0].numpy()  # [T O]
            out[f"{w}/mode"] = np.int32(mode)
            out[f"{w}/u_tilde"] = ut.numpy()  # [N I], the tokens the reference keeps
            out[f"{w}/d_tilde"] = dt.numpy()
            pseudo = torch.einsum("bi,bj->ij", ut, dt)  # GPT-2's Conv1D kernels: [I, O]
            out[f"{w}/pseudo_grad"] = pseudo.numpy()
            out[f"{w}/true_grad"] = p.grad.numpy()
            out[f"{w}/delta_w"] = (editor.edit_lrs[i] * pseudo).numpy()
    return out


def _group_name(key: str) -> str:
    i, o = (int(x) for x in key.strip("()").split(","))
    return f"{i}x{o}"


def _weight_name(param: str) -> str:
    layer = int(param.split(".")[2])
    return f"{'mlp_up' if '.c_fc.' in param else 'mlp_out'}.{layer}"


def _git_head(repo: Path) -> str:
    import subprocess

    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True)
    except OSError:
        return "unknown"
    return r.stdout.decode().strip() if r.returncode == 0 else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mend-repo", required=True, type=Path, help="eric-mitchell/mend checkout")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--ref-commit", help="the checkout's commit, recorded (default: git's HEAD)")
    args = ap.parse_args()
    if not (args.mend_repo / "algs" / "mend.py").is_file():
        sys.exit(f"{args.mend_repo}: not a checkout of eric-mitchell/mend (no algs/mend.py)")
    out = compute(args.mend_repo.resolve())
    out["ref_commit"] = np.str_(args.ref_commit or _git_head(args.mend_repo))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **out)
    print(f"wrote {args.out} ({len(out)} arrays)")


if __name__ == "__main__":
    main()
