"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2025, ICLR), for thousands
of edits in sequence without collapse.

MEMIT's layer loop (`common.spread`, z's as in `memit.py`) with another solve. Per layer l:

    P_l = Û Ûᵀ,  Û: eigenvectors of C_l = E[k kᵀ] with eigenvalue < nullspace_threshold   (eq. 9)

projects onto the (approximate) null space of the preserved keys K₀ (K₀ᵀ P ≈ 0). With K_p the
keys of every earlier round (their second moment accumulated in the state, on the model after
each round, as the reference's `cache_c`), the update of a round is (eq. 13, our [F D] layout)

    ΔW_l = solve(P_l (K Kᵀ + K_p K_pᵀ) + L2 · I,  P_l K Rᵀ).

ΔW_l lies in range(P_l): from the equation, L2 · ΔW = P_l (K Rᵀ − (K Kᵀ + K_p K_pᵀ) ΔW). So a
key k₀ with P_l k₀ = 0 (in the preserved subspace) maps exactly as before: k₀ᵀ ΔW = 0.
`nullspace_threshold` is absolute (2e-2, the paper's for GPT-2 XL / GPT-J / Llama-3 with their
statistics); how many directions it keeps is reported (`prepare` info `nullspace_dims`) since it
depends on the model's key scale, and so is the share of C's trace inside the null space
(`nullspace_energy` = tr(P C) / tr(C)): the part of ordinary keys' energy the update may disturb,
near 0 when C has a true null space. (SmolLM2-135M's keys at layers 3–5 have eigenvalues from
2e-3 to 0.7, no gap: 2e-2 leaves 0.38–0.59 of the energy in the "null" space;
`benchmarks/nullspace.py`.)

Options from the lifelong-editing literature, on the same solver (all off by default):
- `early_stop_argmax` (ENCORE, Gupta et al. 2025, most-probable early stopping): stop the z
  optimisation once the target is the top-1 continuation on every template.
- `norm_penalty` α: also penalise α ‖W_t + ΔW − W₀‖², the accumulated change since the
  unedited W₀ (the state carries the running sum D = W_t − W₀):
  ΔW = solve(P(KKᵀ + K_pK_pᵀ) + (L2 + α) I, P (K Rᵀ − α D)) — still in range(P). ENCORE's own
  norm constraint penalises only the round's update, μ ‖ΔW‖² (its code adds μ · I to the
  system), which is what L2 · I already is here; this one also pulls earlier rounds back.
- `anchor_value_norm`: rescale each z to the norm of the unedited residual h (‖z‖ = ‖h‖), the
  norm-growth fix of value-norm anchoring.
- `joint` (ours; off by default): one solve for every layer of the range instead of MEMIT's
  layer loop. Only the sum of the layers' writes reaches z, and the per-layer solve preserves
  every earlier edit's key at every layer: with more edits than key dimensions (d_ff) that
  leaves no room, while preserving the sum costs one constraint per edit in Σ_l d_ff
  dimensions (`benchmarks/key_overlap.py`). With A_l = P_l [K_l K_p,l] (this round's keys and
  every earlier round's, [F M]) and T = [R; 0] (R = Z − H: the residual at the last layer,
  zero change for the earlier edits), minimising L2 Σ_l ‖ΔW_l‖² + ‖Σ_l A_lᵀ ΔW_l − T‖² over
  ΔW_l in range(P_l) gives (kernel ridge regression)

      ΔW_l = A_l (Σ_m A_mᵀ A_m + L2 · I)⁻¹ T.

  The keys are read once for all layers, so an update at layer l does not see how it moves the
  keys above it (the loop's recomputation); `joint_passes` repeats the solve on the residual
  left after the previous pass, with the keys re-read on the model edited so far.
  Measured on SmolLM2-135M it does worse than the loop (README, "Many edits"): the layers
  between a write and z do not pass it through unchanged (over layers 2-5 a pass plans to
  leave 8 of a residual of 58 and leaves 38), so it writes more into the lower layers and
  loses unedited facts faster. Kept for that comparison.

State: P (fixed after `prepare`), the accumulated K_p K_pᵀ (`joint`: the keys K_p themselves),
D and the round / edit counts;
`step` returns the next state, `save_state` / `load_state` write and restore the sequential
part, refusing a file from another model, layer range or threshold.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxedit.edits import WeightDelta, WeightEdit, apply_weight_edit
from jaxedit.errors import CheckpointError, ConfigError, InputError
from jaxedit.io.atomic import write_bytes_atomic
from jaxedit.methods import memit
from jaxedit.methods.base import EditMethod, PrepareOptions
from jaxedit.methods.common import linalg, spread
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest
from jaxedit.stats import model_fingerprint

STATE_FORMAT = "jaxedit.alphaedit.state"


@dataclass(frozen=True)
class AlphaEditHparams(memit.SpreadHparams):
    nullspace_threshold: float = 2e-2  # eigenvalues of C below this span the null space
    L2: float = 10.0  # ridge on ΔW in the projected solve
    norm_penalty: float = 0.0  # α on ‖W_t + ΔW − W₀‖² (accumulated change); 0 = the paper
    anchor_value_norm: bool = False  # rescale z to ‖h‖
    joint: bool = False  # one solve over every layer for the sum of their writes (docstring)
    joint_passes: int = 2  # joint: solves per round, each on the residual the last one left

    def __post_init__(self):
        super().__post_init__()
        if self.nullspace_threshold <= 0:
            raise ConfigError("AlphaEditHparams: nullspace_threshold must be positive")
        if self.L2 <= 0:
            raise ConfigError(
                "AlphaEditHparams: L2 must be positive (P(KKᵀ + K_pK_pᵀ) is singular on the "
                "preserved subspace; L2 · I is what makes the system solvable)"
            )
        if self.norm_penalty < 0:
            raise ConfigError("AlphaEditHparams: norm_penalty must be >= 0")
        if self.joint and self.norm_penalty:
            raise ConfigError("AlphaEditHparams: joint does not take a norm_penalty")
        if self.joint_passes < 1:
            raise ConfigError("AlphaEditHparams: joint_passes must be >= 1")


@dataclass(frozen=True)
class AlphaEditState:
    base: memit.SpreadState  # templates, groups, C per layer
    P: dict[int, np.ndarray]  # null-space projector per layer, float64 [F F]
    KpKp: dict[int, np.ndarray]  # Σ over earlier rounds of K Kᵀ, float64 [F F]
    D: dict[int, np.ndarray]  # accumulated ΔW per layer (only kept with norm_penalty), [F D]
    Kp: dict[int, np.ndarray]  # joint: the keys of earlier rounds per layer, float64 [F N_p]
    rounds: int
    edits: int
    model: str  # fingerprint of the model `prepare` saw (the unedited one)

    @property
    def hp(self) -> AlphaEditHparams:
        return self.base.hp


def make_state(lm: LanguageModel, base: memit.SpreadState) -> AlphaEditState:
    """Round 0 from MEMIT's state: the projectors P_l, nothing accumulated yet."""
    hp = base.hp
    P, dims, energy = {}, {}, {}
    for layer, C in base.C.items():
        P[layer] = linalg.null_space_projector(C, hp.nullspace_threshold)
        dims[layer] = int(round(np.trace(P[layer])))
        # tr(P C) / tr(C) (P, C symmetric: Σ P∘C): the share of the preserved keys' second
        # moment inside the null space, which the update is free to disturb
        energy[layer] = float(np.sum(P[layer] * C) / np.trace(C))
    if min(dims.values()) == 0:
        raise InputError(
            f"AlphaEdit: no eigenvalue of C is below nullspace_threshold={hp.nullspace_threshold} "
            f"at layers {[k for k, v in dims.items() if v == 0]}: every update would be zero; "
            "raise the threshold"
        )
    F, Dm = lm.config.d_ff, lm.config.d_model
    zeros = {layer: np.zeros((F, F)) for layer in hp.layers}
    D = {layer: np.zeros((F, Dm)) for layer in hp.layers} if hp.norm_penalty else {}
    Kp = {layer: np.zeros((F, 0)) for layer in hp.layers} if hp.joint else {}
    stats = {**base.stats, "nullspace_dims": dims, "nullspace_energy": energy}
    base = dataclasses.replace(base, stats=stats)
    return AlphaEditState(base, P, zeros, D, Kp, 0, 0, model_fingerprint(lm))


def prepare(lm: LanguageModel, hp: AlphaEditHparams, opts: PrepareOptions) -> AlphaEditState:
    return make_state(lm, memit.prepare_spread(lm, hp, opts))


def alphaedit_solver(state: AlphaEditState) -> spread.Solver:
    hp = state.hp
    F = next(iter(state.P.values())).shape[0]

    def solve(i: int, layer: int, K: np.ndarray, R: np.ndarray) -> WeightDelta:
        P = state.P[layer]
        A = P @ (K @ K.T + state.KpKp[layer]) + (hp.L2 + hp.norm_penalty) * np.eye(F)
        b = P @ (K @ R.T)
        if hp.norm_penalty:
            b = b - hp.norm_penalty * (P @ state.D[layer])
        try:
            x = np.linalg.solve(A, b)
        except np.linalg.LinAlgError as e:
            raise InputError(f"AlphaEdit layer {layer}: the projected system is singular") from e
        if not np.all(np.isfinite(x)):
            raise InputError(f"AlphaEdit layer {layer}: the solve gave non-finite values")
        return WeightDelta(spread.SITE, layer, dense=x.astype(np.float32))

    return solve


def joint_spread(
    lm: LanguageModel, state: AlphaEditState, requests: list[EditRequest], zs: np.ndarray
) -> tuple[tuple[WeightDelta, ...], list[dict], LanguageModel]:
    """`joint`: every layer's ΔW_l = A_l (Σ_m A_mᵀ A_m + L2 · I)⁻¹ T, `joint_passes` times on
    the residual left; returns what `spread.spread` does (deltas, per-layer numbers, the
    edited model)."""
    hp, base = state.hp, state.base
    layers, z_layer = hp.layers, hp.layers[-1]
    cur, total, residuals = lm, {layer: 0.0 for layer in layers}, []
    for _ in range(hp.joint_passes):
        R = zs - spread.bare_outputs(cur, z_layer, requests)  # [D N]
        residuals.append(float(np.linalg.norm(R, axis=0).mean()))
        A = {}
        for layer in layers:
            K = spread.request_keys(cur, layer, requests, base.templates, base.groups)
            A[layer] = state.P[layer] @ np.concatenate([K, state.Kp[layer]], axis=1)  # [F M]
        M = next(iter(A.values())).shape[1]
        T = np.concatenate([R.T, np.zeros((M - R.shape[1], R.shape[0]))])  # [M D]
        G = sum(a.T @ a for a in A.values())
        try:
            X = np.linalg.solve(G + hp.L2 * np.eye(M), T)
        except np.linalg.LinAlgError as e:
            raise InputError("AlphaEdit (joint): the kernel system is singular") from e
        if not np.all(np.isfinite(X)):
            raise InputError("AlphaEdit (joint): the solve gave non-finite values")
        step_deltas = [
            WeightDelta(spread.SITE, x, dense=(A[x] @ X).astype(np.float32)) for x in layers
        ]
        cur = cur.with_params(apply_weight_edit(cur.params, WeightEdit(tuple(step_deltas))))
        for d in step_deltas:
            total[d.layer] = total[d.layer] + d.matrix()
    deltas = tuple(WeightDelta(spread.SITE, x, dense=total[x]) for x in layers)
    info = [{"layer": d.layer, "z_error": residuals[0], "update_norm": d.norm()} for d in deltas]
    info[-1]["pass_residuals"] = residuals
    return deltas, info, cur


def anchor(zs: np.ndarray, h: np.ndarray) -> np.ndarray:
    """z rescaled to the norm of the unedited residual h, column by column."""
    return zs * (np.linalg.norm(h, axis=0) / np.maximum(np.linalg.norm(zs, axis=0), 1e-30))


def step(
    lm: LanguageModel, state: AlphaEditState, requests: list[EditRequest]
) -> tuple[WeightEdit, dict, AlphaEditState]:
    """One round: the edit, its numbers, and the state with this round's keys accumulated."""
    hp, base = state.hp, state.base
    memit.check_state(lm, base)
    spread.check_requests(requests)
    t0 = time.perf_counter()
    zs, tvs = memit.target_zs(lm, base, requests)
    if hp.anchor_value_norm:
        zs = anchor(zs, np.stack([tv.v0 for tv in tvs], axis=1))
    t1 = time.perf_counter()
    if hp.joint:
        deltas, layers_info, edited = joint_spread(lm, state, requests, zs)
    else:
        deltas, layers_info, edited = spread.spread(
            lm, hp.layers, requests, zs, base.templates, base.groups, alphaedit_solver(state)
        )
    # As the reference: the keys this round adds to the preserved set are read after every
    # layer is edited.
    KpKp, Kp = dict(state.KpKp), dict(state.Kp)
    for layer in hp.layers:
        K = spread.request_keys(edited, layer, requests, base.templates, base.groups)
        if hp.joint:
            Kp[layer] = np.concatenate([Kp[layer], K], axis=1)
        else:
            KpKp[layer] = KpKp[layer] + K @ K.T
    D = {d.layer: state.D[d.layer] + d.matrix() for d in deltas} if hp.norm_penalty else {}
    new = dataclasses.replace(
        state,
        KpKp=KpKp,
        D=D,
        Kp=Kp,
        rounds=state.rounds + 1,
        edits=state.edits + len(requests),
    )
    info = {
        "layers": list(hp.layers),
        "requests": len(requests),
        "round": new.rounds,
        "edits_so_far": new.edits,
        **memit.z_summary(tvs),
        "layers_info": layers_info,
        "nullspace_dims": base.stats.get("nullspace_dims"),
        "nullspace_energy": base.stats.get("nullspace_energy"),
        "norm": float(sum(d["update_norm"] for d in layers_info)),
        "z_seconds": round(t1 - t0, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return WeightEdit(deltas, memit.edit_meta("alphaedit", lm, hp, requests)), info, new


def compute(
    lm: LanguageModel, state: AlphaEditState, requests: list[EditRequest]
) -> tuple[WeightEdit, dict]:
    """One round from `state` (the state after it is dropped: use `step` to keep it)."""
    edit, info, _ = step(lm, state, requests)
    return edit, info


# ----------------------------------------------------------------------------- state files


def _identity(state: AlphaEditState) -> dict:
    hp = state.hp
    return {
        "model": state.model,
        "layers": list(hp.layers),
        "nullspace_threshold": hp.nullspace_threshold,
        "norm_penalty": hp.norm_penalty,
        "width": int(next(iter(state.P.values())).shape[0]),
        **({"joint": True} if hp.joint else {}),  # absent: the files written before it
    }


def save_state(state: AlphaEditState, path: str | Path) -> Path:
    """The sequential part (K_pK_pᵀ, D, counts) as one safetensors file, atomically."""
    from safetensors.numpy import save

    tensors = {f"KpKp.{k}": np.ascontiguousarray(v) for k, v in state.KpKp.items()}
    tensors |= {f"D.{k}": np.ascontiguousarray(v) for k, v in state.D.items()}
    tensors |= {f"Kp.{k}": np.ascontiguousarray(v) for k, v in state.Kp.items()}
    header = {
        "format": STATE_FORMAT,
        **_identity(state),
        "rounds": state.rounds,
        "edits": state.edits,
    }
    return write_bytes_atomic(path, save(tensors, metadata={"jaxedit": json.dumps(header)}))


def load_state(state: AlphaEditState, path: str | Path) -> AlphaEditState:
    """`state` (freshly prepared) continued from the file; refused if it belongs to another
    model, layer range, threshold or penalty."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as fh:
            header = json.loads((fh.metadata() or {})["jaxedit"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for foreign / truncated files
        raise CheckpointError(f"{path}: not an AlphaEdit state file ({e})") from e
    if header.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not an AlphaEdit state file")
    want = _identity(state)
    diff = sorted(k for k in {*want, "joint"} if header.get(k) != want.get(k))
    if diff:
        raise CheckpointError(
            f"{path}: saved for another configuration ({', '.join(diff)} differ: "
            + ", ".join(f"{k}={header.get(k)!r} here {want.get(k)!r}" for k in diff)
            + ")"
        )
    try:
        KpKp = {layer: tensors[f"KpKp.{layer}"] for layer in state.hp.layers}
        D = {layer: tensors[f"D.{layer}"] for layer in state.D}
        Kp = {layer: tensors[f"Kp.{layer}"] for layer in state.Kp}
    except KeyError as e:
        raise CheckpointError(f"{path}: corrupt AlphaEdit state (missing {e})") from e
    return dataclasses.replace(
        state, KpKp=KpKp, D=D, Kp=Kp, rounds=int(header["rounds"]), edits=int(header["edits"])
    )


METHOD = EditMethod(
    name="alphaedit",
    hparams_cls=AlphaEditHparams,
    prepare_fn=prepare,
    compute_fn=compute,
    summary="MEMIT with updates projected onto the null space of preserved keys (Fang et al. 2025)",
    step_fn=step,
    save_state_fn=save_state,
    load_state_fn=load_state,
)
