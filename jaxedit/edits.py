"""An edit is data: a **weight edit** or a **context edit**, applied by one function.

    lm2 = apply(lm, edit)            # lm untouched
    lm0 = apply(lm2, edit.invert())  # weight edits: the original params again
    save_edit(edit, "e.safetensors"); edit = load_edit("e.safetensors")

A `WeightEdit` is a sequence of `WeightDelta`s, each an additive change of the weight that
produces a site (`jaxedit.models.sites`: `mlp_out` is the [F, D] matrix with
mlp_out = mlp_key @ W) at one layer, as low-rank factors ΔW = left @ rightᵀ (ROME: rank one,
u vᵀ; MEND: rank = number of edit tokens, η Σ_t ũ_t δ̃_tᵀ) or as a dense matrix. Deltas add,
so edits compose by concatenation (`compose`: a sequence of edits is one edit) and invert by
negation. `apply` sums the deltas of each (site, layer) in fp32 and writes every stacked
weight array once, storing the result in the param dtype.

A `ContextEdit` (IKE) changes no weight: it holds new facts and demonstrations, and `apply`
gives a model whose scoring and generation see the rendered context through a prefix KV cache
(`LanguageModel.context`). Context edits compose too: all facts so far, with the
demonstrations re-fitted to the model's context length when the context is rendered.

Files are safetensors (tensors + a JSON header in the metadata); nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from jaxedit.errors import CheckpointError, InputError
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import add_to_weights, weight_path

FORMAT = "jaxedit-edit"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------- weight edits


@dataclass(frozen=True)
class WeightDelta:
    """ΔW added to the [I, O] weight of `site` at `layer`: left @ rightᵀ, or `dense`."""

    site: str
    layer: int
    left: Float[np.ndarray, "I R"] | None = None
    right: Float[np.ndarray, "O R"] | None = None
    dense: Float[np.ndarray, "I O"] | None = None

    def __post_init__(self):
        low_rank = self.left is not None and self.right is not None
        if low_rank == (self.dense is not None) or (self.left is None) != (self.right is None):
            raise InputError(f"{self.site}.{self.layer}: give left and right factors, or dense")
        if low_rank and (
            self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[1]
        ):
            raise InputError(
                f"{self.site}.{self.layer}: factors must be [I R] and [O R], got "
                f"{self.left.shape} and {self.right.shape}"
            )
        weight_path(self.site)  # an unknown site fails here, not at apply time

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.left.shape[0], self.right.shape[0])

    def matrix(self) -> Float[np.ndarray, "I O"]:
        """ΔW in fp32."""
        if self.dense is not None:
            return np.asarray(self.dense, np.float32)
        return np.asarray(self.left, np.float32) @ np.asarray(self.right, np.float32).T

    def device_matrix(self) -> Float[Array, "I O"]:
        """ΔW in fp32, formed on the device from the factors (only they are transferred)."""
        if self.dense is not None:
            return jnp.asarray(self.dense, jnp.float32)
        return jnp.asarray(self.left, jnp.float32) @ jnp.asarray(self.right, jnp.float32).T

    def norm(self) -> float:
        """‖ΔW‖_F."""
        return float(np.linalg.norm(self.matrix()))

    def scaled(self, scale: float) -> WeightDelta:
        if self.dense is not None:
            return WeightDelta(self.site, self.layer, dense=np.asarray(self.dense) * scale)
        return WeightDelta(self.site, self.layer, np.asarray(self.left) * scale, self.right)


@dataclass(frozen=True)
class WeightEdit:
    """Additive changes of addressed weights; `meta` is JSON-able (method, hparams, ...)."""

    deltas: tuple[WeightDelta, ...]
    meta: dict = field(default_factory=dict, compare=False)

    kind = "weight"

    def invert(self) -> WeightEdit:
        """The edit that undoes this one (apply(apply(lm, e), e.invert()) has lm's params)."""
        return WeightEdit(tuple(d.scaled(-1.0) for d in reversed(self.deltas)), dict(self.meta))

    def compose(self, later: WeightEdit) -> WeightEdit:
        """One edit equal to applying `self`, then `later`."""
        if not isinstance(later, WeightEdit):
            raise InputError("a weight edit composes only with another weight edit")
        return WeightEdit(self.deltas + later.deltas, {**self.meta, "composed": True})

    def sites(self) -> list[tuple[str, int]]:
        """The distinct (site, layer) pairs this edit changes."""
        return sorted({(d.site, d.layer) for d in self.deltas})

    def norm(self) -> float:
        """‖ΔW‖_F summed over the changed weights (each (site, layer) summed first)."""
        sums = _summed(self.deltas, WeightDelta.matrix)
        return float(sum(np.linalg.norm(m) for m in sums.values()))

    def consolidated(self) -> WeightEdit:
        """The same change with one delta per (site, layer), in (site, layer) order.

        The factors of a (site, layer) are concatenated (Σ_i L_i R_iᵀ = [L_1 … L_n] [R_1 …
        R_n]ᵀ) while their total rank R keeps (I + O)·R below the I·O numbers of the dense sum;
        otherwise (or when a dense delta is among them) the one delta is that fp32 sum. A long
        sequence of edits (lifelong editing: MEMIT rounds of 100 requests give rank-100 factors
        per layer and round) then stays at most one dense matrix per weight.
        """
        groups: dict[tuple[str, int], list[WeightDelta]] = {}
        for d in self.deltas:
            groups.setdefault((d.site, d.layer), []).append(d)
        out = []
        for (site, layer), ds in sorted(groups.items()):
            (n_in, n_out), rank = ds[0].shape, 0
            if all(d.dense is None for d in ds):
                rank = sum(d.left.shape[1] for d in ds)
            if rank and (n_in + n_out) * rank < n_in * n_out:
                left = np.concatenate([np.asarray(d.left, np.float32) for d in ds], axis=1)
                right = np.concatenate([np.asarray(d.right, np.float32) for d in ds], axis=1)
                out.append(WeightDelta(site, layer, left, right))
            else:
                dense = _summed(ds, WeightDelta.matrix)[(site, layer)]
                out.append(WeightDelta(site, layer, dense=dense))
        return WeightEdit(tuple(out), dict(self.meta))


def _summed(deltas: Iterable[WeightDelta], matrix: Callable[[WeightDelta], Any]) -> dict:
    """(site, layer) -> the sum of its deltas' matrices."""
    out: dict[tuple[str, int], Any] = {}
    for d in deltas:
        key = (d.site, d.layer)
        out[key] = out[key] + matrix(d) if key in out else matrix(d)
    return out


def apply_weight_edit(params: dict, edit: WeightEdit, *, donate: bool = False) -> dict:
    """New params with every delta added (fp32 arithmetic, stored in the param dtype).

    `donate=True`: the edited stacks are updated in their own buffers (`add_to_weights`), and
    `params` must not be used again; an edit refused (wrong shape or layer) changes nothing.

    Sharded params (`jaxedit.models.sharding`) stay sharded, and the model is never gathered:
    each ΔW is formed on the devices already split like the weight it joins (the factors are
    placed split along I and O, so every device multiplies out only its own block), and the
    new stacked weight keeps the old one's sharding.
    """
    by_site: dict[str, dict[int, list[WeightDelta]]] = {}
    for d in edit.deltas:
        by_site.setdefault(d.site, {}).setdefault(d.layer, []).append(d)
    # Every site checked and every ΔW formed before the first weight changes: with `donate`, a
    # refusal halfway would otherwise leave the caller's model with stacks already consumed.
    updates = []
    for site, per_layer in by_site.items():
        layers = tuple(sorted(per_layer))
        stacked = _leaf(params, weight_path(site))
        want = tuple(stacked.shape[1:])
        for layer in layers:
            for d in per_layer[layer]:
                if d.shape != want:
                    raise InputError(
                        f"edit of {site}.{layer} has shape {d.shape}, the model's "
                        f"weight is {want} (an edit made for another model?)"
                    )
            if not 0 <= layer < stacked.shape[0]:
                raise InputError(f"edit of {site}.{layer}: the model has {stacked.shape[0]} layers")
        sharding = _mesh_sharding(stacked)
        matrix = functools.partial(_matrix_on, stacked=sharding)
        deltas = jnp.stack([_summed(per_layer[x], matrix)[(site, x)] for x in layers])
        updates.append((site, layers, deltas, sharding))
    for site, layers, deltas, sharding in updates:
        params = add_to_weights(params, site, layers, deltas, donate=donate)
        if sharding is not None:
            new = _leaf(params, weight_path(site))
            if new.sharding != sharding:  # a no-op where XLA kept the layout (it does on CPU)
                params = _replace_leaf(params, weight_path(site), jax.device_put(new, sharding))
    return params


def _mesh_sharding(x) -> NamedSharding | None:
    """The sharding of `x` when it is split or replicated over a mesh of several devices."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding
    return None


def _matrix_on(d: WeightDelta, stacked: NamedSharding | None) -> Float[Array, "I O"]:
    """ΔW in fp32; with `stacked` (the sharding of the [L I O] weight), split as one of its
    layers: the left factor split along I and the right along O, so their product is formed
    block by block where the blocks live (a dense delta is placed split)."""
    if stacked is None:
        return d.device_matrix()
    spec = tuple(stacked.spec) + (None,) * (3 - len(stacked.spec))
    split_in, split_out = spec[1], spec[2]

    def put(a, *axes):
        return jax.device_put(
            np.asarray(a, np.float32), NamedSharding(stacked.mesh, PartitionSpec(*axes))
        )

    if d.dense is not None:
        return put(d.dense, split_in, split_out)
    return put(d.left, split_in, None) @ put(d.right, split_out, None).T


def _replace_leaf(params: dict, path: Sequence[str], leaf) -> dict:
    if len(path) == 1:
        return {**params, path[0]: leaf}
    return {**params, path[0]: _replace_leaf(params[path[0]], path[1:], leaf)}


def _leaf(params: dict, path: Sequence[str]):
    node = params
    for key in path:
        node = node[key]
    return node


# ----------------------------------------------------------------------------- context edits

FACT_LINE = "New Fact: {}\n"
QUERY_LEAD = "Prompt: "


@dataclass(frozen=True)
class Demonstration:
    """One in-context demonstration (IKE: copy / update / retain) and where it came from."""

    kind: str
    text: str
    similarity: float = 0.0
    source: int = -1  # index into the demonstration pool


@dataclass(frozen=True)
class ContextEdit:
    """New facts and demonstrations in front of every query (IKE, Zheng et al. 2023).

    Rendered as  d_1 … d_k  "New Fact: {f_1}\\n" … "New Fact: {f_n}\\n"  "Prompt: ".
    `demonstrations` are ordered least similar first; `reserve_tokens` is what the longest
    query and answer of the edited facts need after the context. When the whole does not fit
    the model, `render` drops demonstrations from the front (least similar, earliest edits
    first), never a fact.
    """

    facts: tuple[str, ...]
    demonstrations: tuple[Demonstration, ...] = ()
    reserve_tokens: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    kind = "context"

    def compose(self, later: ContextEdit) -> ContextEdit:
        """All facts so far; demonstrations of both (duplicates once) merged least similar
        first, re-fitted at render."""
        if not isinstance(later, ContextEdit):
            raise InputError("a context edit composes only with another context edit")
        seen = {d.text for d in later.demonstrations}
        demos = tuple(d for d in self.demonstrations if d.text not in seen) + later.demonstrations
        # Merged by similarity (a stable sort: ties keep the earlier edit's first), so that
        # `fit`, which drops from the front, drops the least similar of all edits' first.
        demos = tuple(sorted(demos, key=lambda d: d.similarity))
        return ContextEdit(
            self.facts + later.facts,
            demos,
            max(self.reserve_tokens, later.reserve_tokens),
            {**self.meta, "composed": True},
        )

    def invert(self) -> ContextEdit:
        raise InputError(
            "a context edit changes no weight: use the model without it (lm.with_context(None))"
        )

    def head(self) -> str:
        return "".join(FACT_LINE.format(f) for f in self.facts) + QUERY_LEAD

    def fit(self, tokenizer, max_tokens: int) -> tuple[tuple[Demonstration, ...], int]:
        """(kept demonstrations, number dropped) so that context + reserve ≤ max_tokens."""
        head = len(tokenizer.encode(self.head()))
        if head + self.reserve_tokens > max_tokens:
            raise InputError(
                f"the {len(self.facts)} new fact(s) and the longest query need "
                f"{head + self.reserve_tokens} tokens, more than the {max_tokens} the model accepts"
            )
        demos = self.demonstrations
        for dropped in range(len(demos) + 1):
            if (
                len(tokenizer.encode(self.text(demos[dropped:]))) + self.reserve_tokens
                <= max_tokens
            ):
                return demos[dropped:], dropped
        raise AssertionError("unreachable: the head alone fits")

    def text(self, demonstrations: Sequence[Demonstration] | None = None) -> str:
        """The context with these demonstrations (default: all of them), not fitted."""
        demos = self.demonstrations if demonstrations is None else demonstrations
        return "".join(d.text for d in demos) + self.head()

    def render(self, tokenizer, max_tokens: int) -> str:
        """The context text, fitted to `max_tokens`."""
        return self.text(self.fit(tokenizer, max_tokens)[0])


Edit = WeightEdit | ContextEdit


# ----------------------------------------------------------------------------- apply / compose


def apply(lm: LanguageModel, edit: Edit, *, donate: bool = False) -> LanguageModel:
    """A new model with `edit` applied; `lm` is untouched.

    A weight edit changes params; a context edit joins the model's context (composed after
    any context it already has).

    `donate=True` (weight edits) trades that guarantee for speed where the old model is
    dropped anyway, as in sequential editing (`lm = apply(lm, edit, donate=True)`): each
    edited weight stack is updated in place, its buffer given to XLA, instead of written anew
    (on a CPU a new 106 MB stack costs ~0.1 s, in place ~1 ms). The stacks the edit touches are
    deleted from `lm` and from every model sharing them, which then raise on use.
    """
    if isinstance(edit, WeightEdit):
        if not edit.deltas:
            return lm
        return lm.with_params(apply_weight_edit(lm.params, edit, donate=donate))
    if isinstance(edit, ContextEdit):
        return lm.with_context(edit if lm.context is None else lm.context.compose(edit))
    raise InputError(f"not an edit: {type(edit).__name__}")


def compose(edits: Sequence[Edit]) -> Edit:
    """One edit equal to applying `edits` in order (all of one kind)."""
    if not edits:
        raise InputError("no edits to compose")
    out = edits[0]
    for e in edits[1:]:
        out = out.compose(e)
    return out


# ----------------------------------------------------------------------------- files


def save_edit(edit: Edit, path: str | os.PathLike) -> Path:
    """Write `edit` to one safetensors file (atomically): tensors plus a JSON header."""
    from safetensors.numpy import save

    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    if isinstance(edit, WeightEdit):
        entries = []
        for i, d in enumerate(edit.deltas):
            parts = (
                {"dense": d.dense} if d.dense is not None else {"left": d.left, "right": d.right}
            )
            for name, arr in parts.items():
                tensors[f"{i}.{name}"] = np.ascontiguousarray(arr, np.float32)
            entries.append({"site": d.site, "layer": d.layer, "parts": sorted(parts)})
        body: dict[str, Any] = {"deltas": entries}
    elif isinstance(edit, ContextEdit):
        body = {
            "facts": list(edit.facts),
            "demonstrations": [vars(d) for d in edit.demonstrations],
            "reserve_tokens": edit.reserve_tokens,
        }
    else:
        raise InputError(f"not an edit: {type(edit).__name__}")
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": edit.kind,
        "meta": edit.meta,
        **body,
    }
    data = save(tensors, metadata={"jaxedit": json.dumps(header, default=_jsonable)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_edit(path: str | os.PathLike) -> Edit:
    """Read a file written by `save_edit`; anything else is refused with the reason."""
    from safetensors.numpy import load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read edit file ({e})") from e
    try:
        from safetensors import safe_open

        with safe_open(path, "np") as fh:
            header = json.loads((fh.metadata() or {})["jaxedit"])
        tensors = load(raw)
    except Exception as e:  # safetensors raises several types for foreign / truncated files
        raise CheckpointError(f"{path}: not a jaxedit edit file ({e})") from e
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a jaxedit edit file of version {FORMAT_VERSION}")
    try:
        if header["kind"] == "weight":
            deltas = tuple(
                WeightDelta(
                    e["site"], int(e["layer"]), **{p: tensors[f"{i}.{p}"] for p in e["parts"]}
                )
                for i, e in enumerate(header["deltas"])
            )
            return WeightEdit(deltas, header.get("meta", {}))
        if header["kind"] == "context":
            demos = tuple(Demonstration(**d) for d in header["demonstrations"])
            return ContextEdit(
                tuple(header["facts"]), demos, int(header["reserve_tokens"]), header.get("meta", {})
            )
    except (KeyError, TypeError, InputError) as e:
        raise CheckpointError(f"{path}: corrupt edit file ({e})") from e
    raise CheckpointError(f"{path}: unknown edit kind {header.get('kind')!r}")


def _jsonable(o):
    if isinstance(o, np.ndarray | np.generic):
        return o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")
