"""Regularised solves for closed-form edits, under one numerics policy.

Policy: every solve runs on the host in float64 (the papers solve in fp64; C's condition number
on real text reaches 1e6-1e8, where fp32 loses the update), whatever the model's dtype. A
second moment is symmetric by construction, so one Cholesky factorisation both checks that it
is positive definite and solves; a singular or non-finite matrix is an `InputError` that says
what to do, never a silent pseudo-inverse.

    ridge:      (C + ridge · mean(diag C) · I) x = b          (relative, so scale-free)
    ROME:       u = C⁻¹ k*,   Λ = (v* − W k) / (uᵀ k)          (eq. 2; W + u Λᵀ maps k to v*)
    AlphaEdit:  P = Û Ûᵀ,  Û = eigenvectors of K₀K₀ᵀ with eigenvalue < threshold  (null space)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
from jaxtyping import Float

from jaxedit.errors import InputError


class SPDFactor(NamedTuple):
    """The Cholesky factor of C + ridge · mean(diag C) · I (lower, float64)."""

    lower: Float[np.ndarray, "F F"]
    ridge: float


def spd_factor(C: Float[np.ndarray, "F F"], ridge: float = 0.0) -> SPDFactor:
    """Factor a symmetric positive definite matrix (a key second moment) in float64."""
    C = np.asarray(C, np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise InputError(f"the key second moment must be square, got shape {C.shape}")
    if not np.all(np.isfinite(C)):
        raise InputError("the key second moment holds non-finite values (recompute the statistics)")
    if ridge < 0:
        raise InputError(f"ridge must be >= 0, got {ridge}")
    if ridge > 0:
        C = C + ridge * np.mean(np.diag(C)) * np.eye(C.shape[0])
    try:
        lower = scipy.linalg.cholesky(C, lower=True, check_finite=False)
    except np.linalg.LinAlgError as e:
        raise InputError(
            "the key second moment is singular (not positive definite): compute the statistics "
            "over more tokens, or set a ridge (hparams 'ridge', e.g. 1e-4)"
        ) from e
    return SPDFactor(lower, float(ridge))


def spd_solve(factor: SPDFactor, b: Float[np.ndarray, "F ..."]) -> Float[np.ndarray, "F ..."]:
    """x with (C + ridge) x = b, in float64 (b: a vector or a matrix of columns)."""
    b = np.asarray(b, np.float64)
    F = factor.lower.shape[0]
    if b.shape[0] != F:
        raise InputError(f"the key second moment is {F}x{F}, the right-hand side has {b.shape[0]}")
    if not np.all(np.isfinite(b)):  # no ridge helps: the activations themselves are not finite
        raise InputError(
            "the edit's key holds non-finite values: the model's activations are not finite "
            "(NaN / inf weights, or a prompt beyond the model's positions)"
        )
    x = scipy.linalg.cho_solve((factor.lower, True), b, check_finite=False)
    if not np.all(np.isfinite(x)):
        raise InputError("the solve gave non-finite values; set a ridge (hparams 'ridge', 1e-4)")
    return x


def rank_one_right(
    u: Float[np.ndarray, " F"],
    k: Float[np.ndarray, " F"],
    v_star: Float[np.ndarray, " D"],
    v_k: Float[np.ndarray, " D"],
) -> Float[np.ndarray, " D"]:
    """Λ = (v* − v_k) / (uᵀ k), with v_k = W k (+ b): then (W + u Λᵀ) maps k to v* exactly."""
    u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
    denom = float(u @ k)
    if not np.isfinite(denom) or abs(denom) < 1e-12 * np.linalg.norm(u) * np.linalg.norm(k):
        raise InputError("the edit key is orthogonal to C⁻¹k*: the rank-one update is undefined")
    return (np.asarray(v_star, np.float64) - np.asarray(v_k, np.float64)) / denom


def null_space_projector(
    C: Float[np.ndarray, "F F"], threshold: float = 1e-2
) -> Float[np.ndarray, "F F"]:
    """P = Û Ûᵀ over the eigenvectors of the symmetric C whose eigenvalues are below
    `threshold` (AlphaEdit, Fang et al. 2025, eq. 9): K₀ᵀ P ≈ 0 for the keys K₀ behind C."""
    C = np.asarray(C, np.float64)
    if not np.all(np.isfinite(C)):
        raise InputError("the key second moment holds non-finite values (recompute the statistics)")
    eigval, eigvec = np.linalg.eigh((C + C.T) / 2)
    small = eigvec[:, eigval < threshold]
    return small @ small.T
