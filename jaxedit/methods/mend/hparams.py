"""MEND's hyperparameters and the static layout of an editor (which weights, which share a net).

Presets live in `jaxedit/hparams/mend/<preset>.json` and load through the one loader
(`jaxedit.hparams.load`, or `jaxedit.methods.get("mend").hparams(...)`): a preset name, a JSON
path or a model mapped by `jaxedit/hparams/models.json`; a model with no preset is an error.

Two fields are for *using* a trained editor and play no part in training (a resumed run
ignores them): `editor`, the directory `jaxedit mend-train` wrote (None for training-only use;
`prepare` then refuses), and `edit_scale`, a factor on every learned step size η_l.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from jaxedit import hparams as hparams_lib
from jaxedit.errors import ConfigError
from jaxedit.models.config import ModelConfig

# Edited weights are addressed by the site their layer produces (see `jaxedit.models.sites`):
#   mlp_out  = down / c_proj / fc_out   [F, D], input u = mlp_key
#   mlp_up   = up   / c_fc   / fc_in    [D, F], input u = mlp_in
#   mlp_gate = gate (SwiGLU only)       [D, F], input u = mlp_in
EDITABLE = ("mlp_out", "mlp_up", "mlp_gate")
LOC_KL_POSITIONS = ("all", "answer")
USE_TIME_FIELDS = ("editor", "edit_scale")  # not part of what was trained


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
    # Where the locality KL(p_W ‖ p_W̃) is taken on the locality input (prompt + answer):
    #   "all"    every token of it, the mean over its non-padding positions: eric-mitchell/mend,
    #            trainer.py `edit_step` passes the locality batch's attention_mask (decoder-only
    #            models have no decoder_attention_mask) to losses.py `kl_loc_loss`, which returns
    #            Σ_t m_t KL_t / Σ_t m_t (the last token, predicting past the text, included);
    #   "answer" only the positions that predict an answer token (what jaxedit did before).
    loc_kl_positions: str = "all"
    grad_clip: float = 100.0  # global-norm clip of the accumulated meta-gradient
    accumulate: int = 10  # meta-gradient accumulation (steps per optimiser update)
    batch: int = 1  # edits per step (vmapped, independent)
    max_len: int = 24  # token length of every training sequence (longer records are skipped)
    max_target: int = 8  # scored (label) tokens per training sequence (longer are skipped)
    seed: int = 0
    # -- use time only --
    editor: str | None = None  # a `jaxedit mend-train` output directory
    edit_scale: float = 1.0  # multiplies every η_l: trades efficacy for locality, no retraining

    def __post_init__(self):
        if self.loc_kl_positions not in LOC_KL_POSITIONS:
            raise ConfigError(
                f"loc_kl_positions must be one of {LOC_KL_POSITIONS}, not {self.loc_kl_positions!r}"
            )
        if not (math.isfinite(self.edit_scale) and self.edit_scale >= 0):
            raise ConfigError(f"edit_scale must be a finite number ≥ 0, not {self.edit_scale}")

    def replace(self, **kw: Any) -> MENDHparams:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weights"] = [list(w) for w in self.weights]
        return d

    def training_dict(self) -> dict:
        """The fields that define a training run (what a resumed run must match)."""
        return {k: v for k, v in self.to_dict().items() if k not in USE_TIME_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> MENDHparams:
        """From a saved editor's config: unknown keys refused; fields it predates take defaults
        (an editor trained before `loc_kl_positions` existed took the KL at answer positions)."""
        d = dict(d)
        d.setdefault("loc_kl_positions", "answer")
        return hparams_lib.build(cls, d, "editor config")


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


def weight_dims(cfg: ModelConfig, site: str) -> tuple[int, int]:
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
    """One group per distinct weight shape (`shared`, as the reference) or per weight."""
    weights = resolve_weights(cfg, hp)
    groups: dict[str, list] = {}
    for i, (site, layer) in enumerate(weights):
        n_in, n_out = weight_dims(cfg, site)
        name = f"{n_in}x{n_out}" if hp.shared else f"{site}.{layer}"
        groups.setdefault(name, [name, n_in, n_out, []])[3].append(i)
    return Layout(
        weights, tuple((n, n_in, n_out, tuple(m)) for n, n_in, n_out, m in groups.values())
    )
