"""Writing target values into a range of MLP layers: the layer loop MEMIT and AlphaEdit share.

MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer", §4.3 and Alg. 1) stores a
batch of N memories in the MLP output projections of the layers R = (l_1 < … < l_L). Each
request's target z_i is the residual stream after the last layer l_L at its last subject token,
optimised so the model says the new target (`target_opt`, site "resid"). Then

    for i, l in enumerate(R):
        K_l = [k_1 … k_N]                    keys at layer l, each the mean over the context
                                             templates (MEMIT `compute_ks`), read on the model
                                             edited so far: layer l's keys see the updates of
                                             the layers below it
        R_l = (Z − H) / (L − i)              H: the residual after l_L on the bare prompts, on
                                             the model edited so far; the error left is spread
                                             evenly over the layers still to edit
        ΔW_l = solve_l(K_l, R_l)             MEMIT: R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹
                                             AlphaEdit: a projected solve (`alphaedit.py`)
        model ← model + ΔW_l

In the weight layout used here (`mlp_out = key @ W`, W: [F D]) the update is ΔW_l [F D], the
transpose of the papers' [D F] matrices; keys are columns of K [F N], residuals of R [D N].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float

from jaxedit.edits import WeightDelta, WeightEdit, apply_weight_edit
from jaxedit.errors import InputError
from jaxedit.methods.common import keys
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest

SITE = "mlp_out"

# solve(i, layer, K [F N], R [D N]) -> ΔW_l
Solver = Callable[[int, int, np.ndarray, np.ndarray], WeightDelta]


def check_requests(requests: Sequence[EditRequest]) -> None:
    """Refuse a batch asking one (prompt, subject) for two different targets: the two
    memories share one key, so no update can satisfy both (MEMIT would average them)."""
    seen: dict[tuple[str, str], str] = {}
    for r in requests:
        k = (r.prompt, r.subject)
        prev = seen.setdefault(k, r.target_new)
        if prev.strip() != r.target_new.strip():
            raise InputError(
                f"two requests edit {r.prompt.format(r.subject)!r} to different targets "
                f"({prev!r} and {r.target_new!r}); edit them in separate batches"
            )


def template_groups(length_params: Sequence[Sequence[int]], fixed: Sequence[str] | None) -> tuple:
    """Sizes of the template groups MEMIT averages over in turn: the bare "{}", then each
    generated length (or, for fixed templates, all but the first)."""
    if fixed is not None:
        return (1, len(fixed) - 1) if len(fixed) > 1 else (1,)
    return (1, *(int(n) for _, n in length_params if int(n) > 0))


def request_keys(
    lm: LanguageModel,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    groups: Sequence[int],
) -> Float[np.ndarray, "F N"]:
    """K_l: each request's key at `layer`, the mean of the template groups' means."""
    (k,) = keys.subject_sites(
        lm, ("mlp_key",), (layer,), [(r.prompt, r.subject) for r in requests], templates
    )
    return keys.average_over_templates(k[0], groups).T


def bare_outputs(
    lm: LanguageModel, layer: int, requests: Sequence[EditRequest]
) -> Float[np.ndarray, "D N"]:
    """H: the residual stream after `layer` at the last subject token of each bare prompt."""
    (h,) = keys.subject_sites(
        lm, ("resid",), (layer,), [(r.prompt, r.subject) for r in requests], ("{}",)
    )
    return h[0, :, 0].T


def as_delta(
    layer: int, left: Float[np.ndarray, "F N"], right: Float[np.ndarray, "D N"]
) -> WeightDelta:
    """ΔW = left rightᵀ, kept as factors while they are smaller than the dense matrix."""
    F, N = left.shape
    D = right.shape[0]
    if N * (F + D) < F * D:
        return WeightDelta(
            SITE, layer, left=left.astype(np.float32), right=right.astype(np.float32)
        )
    return WeightDelta(SITE, layer, dense=(left @ right.T).astype(np.float32))


def spread(
    lm: LanguageModel,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    zs: Float[np.ndarray, "D N"],
    templates: Sequence[str],
    groups: Sequence[int],
    solve: Solver,
) -> tuple[tuple[WeightDelta, ...], list[dict[str, Any]], LanguageModel]:
    """Run the layer loop; returns the deltas (one per layer), per-layer numbers, and the
    model with every delta applied (what AlphaEdit reads its new keys from)."""
    layers = tuple(int(x) for x in layers)
    if list(layers) != sorted(set(layers)):
        raise InputError(f"layers must be strictly increasing, got {list(layers)}")
    z_layer = layers[-1]
    cur, deltas, info = lm, [], []
    for i, layer in enumerate(layers):
        K = request_keys(cur, layer, requests, templates, groups)
        H = bare_outputs(cur, z_layer, requests)
        R = (zs - H) / (len(layers) - i)
        delta = solve(i, layer, K, R)
        cur = cur.with_params(apply_weight_edit(cur.params, WeightEdit((delta,))))
        deltas.append(delta)
        info.append(
            {
                "layer": layer,
                "z_error": float(np.linalg.norm(zs - H, axis=0).mean()),
                "update_norm": delta.norm(),
            }
        )
    return tuple(deltas), info, cur
