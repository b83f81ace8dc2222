"""EMMET: Equality-constrained Mass Model Editing in a Transformer (Gupta, Sajnani &
Anumanchipalli 2024, "A Unified Framework for Model Editing"), ROME's equality constraint for a
batch of edits.

ROME and MEMIT both keep the keys K₀ of ordinary text mapped as before while writing new values
V_E for the edited keys K_E; they differ in how hard the new values are asked for:

    ROME   (one key):  min ‖Ŵ K₀ − W₀ K₀‖²  s.t.  Ŵ k_e = v_e
    MEMIT  (a batch):  min λ ‖Ŵ K₀ − W₀ K₀‖² + ‖Ŵ K_E − V_E‖²      (least squares)
    EMMET  (a batch):  min ‖Ŵ K₀ − W₀ K₀‖²  s.t.  Ŵ K_E = V_E       (equality, as ROME)

With C₀ = λ K₀K₀ᵀ (λ = mom2_update_weight times the second moment E[k kᵀ]) the Lagrangian of
EMMET's problem gives (the paper's eq. for Δ, in its [D F] layout)

    Δ = (V_E − W₀ K_E) (K_Eᵀ C₀⁻¹ K_E)⁻¹ K_Eᵀ C₀⁻¹,

and for one key this is ROME's closed form C₀⁻¹k (v − W₀k)ᵀ / (kᵀC₀⁻¹k) (tested). In the
weight layout used here (`mlp_out = key @ W`, W: [F D]), with R the residual to write (MEMIT's
layer loop, `common.spread`: the z's and the residual spread over the layers exactly as
`memit.py`), each layer's update is

    D    = K_lᵀ C₀⁻¹ K_l + emmet_lambda · I          [N N]   (the I only for N > 1)
    ΔW_l = C₀⁻¹ K_l D⁻¹ R_lᵀ                         [F D]

so K_lᵀ ΔW_l = R_lᵀ exactly when emmet_lambda = 0. D has rank ≤ min(N, F): with more edits than
key dimensions (or linearly dependent keys) it is singular, which is why the authors add
emmet_lambda · I (0.1 in their presets; since D scales as 1/λ, its relative weight grows with
mom2_update_weight); the constraints then hold approximately, K_lᵀ ΔW_l = D̃ (D̃ + εI)⁻¹ R_lᵀ
with D̃ = K_lᵀC₀⁻¹K_l. `update_norm_lambda` μ adds μ · I to C₀ (a penalty on ‖ΔW‖, the
authors' option, 0 by default).

How it relates to MEMIT: by the push-through identity, MEMIT's (λ'C + KKᵀ)⁻¹K equals
C⁻¹K (KᵀC⁻¹K + λ'I)⁻¹. So for a batch with emmet_lambda = ε > 0 (and μ = 0), EMMET's update

    (λC)⁻¹K (Kᵀ(λC)⁻¹K + εI)⁻¹ = C⁻¹K (KᵀC⁻¹K + ελI)⁻¹

is MEMIT's with λ' = ε·λ, exactly (tested; the authors' GPT-J setting, λ = 10,000 and ε = 0.1,
is MEMIT at λ' = 1,000). What EMMET adds is the limit λ' → 0 that MEMIT's form cannot take
when N < F (KKᵀ is singular there): emmet_lambda = 0 asks for every equality, and one request
is ROME.

Reference: scalable-model-editing/unified-model-editing, `emmet/emmet_main.py` (EasyEdit's
`models/emmet` is the same solve, with the I added for N = 1 too). Both solves run in float64
(Cholesky, `common.linalg`); where the reference falls back to a pseudo-inverse for a singular
D, this one stops with an error naming the layer and `emmet_lambda`, so an edit is never
silently computed on a rank-deficient system. Sequential editing is stateless, as MEMIT-seq:
each round solves against the unedited C₀ on the model edited so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from jaxtyping import Float

from jaxedit.edits import WeightDelta
from jaxedit.errors import ConfigError, InputError
from jaxedit.methods import memit
from jaxedit.methods.base import EditMethod
from jaxedit.methods.common import linalg, spread


@dataclass(frozen=True)
class EMMETHparams(memit.MEMITHparams):
    """MEMIT's fields (λ = mom2_update_weight in C₀ = λ E[k kᵀ], ridge on C₀) and EMMET's own."""

    mom2_update_weight: float = 10000.0  # the authors' GPT-J value
    emmet_lambda: float = 0.1  # + emmet_lambda · I on KᵀC₀⁻¹K for N > 1 (ill-conditioned D)
    update_norm_lambda: float = 0.0  # + μ · I on C₀: a penalty on the update's norm

    def __post_init__(self):
        super().__post_init__()
        if self.mom2_update_weight <= 0:
            raise ConfigError("EMMETHparams: mom2_update_weight must be positive")
        for field in ("emmet_lambda", "update_norm_lambda", "ridge"):
            if getattr(self, field) < 0:
                raise ConfigError(f"EMMETHparams: {field} must be >= 0")


# Where the equalities are asked for exactly (emmet_lambda = 0, or one key), the written share
# Kᵀ (C₀⁻¹K D⁻¹) must be the identity to this tolerance; more keys than key dimensions, or
# linearly dependent keys, leave D singular and the equalities out of reach.
EQUALITY_ATOL = 1e-6


def why_singular(K: Float[np.ndarray, "F N"]) -> str:
    """Why KᵀC₀⁻¹K has no inverse, for the error: too many keys, two requests with one key
    (their prompts agree up to the subject's last token, so keys and z position coincide), or
    keys that are otherwise (numerically) linearly dependent."""
    F, N = K.shape
    if N > F:
        return f"{N} keys in {F} dimensions"
    unit = K / np.maximum(np.linalg.norm(K, axis=0), 1e-300)
    same = np.argwhere(np.triu(unit.T @ unit, 1) > 1 - 1e-9)
    if len(same):
        pairs = ", ".join(f"{i} and {j}" for i, j in same[:3])
        more = f" and {len(same) - 3} more pairs" if len(same) > 3 else ""
        return (
            f"requests {pairs}{more} of the batch share one key: their prompts are the same up "
            "to the end of the subject, so one value cannot give both targets exactly"
        )
    return "linearly dependent keys"


def equality_solve(
    C0_factor: linalg.SPDFactor,
    K: Float[np.ndarray, "F N"],
    emmet_lambda: float,
) -> Float[np.ndarray, "F N"]:
    """C₀⁻¹ K D⁻¹ with D = KᵀC₀⁻¹K (+ emmet_lambda · I for N > 1): the left factor of ΔW,
    whose product with Rᵀ writes R exactly into the keys K (for emmet_lambda = 0)."""
    CiK = linalg.spd_solve(C0_factor, K)  # [F N]
    D = K.T @ CiK
    F, N = K.shape
    exact = N == 1 or emmet_lambda == 0
    if not exact:
        D = D + emmet_lambda * np.eye(N)

    def singular() -> InputError:  # built only on failure: why_singular costs an N×N Gram
        return InputError(
            f"KᵀC₀⁻¹K ({N}x{N}) is singular ({why_singular(K)}): no update meets every "
            "equality; set emmet_lambda > 0 (the authors use 0.1)"
        )

    try:
        lower = scipy.linalg.cholesky((D + D.T) / 2, lower=True, check_finite=False)
    except np.linalg.LinAlgError as e:
        raise singular() from e
    left = scipy.linalg.cho_solve((lower, True), CiK.T, check_finite=False).T  # C₀⁻¹K D⁻¹
    # Cholesky can "succeed" on a rank-deficient D whose zero pivots rounding made positive;
    # the result then writes only the projection of R onto range(D). Check what is written.
    if exact and not np.abs(K.T @ left - np.eye(N)).max() <= EQUALITY_ATOL:
        raise singular()
    return left


def emmet_solver(state: memit.SpreadState, hp: EMMETHparams) -> spread.Solver:
    """ΔW_l = C₀⁻¹ K (KᵀC₀⁻¹K + emmet_lambda · I)⁻¹ Rᵀ, C₀ = λC + μI, float64 Cholesky."""

    def solve(i: int, layer: int, K: np.ndarray, R: np.ndarray) -> WeightDelta:
        F = K.shape[0]
        C0 = hp.mom2_update_weight * state.C[layer] + hp.update_norm_lambda * np.eye(F)
        try:
            left = equality_solve(linalg.spd_factor(C0, hp.ridge), K, hp.emmet_lambda)
        except InputError as e:
            raise InputError(f"EMMET layer {layer}: {e}") from e
        return spread.as_delta(layer, left, R)

    return solve


METHOD = EditMethod(
    name="emmet",
    hparams_cls=EMMETHparams,
    prepare_fn=memit.prepare_spread,
    compute_fn=memit.spread_compute("emmet", emmet_solver),
    summary="many facts under ROME's equality constraint in one solve (Gupta et al. 2024)",
)
