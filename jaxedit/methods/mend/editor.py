"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

For an edited weight W [I, O] (`out = in @ W`) the gradient of the edit loss over the tokens t of
the edit input is a sum of rank-one terms,

    ∇_W L = Σ_t u_t δ_tᵀ,     u_t = layer input at t,   δ_t = ∂L / ∂(layer output at t).

MEND never forms ∇_W. A small editor network g (one per distinct weight shape, shared by the layers
of that shape, told apart by a learned per-layer scale and shift, "mode") maps each normalised
factor pair to a pseudo-factor pair, and the edit is

    (ũ_t, δ̃_t) = g_l( concat(û_t, δ̂_t) ),   û = (u - μ_u) / (σ_u + 1e-7),  δ̂ likewise   (combine)
    ∇̃_W = Σ_t ũ_t δ̃_tᵀ                                                      (pseudo-gradient)
    W̃ = W + η_l · ∇̃_W                                                        (η_l learned per layer)

g is the paper's IDMLP: n_hidden + 1 residual low-rank layers, each
`h ← h + clamp((U (V h) + b) · s_l + c_l, min=0)` with U = 0 at initialisation, so g starts as the
identity and ∇̃_W = ∇_W when normalisation is off. μ, σ are running statistics of u and δ over
every training token (Welford / Chan's parallel update), kept as explicit state.

Meta-training (see `jaxedit.methods.mend.train`) minimises

    L = c_edit · NLL(target_new | paraphrase; W̃) + c_loc · KL(p_W(· | x_loc) ‖ p_W̃(· | x_loc))

with respect to the editor and the η_l only; u and δ are constants (the reference detaches them).

No hooks: u is a captured site (`mlp_key` for the output projection, `mlp_in` for up / gate) and
δ is one `jax.grad` with respect to zeros *added* at `mlp_key` / `mlp_out`. For up / gate the
output gradient follows from δ at `mlp_key` by the chain rule through the MLP's elementwise
activation (SwiGLU: key = act(x W_g) ⊙ (x W_u)), so the model needs no further patch point.

Reference implementation read: eric-mitchell/mend (`algs/mend.py`, `nn.py`, `trainer.py`,
`losses.py`), EasyEdit (`easyeditor/trainer/algs/MEND.py`, `hparams/MEND/*.yaml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import ConfigError, InputError
from jaxedit.models.config import ModelConfig
from jaxedit.models.sites import SitePatch, add_to_weights
from jaxedit.models.transformer import _activation, forward

# Edited weights are addressed by the site their layer produces (see `jaxedit.models.sites`):
#   mlp_out  = down / c_proj / fc_out   [F, D], input u = mlp_key
#   mlp_up   = up   / c_fc   / fc_in    [D, F], input u = mlp_in
#   mlp_gate = gate (SwiGLU only)       [D, F], input u = mlp_in
EDITABLE = ("mlp_out", "mlp_up", "mlp_gate")


# ----------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class MENDHparams:
    """Editor and meta-training hyperparameters (defaults: the paper / EasyEdit MEND configs)."""

    weights: tuple[tuple[str, int], ...] = ()  # (site, layer); () = MLP matrices of last 3 blocks
    n_hidden: int = 1  # IDMLP: n_hidden + 1 residual low-rank layers
    rank: int = 1920  # rank of each low-rank layer (min(rank, width) is used)
    norm: bool = True  # normalise u, δ by running mean / std
    shared: bool = True  # one editor per weight shape, per-layer scale / shift
    edit_lr: float = 1e-4  # initial η_l
    lr: float = 1e-6  # Adam lr of the editor (outer loop)
    lr_lr: float = 1e-4  # Adam lr of η_l (its own optimiser, the reference's `lr_opt`)
    # The reference also steps η with the editor's optimiser (its `outer_parameters` include
    # `edit_lrs`), so η moves by up to lr + lr_lr per update. Harmless when lr ≪ lr_lr (paper:
    # 1e-6 vs 1e-4); with a larger editor lr than |η| itself it swamps η (see the presets).
    eta_outer: bool = True
    c_edit: float = 0.1
    # The edit loss is the NLL of the target on the equivalent input (rephrase). With inner_loss
    # it is taken over the edit input too (the reference's `data.rephrase=false` setting scores the
    # edit input itself): CounterFact's rephrase_prompt is often a generation prefix, and an editor
    # trained on it alone learns updates that overshoot the edit prompt (efficacy ≈ 0.4).
    inner_loss: bool = False
    c_loc: float = 1.0
    grad_clip: float = 100.0  # global-norm clip of the accumulated meta-gradient
    accumulate: int = 10  # meta-gradient accumulation (steps per optimiser update)
    batch: int = 1  # edits per step (vmapped, independent)
    max_len: int = 24  # token length of every training sequence (longer records are skipped)
    max_target: int = 8  # scored (label) tokens per training sequence (longer are skipped)
    seed: int = 0

    def replace(self, **kw: Any) -> MENDHparams:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weights"] = [list(w) for w in self.weights]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MENDHparams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"model", "note"}
        if unknown:
            raise ConfigError(f"unknown MEND hyperparameters {sorted(unknown)}")
        d = {k: v for k, v in d.items() if k in known}
        d["weights"] = tuple((str(s), int(layer)) for s, layer in d.get("weights", ()))
        return cls(**d)


PRESET_DIR = Path(__file__).parents[2] / "hparams" / "mend"


def load_hparams(name_or_path: str) -> MENDHparams:
    """A preset name (`jaxedit/hparams/mend/<name>.json`) or a path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise InputError(f"no MEND hparams {name_or_path!r}; presets: {presets}")
    return MENDHparams.from_dict(json.loads(path.read_text()))


def hparams_for(cfg: ModelConfig, model_name: str = "") -> MENDHparams:
    """The preset named like the model if there is one, else the paper's defaults."""
    stem = Path(str(model_name)).name.lower()
    if (PRESET_DIR / f"{stem}.json").exists():
        return load_hparams(stem)
    return MENDHparams()


def resolve_weights(cfg: ModelConfig, hp: MENDHparams) -> tuple[tuple[str, int], ...]:
    """The edited (site, layer) list: as given, or the MLP matrices of the last three blocks."""
    weights = hp.weights
    if not weights:
        kinds = ("mlp_gate", "mlp_up", "mlp_out") if cfg.gated_mlp else ("mlp_up", "mlp_out")
        weights = tuple(
            (k, layer) for layer in range(cfg.n_layers - 3, cfg.n_layers) for k in kinds
        )
    for site, layer in weights:
        if site not in EDITABLE:
            raise ConfigError(f"MEND edits {EDITABLE} weights, not {site!r}")
        if site == "mlp_gate" and not cfg.gated_mlp:
            raise ConfigError("mlp_gate: this model has no gated MLP")
        if not 0 <= layer < cfg.n_layers:
            raise ConfigError(f"layer {layer} out of range 0..{cfg.n_layers - 1}")
    if len(set(weights)) != len(weights):
        raise ConfigError("a weight is listed twice")
    return tuple(weights)


def _weight_dims(cfg: ModelConfig, site: str) -> tuple[int, int]:
    """(I, O) of the kernel: I = width of u, O = width of δ."""
    return (cfg.d_ff, cfg.d_model) if site == "mlp_out" else (cfg.d_model, cfg.d_ff)


@dataclass(frozen=True)
class Layout:
    """Static structure: which weights are edited and which share an editor (hashable, for jit).

    groups: (name, I, O, member weight indices); the position of a weight inside its group is its
    mode (the index of its scale / shift).
    """

    weights: tuple[tuple[str, int], ...]
    groups: tuple[tuple[str, int, int, tuple[int, ...]], ...]


def make_layout(cfg: ModelConfig, hp: MENDHparams) -> Layout:
    weights = resolve_weights(cfg, hp)
    groups: dict[str, list] = {}
    for i, (site, layer) in enumerate(weights):
        n_in, n_out = _weight_dims(cfg, site)
        name = f"{n_in}x{n_out}" if hp.shared else f"{site}.{layer}"
        groups.setdefault(name, [name, n_in, n_out, []])[3].append(i)
    return Layout(
        weights, tuple((n, n_in, n_out, tuple(m)) for n, n_in, n_out, m in groups.values())
    )


# ----------------------------------------------------------------------------- editor network

Editor = dict  # {"edit_lrs": [W], "nets": {group: [layer params]}}
Norm = dict  # {group: {"k", "u_mean", "u_m2", "d_mean", "d_m2"}}


def init_editor(key: Array, layout: Layout, hp: MENDHparams) -> Editor:
    """IDMLP per group: U = 0 (identity start), V ~ N(0, 1), bias 0, mode scale 1 / shift 0."""
    nets = {}
    for name, n_in, n_out, members in layout.groups:
        width = n_in + n_out
        r = min(hp.rank, width)
        layers = []
        for _ in range(hp.n_hidden + 1):
            key, sub = jax.random.split(key)
            layers.append(
                {
                    "u": jnp.zeros((width, r), jnp.float32),
                    "v": jax.random.normal(sub, (r, width), jnp.float32),
                    "bias": jnp.zeros((width,), jnp.float32),
                    "mode_scale": jnp.ones((len(members), width), jnp.float32),
                    "mode_shift": jnp.zeros((len(members), width), jnp.float32),
                }
            )
        nets[name] = layers
    n = len(layout.weights)
    return {"edit_lrs": jnp.full((n,), hp.edit_lr, jnp.float32), "nets": nets}


def init_norm(layout: Layout) -> Norm:
    """Empty running statistics (count 0)."""
    z = lambda d: jnp.zeros((d,), jnp.float32)
    return {
        name: {
            "k": jnp.zeros((), jnp.float32),
            "u_mean": z(n_in),
            "u_m2": z(n_in),
            "d_mean": z(n_out),
            "d_m2": z(n_out),
        }
        for name, n_in, n_out, _ in layout.groups
    }


def lr_linear(p: dict, h: Float[Array, "N W"], mode: Int[Array, ""]) -> Float[Array, "N W"]:
    """One residual low-rank layer: h + clamp((U V h + b) · s_mode + c_mode, min=0)."""
    pre = (h @ p["v"].T) @ p["u"].T + p["bias"]
    pre = pre * p["mode_scale"][mode] + p["mode_shift"][mode]
    # torch's clamp(min=0) passes gradient 1 at exactly 0 (relu would pass 0): with U = 0 at
    # initialisation every pre-activation is 0, and U could otherwise never start learning.
    return h + jnp.where(pre >= 0, pre, 0.0)


def _std(m2: Array, k: Array) -> Array:
    return jnp.where(k > 1, jnp.sqrt(m2 / jnp.maximum(k - 1, 1.0)), 1.0)


def transform(
    layers: list[dict],
    norm: dict,
    u: Float[Array, "N I"],
    d: Float[Array, "N O"],
    mode: Int[Array, ""],
    use_norm: bool,
) -> tuple[Float[Array, "N I"], Float[Array, "N O"]]:
    """(u, δ) -> (ũ, δ̃) for the tokens of one weight: normalise, concat, IDMLP, split."""
    if use_norm:
        u = (u - norm["u_mean"]) / (_std(norm["u_m2"], norm["k"]) + 1e-7)
        d = (d - norm["d_mean"]) / (_std(norm["d_m2"], norm["k"]) + 1e-7)
    h = jnp.concatenate([u, d], -1)
    for p in layers:
        h = lr_linear(p, h, mode)
    return h[:, : u.shape[-1]], h[:, u.shape[-1] :]


def update_norm(norm: dict, u: Float[Array, "N I"], d: Float[Array, "N O"], m: Bool[Array, " N"]):
    """Fold the masked tokens into the running mean / M2 (Chan et al.'s parallel Welford)."""
    m = m.astype(jnp.float32)[:, None]
    n_b = jnp.sum(m)
    k = norm["k"] + n_b
    out = {"k": k}
    for x, name in ((u, "u"), (d, "d")):
        mean_b = jnp.sum(m * x, 0) / jnp.maximum(n_b, 1.0)
        m2_b = jnp.sum(m * jnp.square(x - mean_b), 0)
        delta = mean_b - norm[f"{name}_mean"]
        out[f"{name}_mean"] = norm[f"{name}_mean"] + delta * n_b / jnp.maximum(k, 1.0)
        out[f"{name}_m2"] = (
            norm[f"{name}_m2"] + m2_b + jnp.square(delta) * norm["k"] * n_b / jnp.maximum(k, 1.0)
        )
    return out


# ----------------------------------------------------------------------------- gradient factors


class Factors(NamedTuple):
    """Per group: u [M N I], δ [M N O], token mask [M N] (M = weights in the group)."""

    u: dict[str, Array]
    d: dict[str, Array]
    m: dict[str, Array]


# ------------------------------------------------------------- scoring only where labels are
#
# The vocabulary projection costs more than the three edited blocks together (SmolLM2: 57 vs 21
# MFLOP a token), so logits are computed only at the P positions that predict a label token.


class Labelled(NamedTuple):
    """A right-padded batch with P scored positions per row (P fixed by the shape)."""

    tokens: Int[Array, "B T"]
    mask: Bool[Array, "B T"]
    pos: Int[Array, "B P"]  # positions whose *next* token is a label
    valid: Bool[Array, "B P"]  # padding of pos
    target: Int[Array, "B P"]  # the label token predicted at pos


def labelled(tokens, mask, labels, n_pos: int) -> Labelled:
    """Positions p with labels[p + 1] (at most `n_pos` per row; the rest is padding)."""

    def row(t, lab):
        nxt = lab[1:]
        pos = jnp.nonzero(nxt, size=n_pos, fill_value=0)[0]
        valid = jnp.arange(n_pos) < jnp.sum(nxt)
        return pos, valid, t[pos + 1]

    pos, valid, target = jax.vmap(row)(tokens, labels)
    return Labelled(tokens, mask.astype(bool), pos, valid, target)


def nll(logits: Float[Array, "B P V"], x: Labelled) -> Float[Array, ""]:
    """Mean negative log-likelihood of the label tokens (the reference's masked NLL)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    lp = jnp.take_along_axis(logp, x.target[..., None], -1)[..., 0]
    m = x.valid.astype(jnp.float32)
    return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)


def label_accuracy(logits: Float[Array, "B P V"], x: Labelled) -> Float[Array, ""]:
    """Fraction of rows whose every label token is the argmax (MEND's edit accuracy)."""
    ok = (jnp.argmax(logits, -1) == x.target) | ~x.valid
    return jnp.mean(jnp.all(ok, -1).astype(jnp.float32))


def kl_loc(
    pre: Float[Array, "B P V"], post: Float[Array, "B P V"], valid: Bool[Array, "B P"]
) -> Float[Array, ""]:
    """Mean over scored positions of KL(p_pre ‖ p_post) (the reference's `kl_loc_loss`)."""
    lp_pre = jax.nn.log_softmax(pre.astype(jnp.float32), -1)
    lp_post = jax.nn.log_softmax(post.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lp_pre) * (lp_pre - lp_post), -1)
    m = valid.astype(jnp.float32)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


# ------------------------------------------------------------- running only the edited blocks
#
# Blocks below the lowest edited layer see the same input before and after an edit, so their
# output (the residual entering block `first`) is computed once, without gradient, and the
# edited forward runs only blocks first..L-1: a sub-model fed that residual through a replace
# patch at `embed`.


def first_layer(layout: Layout) -> int:
    return min(layer for _, layer in layout.weights)


def shift_layout(layout: Layout, first: int) -> Layout:
    return Layout(tuple((s, layer - first) for s, layer in layout.weights), layout.groups)


def split_top(cfg: ModelConfig, params: dict, first: int) -> tuple[ModelConfig, dict]:
    """(config, params) of the sub-model made of blocks first..L-1 (+ final norm, head)."""
    if first == 0:
        return cfg, params
    top = {**params, "blocks": jax.tree.map(lambda a: a[first:], params["blocks"])}
    return cfg.replace(n_layers=cfg.n_layers - first), top


def prefix_resid(cfg, params, tokens, mask, first: int) -> Float[Array, "B T D"] | None:
    """The residual entering block `first` (None when first = 0): constant under the edit."""
    if first == 0:
        return None
    # The whole stack with one scored position, not `n_layers=first`: that path slices the
    # stacked block weights (a copy of `first` layers per call), which on a CPU core cost more
    # than the blocks above `first` (27-block prefix 569 ms vs 30-block forward 316 ms).
    one = jnp.zeros((tokens.shape[0], 1), jnp.int32)
    out = forward(cfg, params, tokens, mask, capture=("resid",), logit_positions=one)
    return jax.lax.stop_gradient(out.captured["resid"][first - 1])


def top_forward(cfg_top, params_top, x: Labelled, h0, *, patch=None, capture=()):
    """Logits at the scored positions of the sub-model started from residual h0."""
    patch = dict(patch or {})
    if h0 is not None:
        patch["embed"] = SitePatch(jnp.ones(x.mask.shape, bool), h0, jnp.asarray(False))
    return forward(
        cfg_top, params_top, x.tokens, x.mask, patch=patch, capture=capture, logit_positions=x.pos
    )


def gradient_factors(
    cfg: ModelConfig, params: dict, layout: Layout, x: Labelled, h0=None
) -> tuple[Float[Array, ""], Factors]:
    """The edit loss and, for every edited weight, u_t and δ_t over the B·T tokens.

    `cfg, params, layout` describe the model that is run (the full model with h0 = None, or the
    sub-model from `split_top` with a shifted layout and its input residual h0). One forward and
    one backward: δ at `mlp_key` / `mlp_out` is the gradient w.r.t. zeros added there. Tokens
    with u = 0 or δ = 0 (padding, tokens after the last label) are masked out, as the reference
    drops them before the editor.
    """
    L, (B, T) = cfg.n_layers, x.tokens.shape
    layers = sorted({layer for _, layer in layout.weights})
    layer_mask = jnp.zeros((L,), bool).at[jnp.asarray(layers)].set(True)
    pmask = jnp.broadcast_to(layer_mask[:, None, None], (L, B, T))

    def loss_fn(zero_key, zero_out):
        patch = {
            "mlp_key": SitePatch(pmask, zero_key, jnp.asarray(True)),
            "mlp_out": SitePatch(pmask, zero_out, jnp.asarray(True)),
        }
        out = top_forward(cfg, params, x, h0, patch=patch, capture=("mlp_in", "mlp_key"))
        return nll(out.logits, x), out.captured

    zk = jnp.zeros((L, B, T, cfg.d_ff), jnp.float32)
    zo = jnp.zeros((L, B, T, cfg.d_model), jnp.float32)
    (loss, cap), (d_key, d_out) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(zk, zo)
    act = _activation(cfg.activation)
    blocks = params["blocks"]["mlp"]

    def proj(name, layer, h):  # the model's Linear: param-dtype inputs, fp32 accumulation
        kernel = blocks[name]["kernel"][layer]
        y = jnp.dot(h.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        bias = blocks[name].get("bias")
        return y if bias is None else y + bias[layer].astype(jnp.float32)

    def dact(h):  # elementwise act'(h)
        return jax.jvp(act, (h,), (jnp.ones_like(h),))[1]

    us, ds = [], []
    for site, layer in layout.weights:
        if site == "mlp_out":
            u, d = cap["mlp_key"][layer], d_out[layer]
        else:
            u, dk = cap["mlp_in"][layer], d_key[layer]
            up = proj("up", layer, u)
            if not cfg.gated_mlp:  # key = act(x W_up)
                d = dk * dact(up)
            else:  # key = act(x W_gate) ⊙ (x W_up)
                gate = proj("gate", layer, u)
                d = dk * act(gate) if site == "mlp_up" else dk * up * dact(gate)
        us.append(u.reshape(B * T, -1).astype(jnp.float32))
        ds.append(d.reshape(B * T, -1).astype(jnp.float32))
    valid = x.mask.reshape(B * T)
    fu, fd, fm = {}, {}, {}
    for name, _, _, members in layout.groups:
        fu[name] = jnp.stack([us[i] for i in members])
        fd[name] = jnp.stack([ds[i] for i in members])
        nz = jnp.any(fu[name] != 0, -1) & jnp.any(fd[name] != 0, -1)
        fm[name] = nz & valid[None]
    return loss, Factors(fu, fd, fm)


def true_gradients(factors: Factors, layout: Layout) -> list[Float[Array, "I O"]]:
    """Σ_t u_t δ_tᵀ per weight (equals ∇_W of the edit loss)."""
    out: list = [None] * len(layout.weights)
    for name, _, _, members in layout.groups:
        g = jnp.einsum("mti,mto->mio", factors.u[name], factors.d[name])
        for j, i in enumerate(members):
            out[i] = g[j]
    return out


# ----------------------------------------------------------------------------- the edit


def pseudo_gradients(
    editor: Editor, norm: Norm, layout: Layout, factors: Factors, use_norm: bool
) -> tuple[list[Array], dict]:
    """∇̃_W = Σ_t ũ_t δ̃_tᵀ for every edited weight; the editor is vmapped over each group's layers.

    Returns (gradients in `layout.weights` order, {group: (ũ [M N I], δ̃ [M N O])}).
    """
    out: list = [None] * len(layout.weights)
    tilde = {}
    for name, _, _, members in layout.groups:
        modes = jnp.arange(len(members))
        run = lambda u, d, mode, _n=name: transform(
            editor["nets"][_n], norm[_n], u, d, mode, use_norm
        )
        ut, dt = jax.vmap(run)(factors.u[name], factors.d[name], modes)
        ut = ut * factors.m[name][..., None]  # masked tokens contribute nothing
        g = jnp.einsum("mti,mto->mio", ut, dt)
        tilde[name] = (ut, dt)
        for j, i in enumerate(members):
            out[i] = g[j]
    return out, tilde


def pseudo_gradients_loop(editor, norm, layout, factors, use_norm) -> list[Array]:
    """The same as `pseudo_gradients`, one layer at a time (the reference's loop; for tests)."""
    out: list = [None] * len(layout.weights)
    for name, _, _, members in layout.groups:
        for j, i in enumerate(members):
            ut, dt = transform(
                editor["nets"][name],
                norm[name],
                factors.u[name][j],
                factors.d[name][j],
                jnp.asarray(j),
                use_norm,
            )
            out[i] = (ut * factors.m[name][j][:, None]).T @ dt
    return out


def apply_updates(params: dict, layout: Layout, edit_lrs: Array, grads: list[Array]) -> dict:
    """W̃_l = W_l + η_l ∇̃W_l (computed in fp32, stored in the param dtype), one update of each
    stacked weight array for all its edited layers."""
    by_site: dict[str, list[int]] = {}
    for i, (site, _) in enumerate(layout.weights):
        by_site.setdefault(site, []).append(i)
    for site, idx in by_site.items():
        layers = tuple(layout.weights[i][1] for i in idx)
        deltas = jnp.stack([edit_lrs[i] * grads[i].astype(jnp.float32) for i in idx])
        params = add_to_weights(params, site, layers, deltas)
    return params


def edit_params(
    cfg: ModelConfig,
    params: dict,
    editor: Editor,
    norm: Norm,
    layout: Layout,
    x: Labelled,
    use_norm: bool = True,
) -> tuple[dict, dict]:
    """One MEND edit of `params` for the edit input(s) x: returns (new params, record arrays)."""
    first = first_layer(layout)
    cfg_top, top = split_top(cfg, params, first)
    h0 = prefix_resid(cfg, params, x.tokens, x.mask, first)
    loss, factors = gradient_factors(cfg_top, top, shift_layout(layout, first), x, h0)
    factors = jax.tree.map(jax.lax.stop_gradient, factors)
    grads, tilde = pseudo_gradients(editor, norm, layout, factors, use_norm)
    new = apply_updates(params, layout, editor["edit_lrs"], grads)
    lrs = jnp.abs(editor["edit_lrs"])
    norms = jnp.stack([lrs[i] * jnp.linalg.norm(g) for i, g in enumerate(grads)])
    return new, {"edit_loss": loss, "update_norms": norms, "tilde": tilde, "mask": factors.m}


# ----------------------------------------------------------------------------- tokenisation


def _continuation(target: str) -> str:
    # Targets are continuations: a leading space unless the data already has one.
    return target if target[:1].isspace() else " " + target


def encode_pair(tok, prompt: str, target: str) -> tuple[list[int], list[bool]]:
    """Ids of prompt + target and a label flag on each target token."""
    p, t = tok.encode(prompt), tok.encode_continuation(_continuation(target))
    return p + t, [False] * len(p) + [True] * len(t)


def pad_pairs(tok, pairs: list[tuple[list[int], list[bool]]], length: int):
    """Right-pad to `length` (causal: padding after the text changes nothing before it)."""
    n = len(pairs)
    tokens = np.full((n, length), tok.pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    labels = np.zeros((n, length), bool)
    for i, (ids, lab) in enumerate(pairs):
        if len(ids) > length:
            raise InputError(f"a sequence of {len(ids)} tokens exceeds length {length}")
        tokens[i, : len(ids)], mask[i, : len(ids)], labels[i, : len(ids)] = ids, True, lab
    return tokens, mask, labels


# ----------------------------------------------------------------------------- method


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--editor", help="directory written by `jaxedit mend-train`")
    p.add_argument(
        "--edit-scale",
        type=float,
        default=1.0,
        help="multiply the learned step sizes η (MEND: trades efficacy for locality; default 1)",
    )


def _prepare(lm, args: argparse.Namespace):
    from jaxedit.methods.mend.train import load_editor

    if not getattr(args, "editor", None):
        raise InputError("MEND needs a trained editor: --editor DIR (see `jaxedit mend-train`)")
    return make_editor(lm, load_editor(args.editor, lm), scale=getattr(args, "edit_scale", 1.0))


def make_editor(lm, trained, scale: float = 1.0):
    """(lm, requests) -> EditResult for a loaded `TrainedEditor`; jitted once per length bucket.

    `scale` multiplies every learned step size η_l (1 = as trained): the update η ∇̃W is linear
    in η, so scale < 1 trades efficacy for locality without retraining."""
    if not (np.isfinite(scale) and scale >= 0):
        raise InputError(f"edit scale must be a finite number ≥ 0, not {scale}")
    from jaxedit.io.tokenizer import bucket
    from jaxedit.methods.legacy import EditResult

    editor = {**trained.editor, "edit_lrs": trained.editor["edit_lrs"] * scale}

    cfg, layout, hp = lm.config, trained.layout, trained.hparams

    @functools.partial(jax.jit, static_argnums=6)
    def run(params, editor, norm, tokens, mask, labels, n_pos):
        x = labelled(tokens, mask, labels, n_pos)
        return edit_params(cfg, params, editor, norm, layout, x, hp.norm)

    def edit(lm_, requests):
        if not requests:
            raise InputError("no edit requests")
        pairs = [encode_pair(lm_.tokenizer, r.rewrite_prompt, r.target_new) for r in requests]
        tokens, mask, labels = pad_pairs(
            lm_.tokenizer, pairs, bucket(max(len(p[0]) for p in pairs))
        )
        n_pos = -(-int(labels.sum(1).max()) // 8) * 8  # compile once per 8 target tokens
        new, rec = run(lm_.params, editor, trained.norm, tokens, mask, labels, n_pos)
        names = [f"{s}.{layer}" for s, layer in layout.weights]
        summary = {
            "weights": names,
            "edit_loss_before": float(rec["edit_loss"]),
            "update_norms": {n: float(x) for n, x in zip(names, rec["update_norms"], strict=True)},
            "edit_lrs": [float(x) for x in editor["edit_lrs"]],
            "edit_scale": scale,
        }
        return EditResult(model=lm_.with_params(new), record=rec, summary=summary)

    return edit


def _register() -> None:
    from jaxedit.methods.legacy import Method, register

    register(Method("mend", _add_arguments, _prepare))


_register()

__all__ = [
    "MENDHparams",
    "Layout",
    "make_layout",
    "init_editor",
    "init_norm",
    "gradient_factors",
    "true_gradients",
    "pseudo_gradients",
    "apply_updates",
    "edit_params",
    "kl_loc",
    "nll",
    "labelled",
]
