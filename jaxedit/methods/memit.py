"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023, ICLR), thousands of facts in
one closed-form solve.

For N requests and the MLP layers R = (l_1 < … < l_L):

1. z_i (§4.2, eq. 16): the residual stream after l_L at the last subject token, h + δ_i with δ_i
   minimising −log p(target_i | x_j + prompt_i) over context templates x_j (MEMIT: "{}" and 5
   texts of 10 tokens) + kl_factor·KL on "{s} is a" + weight decay, clamped to
   ‖δ‖ ≤ clamp_norm_factor·‖h‖ — ROME's optimiser at site "resid" (`common.target_opt`), all N
   requests in one compiled, vmapped call per chunk of `z_lanes` (a request per lane).
2. For each layer l in R, on the model edited so far (`common.spread`):
       K_l  = keys at l (mean over the template groups' means),   [F N]
       R_l  = (Z − H_l) / (L − i),                                 [D N]
       ΔW_l = (λ C_l + K_l K_lᵀ)⁻¹ K_l R_lᵀ                        (eq. 14, in our [F D] layout)
   with C_l = E[k kᵀ] at layer l over a corpus (`jaxedit.stats`) and λ = mom2_update_weight;
   the solve is a float64 Cholesky (as the reference's `.double()` solve), with an optional
   ridge · mean(diag) · I for a singular system.

Deliberate differences from kmeng01/memit: the z's of a batch are optimised in one vmapped call
(same loss, same Adam, padding contributes nothing); the last subject token comes from
character offsets; two requests with one (prompt, subject) and different targets are refused
(the reference silently averages them); the statistics corpus defaults to text sampled from the
model (offline) rather than Wikipedia. With one layer and one request, MEMIT is ROME's closed
form with C⁻¹ replaced by (λC + kkᵀ)⁻¹ (tested).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float

from jaxedit.edits import WeightDelta, WeightEdit
from jaxedit.errors import InputError
from jaxedit.methods.base import EditMethod, PrepareOptions
from jaxedit.methods.common import (
    linalg,
    spread,
    target_cache,
    target_opt,
    value_hparams,
)
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest
from jaxedit.stats import DEFAULT_N_TOKENS, default_cache_dir


@dataclass(frozen=True)
class SpreadHparams:
    """What MEMIT and AlphaEdit share: layers, the z optimisation, statistics, templates.
    Names are the reference code's (logical terms only: no module paths)."""

    layers: tuple[int, ...]  # the edited MLPs; z is optimised after the last
    v_num_grad_steps: int = 25  # at most this many loss evaluations per z
    v_lr: float = 0.5
    v_weight_decay: float = 0.5  # · ‖δ‖ / ‖h‖²
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor · ‖h‖
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    early_stop_argmax: bool = False  # ENCORE: stop once the target is top-1 on every template
    mom2_corpus: str = "self"  # self | wikitext | wikipedia | a path
    mom2_n_samples: int | None = None
    mom2_n_tokens: int | None = DEFAULT_N_TOKENS
    mom2_max_len: int = 256
    mom2_dtype: str = "float32"
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 5),)
    context_templates: tuple[str, ...] | None = None
    template_top_k: int = 5
    kl_prompt: str = "{} is a"
    z_lanes: int = 8  # requests per vmapped z call (8 beat 16 and 1-by-1 on a 2-core CPU)
    cache_z: bool = True  # keep each optimised z in the cache directory (reused when identical)
    seed: int = 0

    def __post_init__(self):
        increasing = list(self.layers) == sorted(set(self.layers))
        value_hparams.check(
            self,
            type(self).__name__,
            [
                (len(self.layers) >= 1, "give at least one layer"),
                (increasing, "layers must be strictly increasing"),
                (min(self.layers, default=0) >= 0, "layers must be >= 0"),
                (self.z_lanes >= 1, "z_lanes must be >= 1"),
            ],
        )

    def target_settings(self) -> target_opt.TargetSettings:
        return value_hparams.target_settings(self)


@dataclass(frozen=True)
class MEMITHparams(SpreadHparams):
    mom2_update_weight: float = 15000.0  # λ: weight of the preserved keys' second moment
    ridge: float = 0.0  # + ridge · mean(diag) · I in the solve, for a singular system


@dataclass(frozen=True)
class SpreadState:
    """Templates, their groups, and the key statistics of every layer (by layer)."""

    hp: SpreadHparams
    templates: tuple[str, ...]
    groups: tuple[int, ...]
    C: dict[int, np.ndarray]  # E[k kᵀ] per layer, float64 [F F]
    stats: dict
    z_cache: str | None = None  # directory of cached target values (`common.target_cache`)
    progress: bool = False


def check_layers(lm: LanguageModel, layers) -> None:
    n = lm.config.n_layers
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise InputError(f"layers {bad} out of range 0..{n - 1}")


def make_state(
    lm: LanguageModel,
    hp: SpreadHparams,
    C: dict[int, np.ndarray],
    context_templates: tuple[str, ...] | None = None,
    stats: dict | None = None,
) -> SpreadState:
    """The state from given second moments (layer -> C [F F]) and templates (default:
    `hp.context_templates`, else sampled from the model)."""
    check_layers(lm, hp.layers)
    F = lm.config.d_ff
    missing = [x for x in hp.layers if x not in C]
    if missing:
        raise InputError(f"no key statistics for layers {missing}")
    bad = [x for x in hp.layers if np.shape(C[x]) != (F, F)]
    if bad:
        raise InputError(f"C of layers {bad} is not {F}x{F} (the layers' key width)")
    chosen = value_hparams.context_templates(lm, hp, context_templates)
    groups = spread.template_groups(
        hp.context_template_length_params,
        chosen if (context_templates or hp.context_templates) is not None else None,
    )
    Cs = {x: np.asarray(C[x], np.float64) for x in hp.layers}
    return SpreadState(hp, chosen, groups, Cs, dict(stats or {}))


def prepare_spread(lm: LanguageModel, hp: SpreadHparams, opts: PrepareOptions) -> SpreadState:
    """C_l for every layer (one pass over the corpus for the layers not cached yet) and the
    context templates; z's are cached under `<statistics cache>/z` unless `cache_z` is off."""
    check_layers(lm, hp.layers)
    stats = value_hparams.key_stats(lm, hp, hp.layers, opts.cache_dir, opts.progress)
    info = {
        "tokens": next(iter(stats.values())).count,
        "from_cache": [bool(st.meta.get("from_cache")) for st in stats.values()],
    }
    state = make_state(lm, hp, {x: st.mom2 for x, st in stats.items()}, stats=info)
    z_cache = None
    if hp.cache_z:
        z_cache = str(Path(opts.cache_dir or default_cache_dir()) / "z")
    return dataclasses.replace(state, z_cache=z_cache, progress=opts.progress)


def target_zs(
    lm: LanguageModel, state: SpreadState, requests: list[EditRequest]
) -> tuple[Float[np.ndarray, "D N"], list[target_opt.TargetValue]]:
    """Z: each request's target residual after the last layer, `z_lanes` requests per vmapped
    call, read from / written to the z cache when the state has one."""
    hp = state.hp
    site, layer, kl, settings = "resid", hp.layers[-1], (hp.kl_prompt,), hp.target_settings()

    def compute(reqs: list) -> list[target_opt.TargetValue]:
        return target_opt.target_values(
            lm,
            site,
            layer,
            reqs,
            state.templates,
            settings,
            kl,
            lanes=hp.z_lanes,
            progress=state.progress,
        )

    tvs, _ = target_cache.cached_target_values(
        state.z_cache, compute, lm, site, layer, requests, state.templates, settings, kl
    )
    return np.stack([tv.v_star for tv in tvs], axis=1), tvs


def memit_solver(state: SpreadState, hp: MEMITHparams) -> spread.Solver:
    """ΔW_l = (λ C_l + K Kᵀ)⁻¹ K Rᵀ, float64 Cholesky."""

    def solve(i: int, layer: int, K: np.ndarray, R: np.ndarray) -> WeightDelta:
        A = hp.mom2_update_weight * state.C[layer] + K @ K.T
        try:
            factor = linalg.spd_factor(A, hp.ridge)
        except InputError as e:
            raise InputError(f"MEMIT layer {layer}: λC + KKᵀ is singular ({e})") from e
        return spread.as_delta(layer, linalg.spd_solve(factor, K), R)

    return solve


def z_summary(tvs: list[target_opt.TargetValue]) -> dict:
    return {
        "z_steps_mean": float(np.mean([t.steps for t in tvs])),
        "z_target_prob_mean": float(np.mean([t.target_prob for t in tvs])),
        "z_loss_mean": float(np.mean([t.loss for t in tvs])),
    }


def edit_meta(name: str, lm: LanguageModel, hp, requests: list[EditRequest]) -> dict:
    return {
        "method": name,
        "model": lm.name,
        "hparams": dataclasses.asdict(hp),
        "requests": [
            {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new} for r in requests
        ],
    }


def check_state(lm: LanguageModel, state: SpreadState) -> None:
    check_layers(lm, state.hp.layers)
    F = lm.config.d_ff
    if any(c.shape != (F, F) for c in state.C.values()):
        raise InputError("the state was prepared for another model (key width differs)")


def spread_compute(name: str, make_solver):
    """`compute` for a method that is MEMIT's z's and layer loop with its own solve:
    `make_solver(state, hp)` gives the `spread.Solver` (MEMIT's here, EMMET's in `emmet.py`)."""

    def compute(
        lm: LanguageModel, state: SpreadState, requests: list[EditRequest]
    ) -> tuple[WeightEdit, dict]:
        check_state(lm, state)
        spread.check_requests(requests)
        hp = state.hp
        t0 = time.perf_counter()
        zs, tvs = target_zs(lm, state, requests)
        t1 = time.perf_counter()
        deltas, layers_info, _ = spread.spread(
            lm, hp.layers, requests, zs, state.templates, state.groups, make_solver(state, hp)
        )
        info = {
            "layers": list(hp.layers),
            "requests": len(requests),
            **z_summary(tvs),
            "layers_info": layers_info,
            "norm": float(sum(d["update_norm"] for d in layers_info)),
            "z_seconds": round(t1 - t0, 3),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return WeightEdit(deltas, edit_meta(name, lm, hp, requests)), info

    return compute


# All requests in one solve: z's, then the layer loop with MEMIT's solve.
compute = spread_compute("memit", memit_solver)


METHOD = EditMethod(
    name="memit",
    hparams_cls=MEMITHparams,
    prepare_fn=prepare_spread,
    compute_fn=compute,
    summary="many facts in one least-squares solve over a range of MLP layers (Meng et al. 2023)",
)
