"""The target value: the vector δ that, added at one site of one layer at the subject's last
token, makes the model say the new target (ROME's v* at `mlp_out`, MEMIT's z at `resid`).

ROME (§3.1, eq. 4) and MEMIT (§4.2, eq. 16) minimise, over δ added at `site` of layer l at the
last subject token of every prompt,

    L(δ) = 1/N Σ_j −log p(target | x_j + prompt) / |target|         (teacher-forced)
           + kl_factor · KL(p_δ(· | "{s} is a") ‖ p(· | "{s} is a"))  (at the subject token)
           + weight_decay · ‖δ‖ / ‖v₀‖²,

with v₀ the site's value at the last subject token of the bare prompt (row 0), by Adam,
clamping ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖ after each update, and stopping before the update once
L < early_stop_loss or after `steps` loss evaluations. The target value is v* = v₀ + δ.

With `stop_when_argmax` (ENCORE's "most-probable early stopping", MPES: Gupta et al. 2025,
"Lifelong Sequential Knowledge Editing without Model Degradation") the loop also stops, at the
same check, once every real target token is the argmax of its teacher-forced logits on every
template row: the edit stops at "the model says it" instead of driving the target's
probability towards 1, which over-fits and inflates the weights over many edits. (The
reference code counts correct (row, token) pairs over the rows after the first and stops at
five: every such row for one-token targets and MEMIT's 1 + 5 templates. Here every row, the
bare prompt's too, and every target token must be right.)

How it runs: the whole loop is one `lax.while_loop` inside `jit` (`run_steps`; with a progress
bar it is called one step at a time, its state carried from call to call: the same result).
Each step runs only what δ can change — blocks l..L-1 on the positions from each row's last
subject token on — over the unedited model's keys/values of the earlier positions, computed
once by `clean_run` (`Suffix`): positions before the subject token never attend to it (causal
attention) and layers below l never see δ. Under `grad` the blocks keep only matmul outputs
(`dots_saveable`, in `run_layers`). `optimise` is pure in arrays (no Python branching on
values), so batches of requests can be `jax.vmap`ped through it: `target_values` pads up to
`lanes` requests to common shapes and runs them as one compiled call, a request per lane
(MEMIT's z for a whole batch).

Deliberate differences from the reference: targets of 1..N tokens are padded to a power of two
(weight 0) so that one compile serves them; ‖·‖ has gradient 0 at δ = 0 (as torch's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from jaxedit import progress as _progress
from jaxedit.errors import InputError
from jaxedit.io.tokenizer import fine_bucket
from jaxedit.methods.common.keys import encode_at_subject, right_pad
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import SitePatch
from jaxedit.models.transformer import KVCache, Params, forward, run_layers

SITES = ("mlp_out", "resid", "attn_out")  # sites of width D where δ may be added


@dataclass(frozen=True)
class TargetSettings:
    """The optimisation's settings, in the reference's names (ROME `v_*`, MEMIT the same)."""

    steps: int = 20  # at most this many loss evaluations (steps - 1 updates)
    lr: float = 0.5  # Adam learning rate
    weight_decay: float = 0.5  # · ‖δ‖ / ‖v₀‖²
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖v₀‖
    early_stop_loss: float = 5e-2
    # ENCORE's most-probable early stopping (MPES): also stop once every target token is the
    # argmax of its teacher-forced logits on every template row.
    stop_when_argmax: bool = False

    def arrays(self) -> dict:
        """Traced values: changing a setting does not recompile."""
        return {
            "steps": jnp.int32(self.steps),
            "lr": jnp.float32(self.lr),
            "weight_decay": jnp.float32(self.weight_decay),
            "kl_factor": jnp.float32(self.kl_factor),
            "clamp_norm_factor": jnp.float32(self.clamp_norm_factor),
            "early_stop_loss": jnp.float32(self.early_stop_loss),
            "stop_when_argmax": jnp.bool_(self.stop_when_argmax),
        }


@dataclass(frozen=True)
class TargetBatch:
    """Rows template_j ∘ prompt(subject) + target[:-1] (j < R), then the KL rows."""

    tokens: Int[np.ndarray, "B T"]
    mask: Bool[np.ndarray, "B T"]
    lookup: Int[np.ndarray, " B"]  # each row's last subject token
    logit_pos: Int[np.ndarray, "B N"]  # positions whose logits predict the N target tokens
    targets: Int[np.ndarray, "R N"]
    weights: Float[np.ndarray, " N"]  # 1 for a real target token, 0 for padding


def target_ids(tok, target: str) -> list[int]:
    """The target as a continuation (a space is prepended when it has none, as ROME does)."""
    if not target.strip():
        raise InputError("empty target")
    ids = tok.encode_continuation(target if target.startswith(" ") else " " + target)
    if not ids:
        raise InputError(f"target {target!r} tokenizes to nothing")
    return ids


def target_batch(
    tok,
    prompt: str,
    subject: str,
    target: str,
    templates: tuple[str, ...],
    kl_prompts: tuple[str, ...] = ("{} is a",),
) -> TargetBatch:
    tgt = target_ids(tok, target)
    n = len(tgt)
    N = 1 << (n - 1).bit_length()  # one compile for every target of n ≤ N tokens
    rows, lookup, logit_pos = [], [], []
    for t in templates:
        ids, i = encode_at_subject(tok, t, prompt, subject)
        tok.check_fits(
            len(ids) + n - 1,
            t.replace("{}", prompt.replace("{}", subject)),
            "the prompt with its target",
        )
        lookup.append(i)
        # teacher forcing; padded target slots repeat the last real position
        logit_pos.append([len(ids) - 1 + min(j, n - 1) for j in range(N)])
        rows.append(ids + tgt[:-1])
    for kp in kl_prompts:
        ids, i = encode_at_subject(tok, "{}", kp, subject)
        rows.append(ids)
        lookup.append(i)
        logit_pos.append([i] * N)  # the next-token distribution at the subject
    tokens, mask = right_pad(rows, tok.pad_id)
    targets = np.tile(np.asarray(tgt + [tgt[-1]] * (N - n), np.int32), (len(templates), 1))
    return TargetBatch(
        tokens,
        mask,
        np.asarray(lookup, np.int32),
        np.asarray(logit_pos, np.int32),
        targets,
        (np.arange(N) < n).astype(np.float32),
    )


class Suffix(NamedTuple):
    """What δ can change: each row from its last subject token j_r on, at layers l..L-1.

    Positions before j_r never attend to j_r and layers below l never see δ, so their states
    are the unedited model's: computed once, then reused by every step as a key/value cache
    (`cache`, valid before j_r) and as the input of block l (`h`).
    """

    h: Float[Array, "B S D"]  # input of block l at positions j_r .. j_r + S - 1
    mask: Bool[Array, "B S"]  # real tokens of the suffix
    positions: Int[Array, "B S"]  # their absolute positions
    cache: KVCache  # the unedited keys/values of every layer, valid at positions < j_r
    logit_pos: Int[Array, "B N"]  # target-predicting positions, in suffix coordinates


def suffix_length(batch: TargetBatch) -> int:
    """Positions from the subject token to the longest row's end, rounded to a fine bucket."""
    return fine_bucket(int((batch.mask.sum(1) - batch.lookup).max()))


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def clean_run(
    cfg: ModelConfig,
    site: str,
    layer: int,
    S: int,
    params: Params,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    lookup: Int[Array, " B"],
    logit_pos: Int[Array, "B N"],
) -> tuple[Float[Array, "B D"], Float[Array, "B V"], Suffix]:
    """The unedited run, once: the site's value at every row's subject token, the log-probs
    at every row's first logit position (the KL rows' reference), and the `Suffix`."""
    below = "embed" if layer == 0 else "resid"
    out = forward(
        cfg,
        params,
        tokens,
        mask,
        capture=tuple(dict.fromkeys((site, below))),
        logit_positions=logit_pos,
        return_kv=True,
    )
    B, T = tokens.shape
    rows = jnp.arange(B)
    values_bd = out.captured[site][layer][rows, lookup].astype(jnp.float32)
    h_in = out.captured["embed"] if layer == 0 else out.captured["resid"][layer - 1]
    pos = lookup[:, None] + jnp.arange(S)[None, :]  # [B S]
    take = jnp.minimum(pos, T - 1)
    suffix = Suffix(
        h=jnp.take_along_axis(h_in, take[..., None], axis=1),
        mask=jnp.take_along_axis(mask, take, axis=1) & (pos < T),
        positions=pos,
        cache=KVCache(*out.kv, mask & (jnp.arange(T)[None, :] < lookup[:, None])),
        logit_pos=logit_pos - lookup[:, None],
    )
    logp_bv = jax.nn.log_softmax(out.logits[:, 0].astype(jnp.float32), axis=-1)
    return values_bd, logp_bv, suffix


def safe_norm(x: Float[Array, " D"]) -> Float[Array, ""]:
    """‖x‖ with gradient 0 at x = 0 (as torch's), not NaN."""
    sq = jnp.sum(x * x)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


class OptResult(NamedTuple):
    delta: Float[Array, " D"]
    steps: Int[Array, ""]  # loss evaluations
    loss: Float[Array, ""]  # at the last evaluation
    nll: Float[Array, ""]
    kl: Float[Array, ""]
    weight_decay: Float[Array, ""]
    target_prob: Float[Array, ""]  # mean over templates of exp(−mean token NLL)
    target_argmax: Bool[Array, ""]  # every target token the argmax on every template row


class Carry(NamedTuple):
    """The optimisation loop's state between steps (and between `run_steps` calls)."""

    it: Int[Array, ""]  # loss evaluations so far
    delta: Float[Array, " D"]
    opt_state: optax.OptState
    done: Bool[Array, ""]
    last: tuple  # (loss, (nll, kl, decay, target_prob, argmax)) at the last evaluation


def init_carry(D: int) -> Carry:
    """δ = 0 before the first step (Adam's state does not depend on the learning rate)."""
    delta0 = jnp.zeros((D,), jnp.float32)
    zero = jnp.float32(0.0)
    aux0 = (zero, zero, zero, zero, jnp.bool_(False))
    return Carry(jnp.int32(0), delta0, optax.adam(0.0).init(delta0), jnp.bool_(False), (zero, aux0))


def run_steps(
    cfg: ModelConfig,
    site: str,
    layer: int,
    params: Params,
    suffix: Suffix,
    targets: Int[Array, "R N"],
    weights: Float[Array, " N"],
    kl_init: Float[Array, "K V"],
    v0: Float[Array, " D"],
    hp: dict,
    carry: Carry,
    until: Int[Array, ""],
) -> Carry:
    """Steps of the optimisation from `carry` until it stops or has made `until` loss
    evaluations: `optimise` in slices, so that the host can report progress between calls
    (`until` is traced: every slice runs the same compiled loop, and slices give exactly the
    result of one run to the end). Pure in its array arguments (vmappable)."""
    B, S = suffix.mask.shape
    R, K = targets.shape[0], kl_init.shape[0]
    L, D = cfg.n_layers, cfg.d_model
    # δ goes to `site` of `layer` at suffix position 0 = each row's last subject token.
    patch_mask = jnp.broadcast_to(
        (jnp.arange(L) == layer)[:, None, None] & (jnp.arange(S) == 0)[None, None, :], (L, B, S)
    )
    v0_norm = safe_norm(v0)

    def loss_fn(delta):
        value = jnp.broadcast_to(delta, (L, 1, S, D))
        patch = {site: SitePatch(patch_mask, value, jnp.asarray(True))}
        logits = run_layers(
            cfg,
            params,
            suffix.h,
            suffix.mask,
            layer,
            patch=patch,
            logit_positions=suffix.logit_pos,
            positions=suffix.positions,
            cache=suffix.cache,
        )
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B N V]
        tok_logp = jnp.take_along_axis(logp[:R], targets[..., None], axis=-1)[..., 0]
        nll_each = -jnp.sum(tok_logp * weights[None, :], -1) / jnp.sum(weights)  # target mean
        nll = jnp.mean(nll_each)
        kl_logp = logp[R : R + K, 0]  # [K V]
        kl = jnp.sum(jnp.exp(kl_logp) * (kl_logp - kl_init)) / K  # KL(edited ‖ unedited)
        decay = hp["weight_decay"] * safe_norm(delta) / v0_norm**2
        loss = nll + hp["kl_factor"] * kl + decay
        # MPES: is each real target token the most probable one at its position?
        top = jnp.argmax(logp[:R], axis=-1) == targets  # [R N]
        argmax = jnp.all(top | (weights == 0)[None, :])
        return loss, (nll, kl, decay, jnp.mean(jnp.exp(-nll_each)), argmax)

    opt = optax.adam(hp["lr"])

    def body(c: Carry) -> Carry:
        it, delta, opt_state, done, last = c
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(delta)
        # As the reference: check the loss (and, with MPES, the argmax) first, stop before
        # updating.
        stop = (
            done
            | (loss < hp["early_stop_loss"])
            | (hp["stop_when_argmax"] & aux[-1])
            | (it >= hp["steps"] - 1)
        )
        updates, new_state = opt.update(grad, opt_state, delta)
        new = optax.apply_updates(delta, updates)
        max_norm = hp["clamp_norm_factor"] * v0_norm
        new = new * jnp.minimum(1.0, max_norm / jnp.maximum(safe_norm(new), 1e-30))
        keep = lambda a, b: jnp.where(stop, a, b)
        # Under vmap the loop runs until every request has stopped: a request that is `done`
        # keeps its state, step count and last loss exactly (never true without vmap).
        frozen = lambda a, b: jnp.where(done, a, b)
        return Carry(
            jnp.where(done, it, it + 1),
            keep(delta, new),
            jax.tree.map(keep, opt_state, new_state),
            stop,
            jax.tree.map(frozen, last, (loss, aux)),
        )

    return jax.lax.while_loop(lambda c: ~c.done & (c.it < until), body, carry)


def result_of(c: Carry) -> OptResult:
    loss, aux = c.last
    return OptResult(c.delta, c.it, loss, *aux)


def optimise(
    cfg: ModelConfig,
    site: str,
    layer: int,
    params: Params,
    suffix: Suffix,
    targets: Int[Array, "R N"],
    weights: Float[Array, " N"],
    kl_init: Float[Array, "K V"],
    v0: Float[Array, " D"],
    hp: dict,
) -> OptResult:
    """δ minimising NLL + kl_factor·KL + weight decay by Adam in one `lax.while_loop`.

    Each loss evaluation runs blocks l..L-1 on the suffixes only (`run_layers` over the
    unedited prefix cache): exactly the full forward's logits at the target positions.
    `hp` is `TargetSettings.arrays()`. Pure in its array arguments (vmappable)."""
    carry = init_carry(cfg.d_model)
    args = (cfg, site, layer, params, suffix, targets, weights, kl_init, v0, hp)
    return result_of(run_steps(*args, carry, hp["steps"]))


optimise_jit = jax.jit(optimise, static_argnums=(0, 1, 2))
run_steps_jit = jax.jit(run_steps, static_argnums=(0, 1, 2))


@partial(jax.jit, static_argnums=(0, 1, 2))
def run_steps_lanes(
    cfg: ModelConfig,
    site: str,
    layer: int,
    params: Params,
    suffix: Suffix,
    targets: Int[Array, "C R N"],
    weights: Float[Array, "C N"],
    kl_init: Float[Array, "C K V"],
    v0: Float[Array, "C D"],
    hp: dict,
    carry: Carry,
    until: Int[Array, ""],
) -> Carry:
    """`run_steps` for C requests of one shape at once, a request per lane (the matmuls of
    every lane's rows run as one; the loop runs until the slowest lane stops, `run_steps`
    freezes the others)."""
    one = partial(run_steps, cfg, site, layer, params)
    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, 0, None))(
        suffix, targets, weights, kl_init, v0, hp, carry, until
    )


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def clean_run_lanes(
    cfg: ModelConfig,
    site: str,
    layer: int,
    S: int,
    params: Params,
    tokens: Int[Array, "C B T"],
    mask: Bool[Array, "C B T"],
    lookup: Int[Array, "C B"],
    logit_pos: Int[Array, "C B N"],
) -> tuple[Float[Array, "C B D"], Float[Array, "C B V"], Suffix]:
    """`clean_run` of C requests' rows, a request per lane."""
    one = partial(clean_run, cfg, site, layer, S, params)
    return jax.vmap(one)(tokens, mask, lookup, logit_pos)


def pad_batch(b: TargetBatch, T: int, N: int) -> TargetBatch:
    """`b` widened to T tokens and N target slots without changing its result: new token
    columns are padding (mask 0), new target slots repeat the last one with weight 0 (as
    `target_batch` pads a target to a power of two)."""
    B, T0 = b.tokens.shape
    N0 = b.weights.shape[0]
    if T < T0 or N < N0:
        raise ValueError(f"cannot narrow a target batch ({T0}, {N0}) to ({T}, {N})")
    widen = lambda a, n: np.concatenate([a, np.repeat(a[:, -1:], n - a.shape[1], 1)], 1)
    return TargetBatch(
        np.pad(b.tokens, ((0, 0), (0, T - T0))),
        np.pad(b.mask, ((0, 0), (0, T - T0))),
        b.lookup,
        widen(b.logit_pos, N),
        widen(b.targets, N),
        np.pad(b.weights, (0, N - N0)),
    )


@dataclass(frozen=True)
class TargetValue:
    """v* = v0 + delta at `site` of `layer`, and how the optimisation went."""

    site: str
    layer: int
    v0: Float[np.ndarray, " D"]  # float64
    delta: Float[np.ndarray, " D"]  # float64
    steps: int
    loss: float
    nll: float
    kl: float
    weight_decay: float
    target_prob: float
    target_argmax: bool = False  # at the last evaluation: every target token the argmax

    @property
    def v_star(self) -> Float[np.ndarray, " D"]:
        return self.v0 + self.delta


def _target_value(site: str, layer: int, v0, r: OptResult) -> TargetValue:
    return TargetValue(
        site,
        layer,
        np.asarray(v0, np.float64),
        np.asarray(r.delta, np.float64),
        int(r.steps),
        float(r.loss),
        float(r.nll),
        float(r.kl),
        float(r.weight_decay),
        float(r.target_prob),
        bool(r.target_argmax),
    )


def _check_site(lm: LanguageModel, site: str, layer: int) -> None:
    if site not in SITES:
        raise InputError(f"target site {site!r}: one of {SITES}")
    if not 0 <= layer < lm.config.n_layers:
        raise InputError(f"layer {layer} out of range 0..{lm.config.n_layers - 1}")


_FIELDS = ("tokens", "mask", "lookup", "logit_pos", "targets", "weights")  # stacked per lane


def target_value(
    lm: LanguageModel,
    site: str,
    layer: int,
    request,
    templates: tuple[str, ...],
    settings: TargetSettings,
    kl_prompts: tuple[str, ...] = ("{} is a",),
) -> TargetValue:
    """Optimise δ for one request (`prompt`, `subject`, `target_new`) on `lm`."""
    return target_values(lm, site, layer, [request], templates, settings, kl_prompts, lanes=1)[0]


def target_values(
    lm: LanguageModel,
    site: str,
    layer: int,
    requests: Sequence,
    templates: tuple[str, ...],
    settings: TargetSettings,
    kl_prompts: tuple[str, ...] = ("{} is a",),
    *,
    lanes: int = 16,
    progress: bool | None = None,
) -> list[TargetValue]:
    """Optimise δ for each request, `lanes` requests per compiled call (MEMIT's z for a batch).

    Requests are grouped by shape (suffix length, target slots), then each group of up to
    `lanes` runs as one vmapped `clean_run` + `run_steps`, every request in its own lane: the
    rows are widened to the group's common shapes (`pad_batch`, `suffix_length`; all rounded
    to buckets, so compiles repeat), which changes no result beyond float rounding. A last,
    smaller group runs in a power of two of lanes, the spare lanes copies of a real request
    (results dropped; a copy stops with its original, so it never prolongs the loop). A group
    of one runs unvmapped: `target_value` is `target_values` of one request. Results come
    back in the order of `requests`.

    `progress` (None: `jaxedit.progress.shown()`, the command line's choice) shows a bar over
    the steps on stderr, moved from the host between compiled calls of one step each (the
    loop's state goes from call to call: the same result as one call to the end); without it
    each group is one call, dispatched before the previous group is read back.
    """
    _check_site(lm, site, layer)
    if lanes < 1:
        raise InputError(f"lanes={lanes}: at least 1")
    requests = list(requests)
    tok = lm.tokenizer
    batches = [
        target_batch(tok, r.prompt, r.subject, r.target_new, templates, kl_prompts)
        for r in requests
    ]
    S_each = [suffix_length(b) for b in batches]
    # Similar shapes share a call: less padding, and a call's loop runs as long as its slowest lane.
    order = sorted(range(len(batches)), key=lambda i: (S_each[i], batches[i].weights.shape[0]))
    groups = [order[lo : lo + lanes] for lo in range(0, len(order), lanes)]
    hp = settings.arrays()
    out: list[TargetValue | None] = [None] * len(batches)
    show = _progress.shown() if progress is None else progress
    total = len(groups) * settings.steps
    bar = _progress.bar(total, f"target values L{layer}", "step", enabled=show)

    def collect(idx, v0, c: Carry):
        v0, r = jax.device_get((v0, result_of(c)))
        for lane, i in enumerate(idx):
            out[i] = _target_value(site, layer, v0[lane], OptResult(*(a[lane] for a in r)))

    pending = None  # dispatch group g+1 before reading group g back
    for g, idx in enumerate(groups):
        C = min(lanes, 1 << (len(idx) - 1).bit_length())
        lane_idx = idx + [idx[0]] * (C - len(idx))
        T = max(batches[i].tokens.shape[1] for i in lane_idx)
        N = max(batches[i].weights.shape[0] for i in lane_idx)
        S = max(S_each[i] for i in lane_idx)
        group = [pad_batch(batches[i], T, N) for i in lane_idx]
        args = [np.stack([getattr(b, f) for b in group]) for f in _FIELDS]
        run, carry, v0 = _group_loop(lm, site, layer, S, args, hp)
        if not bar.enabled:
            carry = run(carry, settings.steps)
        else:
            for n in range(1, settings.steps + 1):
                carry = run(carry, n)
                its, dones, loss = jax.device_get((carry.it, carry.done, carry.last[0]))
                bar.update(g * settings.steps + int(np.max(its)) - bar.bar.n)
                bar.postfix(f"{g * lanes + len(idx)}/{len(order)} req, loss {np.mean(loss):.3f}")
                if np.all(dones):
                    break
            bar.update((g + 1) * settings.steps - bar.bar.n)
        if pending is not None:
            collect(*pending)
        pending = (idx, v0, carry)
    if pending is not None:
        collect(*pending)
    bar.close()
    return out


def _group_loop(lm: LanguageModel, site: str, layer: int, S: int, args, hp: dict):
    """For one group's stacked rows (`_FIELDS`, C lanes): the unedited run (dispatched), then
    (run(carry, until) -> carry, the initial carry, v0 [C D]). One lane runs unvmapped;
    its carry and v0 are given and returned with a leading lane axis of 1."""
    cfg, params = lm.config, lm.params
    C, R = args[0].shape[0], args[4].shape[1]
    if C == 1:
        tokens, mask, lookup, logit_pos, targets, weights = (jnp.asarray(a[0]) for a in args)
        values, logp, suffix = clean_run(
            cfg, site, layer, S, params, tokens, mask, lookup, logit_pos
        )
        v0, kl_init = values[0], logp[R:]
        lane0 = lambda tree: jax.tree.map(lambda a: a[0], tree)
        add_lane = lambda tree: jax.tree.map(lambda a: a[None], tree)

        def run(carry: Carry, until: int) -> Carry:
            c = run_steps_jit(
                cfg, site, layer, params, suffix, targets, weights, kl_init, v0, hp,
                lane0(carry), jnp.int32(until),
            )  # fmt: skip
            return add_lane(c)

        return run, add_lane(init_carry(cfg.d_model)), v0[None]
    tokens, mask, lookup, logit_pos, targets, weights = args
    values, logp, suffix = clean_run_lanes(
        cfg, site, layer, S, params, tokens, mask, lookup, logit_pos
    )
    v0, kl_init = values[:, 0], logp[:, R:]

    def run(carry: Carry, until: int) -> Carry:
        return run_steps_lanes(
            cfg, site, layer, params, suffix, targets, weights, kl_init, v0, hp, carry,
            jnp.int32(until),
        )  # fmt: skip

    carry = jax.tree.map(lambda a: jnp.broadcast_to(a, (C, *a.shape)), init_carry(cfg.d_model))
    return run, carry, v0
