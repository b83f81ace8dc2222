"""Subject keys: the MLP key (and value) at the subject's last token, averaged over templates.

ROME (§3.1, eq. 3) and MEMIT read the fact's key where the subject ends:

    k* = 1/N Σ_j k(x_j + p(s)),      k = mlp_key[l] at the last token of s,

with x_j the context templates (`templates.py`). The last subject token is found from
character offsets: the template, the prompt and the subject are joined as text (`compose`),
the subject's character span is known, and the last token overlapping it is the lookup token
(`subject_last_index`). Tokenizing pieces separately and adding lengths, as the reference's
`get_words_idxs_in_templates` does, miscounts when a tokenizer adds BOS or merges across the
subject's boundary.

MEMIT averages within each group of templates of one length first, then across groups:
`average_over_templates(x, groups)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError
from jaxedit.io.tokenizer import bucket
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import Params, forward


def compose(template: str, prompt: str, subject: str) -> tuple[str, int, int]:
    """template ∘ prompt with the subject filled in: (text, subject start, subject end)."""
    if "{}" not in prompt:
        raise InputError(f"prompt {prompt!r} has no '{{}}' placeholder for the subject")
    pre, post = template.split("{}", 1)
    # Data-set prompts escape literal braces ("{{"), as str.format would read them.
    p_pre, p_post = (s.replace("{{", "{").replace("}}", "}") for s in prompt.split("{}", 1))
    start = len(pre) + len(p_pre)
    return pre + p_pre + subject + p_post + post, start, start + len(subject)


def subject_last_index(offsets: Sequence[tuple[int, int]], start: int, end: int) -> int:
    """Index of the last token overlapping the subject's characters [start, end)."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise InputError("the subject covers no token of the prompt")
    return hits[-1]


def encode_at_subject(tok, template: str, prompt: str, subject: str) -> tuple[list[int], int]:
    """(token ids of template ∘ prompt(subject), index of the subject's last token)."""
    text, start, end = compose(template, prompt, subject)
    ids, offsets = tok.encode_with_offsets(text)
    tok.check_fits(len(ids), text)
    return ids, subject_last_index(offsets, start, end)


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[Int[np.ndarray, "B T"], Bool[np.ndarray, "B T"]]:
    """Rows padded on the right to `length` (default: a shape bucket); positions come from the
    mask, so row r's token t keeps position t."""
    T = length or bucket(max(map(len, rows)))
    tokens = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = True
    return tokens, mask


@partial(jax.jit, static_argnums=(0, 1, 2))
def _sites_at(
    cfg: ModelConfig,
    sites: tuple[str, ...],
    layers: tuple[int, ...],
    params: Params,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    lookup: Int[Array, " B"],
) -> tuple[Float[Array, "L B _"], ...]:
    """`sites` of `layers` at each row's lookup token (the forward stops above the layers)."""
    out = forward(cfg, params, tokens, mask, capture=sites, n_layers=max(layers) + 1)
    sel, rows = jnp.asarray(layers), jnp.arange(tokens.shape[0])
    return tuple(out.captured[s][sel][:, rows, lookup].astype(jnp.float32) for s in sites)


def subject_sites(
    lm: LanguageModel,
    sites: Sequence[str],
    layers: Sequence[int],
    requests: Sequence[tuple[str, str]],
    templates: Sequence[str],
    *,
    batch_rows: int = 64,
) -> tuple[Float[np.ndarray, "L N R _"], ...]:
    """The activations at `sites` (e.g. "mlp_key", "resid") of each layer at the last subject
    token of template_j ∘ prompt_n(subject_n), per layer, request (prompt, subject), template.

    Rows run in chunks of `batch_rows` (the last one padded), one compile per length bucket.
    """
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise InputError("no layers to read keys from")
    for layer in layers:
        if not 0 <= layer < lm.config.n_layers:
            raise InputError(f"layer {layer} out of range 0..{lm.config.n_layers - 1}")
    tok = lm.tokenizer
    rows, lookup = [], []
    for prompt, subject in requests:
        for t in templates:
            ids, i = encode_at_subject(tok, t, prompt, subject)
            rows.append(ids)
            lookup.append(i)
    parts: list[list[np.ndarray]] = [[] for _ in sites]
    for lo in range(0, len(rows), batch_rows):
        chunk = rows[lo : lo + batch_rows]
        idx = lookup[lo : lo + batch_rows]
        n = len(chunk)
        B = batch_rows if len(rows) > batch_rows else n
        chunk = chunk + [chunk[-1]] * (B - n)
        idx = idx + [idx[-1]] * (B - n)
        tokens, mask = right_pad(chunk, tok.pad_id)
        got = _sites_at(
            lm.config, tuple(sites), layers, lm.params, tokens, mask, np.asarray(idx, np.int32)
        )
        for acc, x in zip(parts, got, strict=True):
            acc.append(np.asarray(x, np.float64)[:, :n])
    N, R = len(requests), len(templates)
    return tuple(np.concatenate(p, 1).reshape(len(layers), N, R, -1) for p in parts)


def subject_reprs(
    lm: LanguageModel,
    layers: Sequence[int],
    requests: Sequence[tuple[str, str]],
    templates: Sequence[str],
    *,
    batch_rows: int = 64,
) -> tuple[Float[np.ndarray, "L N R F"], Float[np.ndarray, "L N R D"]]:
    """Keys k and outputs W k (+ b) of the MLP output projection at the last subject token of
    template_j ∘ prompt_n(subject_n), for each layer, request (prompt, subject) and template."""
    k, wk = subject_sites(
        lm, ("mlp_key", "mlp_out"), layers, requests, templates, batch_rows=batch_rows
    )
    return k, wk


def average_over_templates(
    x: Float[np.ndarray, "*lead R X"], groups: Sequence[int] | None = None
) -> Float[np.ndarray, "*lead X"]:
    """Mean over the template axis; with `groups` (sizes of consecutive template groups, MEMIT's
    per-length groups), the mean of the groups' means."""
    if groups is None:
        return x.mean(-2)
    if sum(groups) != x.shape[-2] or min(groups) <= 0:
        raise InputError(f"template groups {tuple(groups)} do not cover {x.shape[-2]} templates")
    bounds = np.cumsum([0, *groups])
    return np.mean(
        [x[..., a:b, :].mean(-2) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], axis=0
    )
