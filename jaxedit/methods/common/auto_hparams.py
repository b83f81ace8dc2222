"""ROME hyperparameters for a model without a preset: the layer from our own causal trace.

ROME edits the MLP that mediates factual recall: the layer whose restored MLP output brings the
answer back most when the subject is corrupted (Meng et al. 2022, §2: the "early site" at the
last subject token). For a model no preset was written for, that is measured, not guessed:

    AIE_l = (1/|K|) Σ_{f ∈ K}  P*_{clean mlp_out[l - w/2, l + w/2) at s_f}[o_f] − P*[o_f]
    layer = argmax_l AIE_l

where K are facts the model knows (its clean top-1 token is the first token of the true
answer), s_f the last subject token, o_f the answer, P* the probability with the subject's
embeddings corrupted by 3σ noise (10 samples), restored MLP outputs over a window of
w = min(10, max(1, L // 3)) layers (ROME's 10 for GPT-2 XL; at most a third of the depth so a
shallow model still shows a peak) — `jaxedit.locate.trace.trace_dataset`, the same computation
as `jaxedit trace --data`. On the embedded SmolLM2-135M this gives layer 4, the layer its
preset was written with from a trace over known_1000.

- K: the built-in facts (`jaxedit.locate.facts.FACTS`) the model knows; when fewer than
  MIN_FACTS, also known_1000 (`jaxedit data get known_1000`) if it is downloaded, up to
  N_FACTS traced facts in all.
- **Fallback** when fewer than MIN_FACTS facts are known, or the peak AIE is below MIN_EFFECT
  (no localised effect: a random or tiny model): layer = round(FALLBACK_DEPTH · L), the median
  relative depth of the shipped ROME presets (`PRESET_DEPTHS`: GPT-2 XL 17/48, GPT-J 5/28,
  Llama-7B 5/32, Llama-3-8B 5/32, Qwen2.5-7B 5/28, SmolLM2-135M 4/30 -> 0.167, about L/6).
- Statistics: C = E[k kᵀ] from text sampled from the model itself (`mom2_corpus="self"`,
  offline), TOKENS_PER_KEY = 10 tokens per key dimension (10 · d_ff, rounded up to 1,024; the
  ratio `jaxedit.stats.DEFAULT_N_TOKENS` is sized by), not a preset's 100k Wikipedia articles.
- Context templates: ROME's (10 × 5 and 10 × 10 generated tokens), the 5-token ones only for
  a model with fewer than SHORT_CONTEXT = 256 positions (a prompt must fit after them).
- Everything else: `ROMEHparams` defaults (the ROME paper's values).

The choice costs one trace of up to N_FACTS facts (about 20 s to 2 min for a 135M model on a
CPU) and is cached per model fingerprint (sha256 over every weight) as JSON in
`<cache>/hparams/` (atomic; a file of another version or settings is recomputed). `explain`
says what was chosen and why.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jaxedit.errors import InputError
from jaxedit.models.lm import LanguageModel

METHODS = ("rome",)  # methods whose hparams this module can choose
VERSION = 1
MIN_FACTS = 3
N_FACTS = 10
MIN_EFFECT = 0.02  # peak AIE below this: no localised recall to read a layer from
SAMPLES = 10
NOISE = "3s"
TOKENS_PER_KEY = 10
KNOWN_1000_CANDIDATES = 200  # records of known_1000 tried when the built-ins are not enough
CLASS = "last subject token"
SHORT_CONTEXT = 256
# ROME presets shipped in jaxedit/hparams/rome: (layer, number of layers of the model).
PRESET_DEPTHS = {
    "gpt2-xl": (17, 48),
    "gpt-j": (5, 28),
    "llama-7b": (5, 32),
    "llama3-8b": (5, 32),
    "qwen2.5-7b": (5, 28),
    "smollm2-135m": (4, 30),
}
FALLBACK_DEPTH = statistics.median(layer / n for layer, n in PRESET_DEPTHS.values())


@dataclass(frozen=True)
class LayerChoice:
    """The chosen layer and everything that explains it (JSON-able)."""

    model: str
    fingerprint: str
    n_layers: int
    d_ff: int
    layer: int
    rule: str  # "trace" | "fallback"
    reason: str  # one sentence
    window: int
    samples: int
    facts: list[str] = field(default_factory=list)  # subjects of the traced facts
    n_candidates: int = 0  # facts tried (known or not)
    aie: list[float] | None = None  # mean indirect effect per layer (None: no fact traced)
    peak_effect: float | None = None
    mom2_n_tokens: int = 0
    templates: list[list[int]] = field(default_factory=list)  # context_template_length_params
    seconds: float = 0.0
    version: int = VERSION

    def settings(self) -> dict:
        return {"version": self.version, "window": self.window, "samples": self.samples}


def window_for(n_layers: int) -> int:
    return min(10, max(1, n_layers // 3))


def fallback_layer(n_layers: int) -> int:
    return min(n_layers - 1, int(FALLBACK_DEPTH * n_layers + 0.5))


def templates_for(max_positions: int) -> list[list[int]]:
    """ROME's context templates (10 × 5 and 10 × 10 generated tokens before the prompt); a
    model with fewer than SHORT_CONTEXT positions gets the 5-token ones only, so that a prompt
    still fits after its longest template."""
    return [[5, 10]] if max_positions < SHORT_CONTEXT else [[5, 10], [10, 10]]


def stats_tokens(d_ff: int) -> int:
    """TOKENS_PER_KEY · F rounded up to a multiple of 1,024."""
    return -(-TOKENS_PER_KEY * d_ff // 1024) * 1024


def cache_dir() -> Path:
    from jaxedit.stats.cache import default_cache_dir

    return default_cache_dir().parent / "hparams"


def cache_file(fingerprint: str) -> Path:
    return cache_dir() / f"{fingerprint}.json"


# ----------------------------------------------------------------------------- the choice


def _facts(lm: LanguageModel) -> tuple[list[dict], str, int]:
    """(facts to trace, where they come from, candidates tried): the built-in facts the model
    answers right (clean top-1 = first token of the true answer); when fewer than MIN_FACTS,
    also the first KNOWN_1000_CANDIDATES records of known_1000 if it is downloaded (the trace
    keeps those the model answers right)."""
    from jaxedit.locate import trace as tr
    from jaxedit.locate.facts import FACTS

    builtin, ids = [], []
    for f in FACTS:
        fact = {"prompt": f.rewrite_prompt, "subject": f.subject, "expect": f.target_true}
        try:
            ids.append(tr.locate_subject(lm.tokenizer, fact["prompt"], fact["subject"])[0])
        except InputError:  # a tokenizer that cannot place the subject: not traceable
            continue
        builtin.append(fact)
    top1 = tr.clean_top1(lm, ids) if ids else []
    known = [
        f
        for f, answer in zip(builtin, top1, strict=True)
        if tr.answer_matches(lm.tokenizer, answer, f["expect"])
    ]
    if len(known) >= MIN_FACTS:
        return known, "the built-in facts", len(FACTS)
    from jaxedit.eval.datasets import registry

    path = registry.cached("known_1000")
    if path is None:
        return known, "the built-in facts; known_1000 is not downloaded", len(FACTS)
    extra = tr.load_facts(str(path), KNOWN_1000_CANDIDATES)
    return known + extra, "the built-in facts and known_1000", len(FACTS) + len(extra)


def choose_layer(lm: LanguageModel, *, refresh: bool = False) -> LayerChoice:
    """The ROME layer for `lm` (cached per fingerprint; `refresh` recomputes)."""
    from jaxedit.stats.cache import model_fingerprint

    fp = model_fingerprint(lm)
    hit = None if refresh else _CHOSEN.get(fp) or _read(fp, lm.config.n_layers)
    if hit is None:
        hit = _trace_choice(lm, fp)
        _write(hit)
    _CHOSEN[fp] = hit
    return hit


_CHOSEN: dict[str, LayerChoice] = {}  # fingerprint -> the choice made or read in this process


def chosen(lm: LanguageModel) -> LayerChoice | None:
    """The choice `choose_layer` made or read for `lm` in this process (None: none)."""
    from jaxedit.stats.cache import model_fingerprint

    return _CHOSEN.get(model_fingerprint(lm))


def _trace_choice(lm: LanguageModel, fp: str) -> LayerChoice:
    from jaxedit import progress
    from jaxedit.locate import trace as tr

    t0 = time.perf_counter()
    cfg = lm.config
    L, w = cfg.n_layers, window_for(cfg.n_layers)
    base = {
        "model": lm.name,
        "fingerprint": fp,
        "n_layers": L,
        "d_ff": cfg.d_ff,
        "window": w,
        "samples": SAMPLES,
        "mom2_n_tokens": stats_tokens(cfg.d_ff),
        "templates": templates_for(cfg.max_positions),
    }
    facts, source, n_tried = _facts(lm)
    summary, results = {}, []
    if facts:
        summary, results = tr.trace_dataset(
            lm,
            facts,
            kinds=("mlp",),
            classes=(CLASS,),
            samples=SAMPLES,
            noise=NOISE,
            window=w,
            progress=progress.shown(),
            limit=N_FACTS,
        )
    subjects = [r["subject"] for r in results]
    fb = fallback_layer(L)
    depth = (
        f"layer = round({FALLBACK_DEPTH:.3f} × {L}) = {fb}, {FALLBACK_DEPTH:.3f} being the median "
        "relative depth of the shipped ROME presets"
    )
    done = {"facts": subjects, "n_candidates": n_tried}
    if len(results) < MIN_FACTS:
        reason = (
            f"the model answers {len(results)} of the {n_tried} candidate facts ({source}), "
            f"fewer than {MIN_FACTS} to trace; fallback depth: {depth}"
        )
        done["seconds"] = round(time.perf_counter() - t0, 1)
        return LayerChoice(**base, **done, layer=fb, rule="fallback", reason=reason)
    aie = np.asarray(summary["kinds"]["mlp"][CLASS]["mean"], np.float64)
    peak = int(np.argmax(aie))
    if aie[peak] < MIN_EFFECT:
        layer, rule = fb, "fallback"
        reason = (
            f"the MLP indirect effect at the last subject token peaks at only {aie[peak]:.3f} "
            f"(layer {peak}; below {MIN_EFFECT}) over {len(results)} known facts; fallback "
            f"depth: {depth}"
        )
    else:
        layer, rule = peak, "trace"
        reason = (
            f"the MLP indirect effect at the last subject token ({w}-layer window) peaks at "
            f"layer {peak} (AIE {aie[peak]:.3f}) over {len(results)} facts the model knows "
            f"({source})"
        )
    return LayerChoice(
        **base,
        **done,
        layer=layer,
        rule=rule,
        reason=reason,
        aie=[round(float(x), 5) for x in aie],
        peak_effect=round(float(aie[peak]), 5),
        seconds=round(time.perf_counter() - t0, 1),
    )


def _read(fp: str, n_layers: int) -> LayerChoice | None:
    """The cached choice, or None when missing, unreadable or of other settings."""
    path = cache_file(fp)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        choice = LayerChoice(**raw)
    except (OSError, ValueError, TypeError):
        return None
    want = {"version": VERSION, "window": window_for(n_layers), "samples": SAMPLES}
    if choice.fingerprint != fp or choice.settings() != want or not 0 <= choice.layer < n_layers:
        return None
    return choice


def _write(choice: LayerChoice) -> None:
    from jaxedit.io.atomic import write_text_atomic

    write_text_atomic(cache_file(choice.fingerprint), json.dumps(asdict(choice), indent=1))


# ----------------------------------------------------------------------------- hparams


def raw_hparams(method: str, lm: LanguageModel) -> dict:
    """The hparams fields chosen for `method` on `lm` (for `jaxedit.hparams.build`)."""
    if method not in METHODS:
        raise InputError(
            f"{method} has no automatic hparams (only {', '.join(METHODS)}): pass --hparams"
        )
    c = choose_layer(lm)
    return {
        "description": f"chosen automatically (jaxedit.methods.common.auto_hparams): {c.reason}",
        "layer": c.layer,
        "mom2_corpus": "self",
        "mom2_n_samples": None,
        "mom2_n_tokens": c.mom2_n_tokens,
        "context_template_length_params": c.templates,
    }


def summary(c: LayerChoice) -> str:
    """One line: the layer and the rule."""
    how = (
        f"the peak of a causal trace over {len(c.facts)} known facts"
        if c.rule == "trace"
        else "the fallback depth rule (the model knows too few facts to trace)"
    )
    return f"layer {c.layer} of {c.n_layers}, {how}"


def explain(c: LayerChoice) -> str:
    """What was chosen and why, in a few lines."""
    lines = [
        f"no preset for {c.model}: ROME hparams chosen automatically",
        f"  layer {c.layer}: {c.reason}",
    ]
    if c.facts:
        lines.append(f"  traced facts: {', '.join(c.facts)}")
    if c.aie is not None:
        lines.append("  AIE by layer: " + " ".join(f"{x:.3f}" for x in c.aie))
    lines.append(
        f"  statistics: C = E[k kᵀ] from {c.mom2_n_tokens:,} tokens sampled from the model "
        f"({TOKENS_PER_KEY} × d_ff = {c.d_ff:,}, rounded up to 1,024)"
    )
    shapes = " and ".join(f"{n} × {length}" for length, n in c.templates)
    lines.append(f"  context templates: {shapes} generated tokens; other settings: ROME's")
    lines.append(f"  cached (model fingerprint {c.fingerprint}): {cache_file(c.fingerprint)}")
    lines.append("  override with --set layer=N, or --hparams FILE")
    return "\n".join(lines)
