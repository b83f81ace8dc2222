"""Fine-tuning baselines: FT-L (Meng et al. 2022, "Locating and Editing Factual Associations in
GPT", §4 / appendix) and FT-M (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing
for Large Language Models", §4), one method with an `objective`.

The weights W_l of one `site` (default `mlp_out`, the [F, D] MLP output matrix) at `layers`
are fine-tuned on the edit requests i = 1..n by Adam, all other weights frozen. With
ΔW_l = W_l − W_l⁰ the optimisation variable,

    objective="prompt_last" (FT-L):   L_i = −1/|o_i| Σ_j log p(o_i,j | x_i)
        every target token scored at the prompt's last position (not teacher-forced, as both
        reference codes do; for a one-token target this is −log p(o_i | x_i));
    objective="target_new"  (FT-M):   L_i = −1/|o_i| Σ_j log p(o_i,j | x_i, o_i,<j)
        teacher-forced cross-entropy over the target tokens of prompt + target, the prompt's
        tokens masked;

    L = mean_i L_i over a batch of `batch_size` requests; g = ∂L/∂W + weight_decay · W (torch
    Adam's L2 term); ΔW ← Adam(g); then, with `norm_constraint` = ε (FT-L's L∞ constraint),
    ΔW ← clip(ΔW, −ε, ε), i.e. W ∈ W⁰ ± ε elementwise.

As the references loop: `num_steps` epochs over the requests in batches (one Adam state for
all: several requests are one joint optimisation); a batch whose loss is below
`early_stop_loss` takes no step (its clamp is a no-op); training stops after the epoch whose
mean loss (batches weighted by their size) is below `early_stop_loss`.

How it runs: the whole loop (epochs in a `lax.while_loop`, batches in a `lax.scan`) is one
`jit`. Layers below the lowest edited one never see ΔW, so their output (the input of block
min(layers)) is computed once and each step runs only blocks min(layers)..L-1 (`run_layers`),
with logits only at the scored positions. `compute` returns a `WeightEdit` of one dense
`WeightDelta(site, l, dense=ΔW_l)` per edited layer; `lm` is never changed.

Parity: on a tiny random Llama (two requests, 5-token targets, batches of one, 4 epochs) ΔW
agrees with EasyEdit's `execute_ft` to 5e-6 (FT-L) and 7e-6 (FT-M) relative
(`scripts/goldens_ft.py`, `tests/test_ft.py`).

Deliberate differences from kmeng01/rome `baselines/ft` and EasyEdit `models/ft`:
- only the weight matrix is tuned: the references' module-name match also tunes the bias of
  GPT-2's `c_proj` / GPT-J's `fc_out` (not of Llama's bias-free `down_proj`);
- targets are tokenised as continuations (`target_opt.target_ids`: a space prepended when
  missing, never a BOS token); EasyEdit always prepends a space and its FT-L tokenises the
  target with the model's BOS (Llama), which it then scores; FT-M tokenises prompt and target
  separately, not the joined string (they differ only where a token would merge across the
  boundary);
- padded target slots of a batch carry weight 0 (FT-L in the references counts padding tokens
  of shorter targets in the mean);
- the references' `kl_factor` and `max_length` fields (unused by their FT code) do not exist.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from jaxedit.edits import WeightDelta, WeightEdit
from jaxedit.errors import ConfigError, InputError
from jaxedit.methods.base import EditMethod, PrepareOptions
from jaxedit.methods.common.keys import right_pad
from jaxedit.methods.common.target_opt import target_ids
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import add_to_weights, get_weight, weight_path
from jaxedit.models.transformer import Params, forward, run_layers
from jaxedit.requests import EditRequest

OBJECTIVES = ("prompt_last", "target_new")  # FT-L, FT-M (EasyEdit's `objective_optimization`)


@dataclass(frozen=True)
class FTHparams:
    """FT settings, in the reference code's names (logical terms only: no module paths)."""

    layers: tuple[int, ...]  # the tuned weights: `site` at each of these layers
    site: str = "mlp_out"  # mlp_out | mlp_up | mlp_gate | attn_out (`jaxedit.models.sites`)
    objective: str = "prompt_last"  # prompt_last = FT-L, target_new = FT-M
    num_steps: int = 25  # epochs over the requests (at most)
    lr: float = 5e-4  # Adam learning rate
    weight_decay: float = 0.0  # torch Adam's L2 term: g += weight_decay · W
    norm_constraint: float | None = None  # ε of |W − W⁰| ≤ ε (FT-L); None: unconstrained
    batch_size: int = 64  # requests per Adam step (EasyEdit's default)
    early_stop_loss: float = 1e-2  # skip a batch below it; stop after an epoch below it

    def __post_init__(self):
        checks = [
            (len(self.layers) >= 1, "layers must name at least one layer"),
            (all(int(x) == x and x >= 0 for x in self.layers), "layers must be integers >= 0"),
            (len(set(self.layers)) == len(self.layers), "layers must be distinct"),
            (self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}"),
            (self.num_steps >= 1, "num_steps must be >= 1"),
            (self.lr > 0, "lr must be positive"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (
                self.norm_constraint is None or self.norm_constraint > 0,
                "norm_constraint must be positive or null (unconstrained)",
            ),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.early_stop_loss >= 0, "early_stop_loss must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"FT hparams: {msg}")
        try:
            weight_path(self.site)
        except ValueError as e:
            raise ConfigError(f"FT hparams: {e}") from e

    def arrays(self) -> dict:
        """Traced values: changing them does not recompile."""
        eps = math.inf if self.norm_constraint is None else self.norm_constraint
        return {
            "num_steps": jnp.int32(self.num_steps),
            "lr": jnp.float32(self.lr),
            "weight_decay": jnp.float32(self.weight_decay),
            "norm_constraint": jnp.float32(eps),
            "early_stop_loss": jnp.float32(self.early_stop_loss),
        }


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class FTBatch:
    """The requests as C batches of B rows (the last one padded with rows of weight 0).

    Row (c, b) holds the prompt (FT-L) or prompt + target[:-1] (FT-M); `logit_pos` are the
    positions whose next-token log-probs score the N (padded) target tokens."""

    tokens: Int[np.ndarray, "C B T"]
    mask: Bool[np.ndarray, "C B T"]
    logit_pos: Int[np.ndarray, "C B N"]
    targets: Int[np.ndarray, "C B N"]
    weights: Float[np.ndarray, "C B N"]  # 1 for a real target token, 0 for padding


def ft_batch(
    tok, requests: list[EditRequest], objective: str, batch_size: int, max_len: int
) -> FTBatch:
    """Tokenise the requests for `objective` (see the module docstring)."""
    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    prompts = [tok.encode(r.rewrite_prompt) for r in requests]
    targets = [target_ids(tok, r.target_new) for r in requests]
    n_max = max(map(len, targets))
    N = 1 << (n_max - 1).bit_length()  # one compile for every target of ≤ N tokens
    rows, pos, tgt, w = [], [], [], []
    for p, t in zip(prompts, targets, strict=True):
        if not p:
            raise InputError("empty prompt: nothing to tokenize")
        n, last = len(t), len(p) - 1
        if objective == "prompt_last":
            rows.append(p)
            pos.append([last] * N)
        else:  # teacher forcing; padded slots repeat the last real position
            rows.append(p + t[:-1])
            pos.append([last + min(j, n - 1) for j in range(N)])
        tgt.append(t + [t[-1]] * (N - n))
        w.append([1.0] * n + [0.0] * (N - n))
    longest = max(map(len, rows))
    if longest > max_len:
        raise InputError(f"a prompt + target of {longest} tokens exceeds the model's {max_len}")
    B = min(batch_size, len(requests))
    C = -(-len(requests) // B)
    pad = C * B - len(requests)  # copies of row 0 with weight 0: finite, and never scored
    rows, pos, tgt = rows + [rows[0]] * pad, pos + [pos[0]] * pad, tgt + [tgt[0]] * pad
    w = w + [[0.0] * N] * pad
    tokens, mask = right_pad(rows, tok.pad_id)
    shape = lambda a, dtype: np.asarray(a, dtype).reshape(C, B, *np.shape(a)[1:])
    return FTBatch(
        shape(tokens, np.int32),
        shape(mask, bool),
        shape(pos, np.int32),
        shape(tgt, np.int32),
        shape(w, np.float32),
    )


# ----------------------------------------------------------------------------- the loop


@partial(jax.jit, static_argnums=(0, 1))
def block_input(
    cfg: ModelConfig,
    start: int,
    params: Params,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
) -> Float[Array, "B T D"]:
    """The input of block `start` (the embeddings for block 0), from the unedited model."""
    if start == 0:
        out = forward(cfg, params, tokens, mask, capture=("embed",), n_layers=1)
        return out.captured["embed"].astype(jnp.float32)
    out = forward(cfg, params, tokens, mask, capture=("resid",), n_layers=start)
    return out.captured["resid"][start - 1].astype(jnp.float32)


def target_nll(
    cfg: ModelConfig,
    site: str,
    layers: tuple[int, ...],
    params: Params,
    delta: Float[Array, "K I O"],
    h: Float[Array, "B T D"],
    mask: Bool[Array, "B T"],
    logit_pos: Int[Array, "B N"],
    targets: Int[Array, "B N"],
    weights: Float[Array, "B N"],
) -> Float[Array, " B"]:
    """Each row's mean NLL of its target tokens with ΔW added (rows of weight 0 give 0).

    `h` is the input of block min(layers): blocks below it never see ΔW."""
    edited = add_to_weights(params, site, layers, delta)
    logits = run_layers(cfg, edited, h, mask, min(layers), logit_positions=logit_pos)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B N V]
    tok_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(tok_logp * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)


class FTResult(NamedTuple):
    delta: Float[Array, "K I O"]  # ΔW per edited layer, fp32
    epochs: Int[Array, ""]  # epochs run
    loss: Float[Array, ""]  # the last epoch's mean batch loss (before its updates)
    nll: Float[Array, "C B"]  # each row's target NLL after the edit


def optimise(
    cfg: ModelConfig,
    site: str,
    layers: tuple[int, ...],
    params: Params,
    h: Float[Array, "C B T D"],
    mask: Bool[Array, "C B T"],
    logit_pos: Int[Array, "C B N"],
    targets: Int[Array, "C B N"],
    weights: Float[Array, "C B N"],
    hp: dict,
) -> FTResult:
    """Adam on ΔW over `num_steps` epochs of the C batches, with the references' early stop
    and L∞ clamp, in one `lax.while_loop`. `hp` is `FTHparams.arrays()`."""
    w0 = jnp.stack([get_weight(params, site, layer).astype(jnp.float32) for layer in layers])
    rows_valid = (jnp.sum(weights, -1) > 0).astype(jnp.float32)  # [C B]
    n_rows = jnp.sum(rows_valid, -1)  # [C]
    stop_loss, eps = hp["early_stop_loss"], hp["norm_constraint"]
    opt = optax.adam(hp["lr"])  # torch's defaults too: betas (0.9, 0.999), eps 1e-8

    def batch_loss(delta, xs):
        h_c, mask_c, pos_c, tgt_c, w_c, valid_c = xs
        nll = target_nll(cfg, site, layers, params, delta, h_c, mask_c, pos_c, tgt_c, w_c)
        return jnp.sum(nll * valid_c) / jnp.sum(valid_c)

    def batch_step(carry, xs):
        delta, opt_state = carry
        loss, grad = jax.value_and_grad(batch_loss)(delta, xs)
        grad = grad + hp["weight_decay"] * (w0 + delta)  # L2 on W itself, as torch's Adam
        updates, new_state = opt.update(grad, opt_state)
        skip = loss < stop_loss  # the references step only while the batch loss is ≥ 1e-2
        delta = jnp.where(skip, delta, delta + updates)
        opt_state = jax.tree.map(lambda a, b: jnp.where(skip, a, b), opt_state, new_state)
        return (jnp.clip(delta, -eps, eps), opt_state), loss

    xs = (h, mask, logit_pos, targets, weights, rows_valid)

    def epoch(carry):
        it, delta, opt_state, _, _ = carry
        (delta, opt_state), losses = jax.lax.scan(batch_step, (delta, opt_state), xs)
        mean = jnp.sum(losses * n_rows) / jnp.sum(n_rows)  # the reference's AverageMeter
        done = (mean < stop_loss) | (it + 1 >= hp["num_steps"])
        return it + 1, delta, opt_state, done, mean

    delta0 = jnp.zeros_like(w0)
    init = (jnp.int32(0), delta0, opt.init(delta0), jnp.bool_(False), jnp.float32(0.0))
    it, delta, _, _, loss = jax.lax.while_loop(lambda c: ~c[3], epoch, init)
    final = jax.lax.map(lambda x: target_nll(cfg, site, layers, params, delta, *x[:5]) * x[5], xs)
    return FTResult(delta, it, loss, final)


optimise_jit = jax.jit(optimise, static_argnums=(0, 1, 2))


# ----------------------------------------------------------------------------- the method


def check_model(lm: LanguageModel, hp: FTHparams) -> None:
    """The layers exist in `lm` and it has the site's weight (mlp_gate: gated MLPs only)."""
    n = lm.config.n_layers
    bad = [x for x in hp.layers if not 0 <= x < n]
    if bad:
        raise InputError(f"FT layers {bad} out of range 0..{n - 1}")
    try:
        get_weight(lm.params, hp.site, hp.layers[0])
    except KeyError as e:
        raise InputError(f"the model has no {hp.site} weight (e.g. no gated MLP)") from e


def prepare(lm: LanguageModel, hp: FTHparams, opts: PrepareOptions) -> FTHparams:
    """Nothing to precompute: checks `hp` against the model and returns it as the state."""
    check_model(lm, hp)
    return hp


def compute(
    lm: LanguageModel, state: FTHparams, requests: list[EditRequest]
) -> tuple[WeightEdit, dict]:
    """One joint fine-tuning of the weights on all requests; ΔW per layer, dense."""
    hp, cfg = state, lm.config
    check_model(lm, hp)
    t0 = time.perf_counter()
    b = ft_batch(lm.tokenizer, requests, hp.objective, hp.batch_size, cfg.max_positions)
    C, B, T = b.tokens.shape
    flat = lambda a: jnp.asarray(a.reshape(C * B, *a.shape[2:]))
    h = block_input(cfg, min(hp.layers), lm.params, flat(b.tokens), flat(b.mask))
    r = optimise_jit(
        cfg,
        hp.site,
        tuple(hp.layers),
        lm.params,
        h.reshape(C, B, T, -1),
        jnp.asarray(b.mask),
        jnp.asarray(b.logit_pos),
        jnp.asarray(b.targets),
        jnp.asarray(b.weights),
        hp.arrays(),
    )
    delta = np.asarray(r.delta, np.float32)
    deltas = tuple(WeightDelta(hp.site, layer, dense=delta[i]) for i, layer in enumerate(hp.layers))
    nll = np.asarray(r.nll).reshape(-1)[: len(requests)]
    meta = {
        "method": "ft",
        "model": lm.name,
        "hparams": dataclasses.asdict(hp),
        "requests": [
            {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new} for r in requests
        ],
    }
    info = {
        "objective": hp.objective,
        "site": hp.site,
        "layers": list(hp.layers),
        "epochs": int(r.epochs),
        "loss": float(r.loss),
        "target_nll": [float(x) for x in nll],  # after the edit, per request
        "target_prob": [float(np.exp(-x)) for x in nll],
        "max_abs_delta": float(np.abs(delta).max()),
        "norm": float(sum(np.linalg.norm(d) for d in delta)),  # Σ_l ‖ΔW_l‖_F
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return WeightEdit(deltas, meta), info


METHOD = EditMethod(
    name="ft",
    hparams_cls=FTHparams,
    prepare_fn=prepare,
    compute_fn=compute,
    summary="fine-tuning of one weight per layer: FT-L (L∞-constrained) or FT-M (target loss)",
)
