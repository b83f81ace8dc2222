"""What the hparams of every v*/z method share (ROME, MEMIT, AlphaEdit): the checks of the
target-value optimisation, the statistics and the templates, and the optimiser's settings,
all read from the reference code's field names (`v_num_grad_steps`, `v_lr`, ...)."""

from __future__ import annotations

from collections.abc import Sequence

from jaxedit.errors import ConfigError, InputError
from jaxedit.methods.common import templates
from jaxedit.methods.common.target_opt import TargetSettings


def check(hp, name: str, extra: Sequence[tuple[bool, str]] = ()) -> None:
    """Raise ConfigError naming the first bad field: the shared checks, then `extra`."""
    checks = [
        (hp.v_num_grad_steps >= 1, "v_num_grad_steps must be >= 1"),
        (hp.v_lr > 0, "v_lr must be positive"),
        (hp.v_weight_decay >= 0, "v_weight_decay must be >= 0"),
        (hp.clamp_norm_factor > 0, "clamp_norm_factor must be positive"),
        (hp.kl_factor >= 0, "kl_factor must be >= 0"),
        (hp.kl_prompt.count("{}") == 1, "kl_prompt needs exactly one '{}'"),
        (hp.mom2_dtype in ("float32", "float64"), "mom2_dtype: float32 or float64"),
        (
            hp.mom2_n_tokens is not None or hp.mom2_n_samples is not None,
            "give mom2_n_tokens or mom2_n_samples",
        ),
        (
            all(len(p) == 2 and p[0] >= 2 and p[1] >= 0 for p in hp.context_template_length_params),
            "context_template_length_params: [[length >= 2, count], ...]",
        ),
        *extra,
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{name}: {msg}")
    if hp.context_templates is not None:
        try:
            templates.check_templates(hp.context_templates)
        except InputError as e:
            raise ConfigError(f"{name}: {e}") from e


def target_settings(hp) -> TargetSettings:
    """The optimiser's settings from the hparams' v_* fields."""
    return TargetSettings(
        steps=hp.v_num_grad_steps,
        lr=hp.v_lr,
        weight_decay=hp.v_weight_decay,
        kl_factor=hp.kl_factor,
        clamp_norm_factor=hp.clamp_norm_factor,
        early_stop_loss=hp.early_stop_loss,
        stop_when_argmax=getattr(hp, "early_stop_argmax", False),
    )


def context_templates(lm, hp, given: Sequence[str] | None = None) -> tuple[str, ...]:
    """The templates to use: `given`, else `hp.context_templates`, else sampled from the model
    by `hp.context_template_length_params` (checked: "{}" first)."""
    chosen = given if given is not None else hp.context_templates
    if chosen is None:
        chosen = templates.sample_templates(
            lm, hp.context_template_length_params, top_k=hp.template_top_k, seed=hp.seed
        )
    return templates.check_templates(chosen)


def key_stats(lm, hp, layers: Sequence[int], cache_dir, progress: bool) -> dict:
    """{layer: Stats} of the layers' keys over the hparams' mom2_* corpus (one pass, cached)."""
    from jaxedit.stats import layers_stats

    return layers_stats(
        lm,
        layers,
        hp.mom2_corpus,
        n_tokens=hp.mom2_n_tokens,
        n_samples=hp.mom2_n_samples,
        max_len=hp.mom2_max_len,
        dtype=hp.mom2_dtype,
        cache_dir=cache_dir,
        seed=hp.seed,
        progress=progress,
    )
