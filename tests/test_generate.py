"""Next-token prediction and KV-cached generation against the plain (uncached) forward; a model
carrying a context edit answers exactly as the plain model on `context + prompt`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model_parity import golden_model

from jaxedit.edits import ContextEdit, Demonstration, apply
from jaxedit.errors import InputError
from jaxedit.models.generate import _generate, generate, next_token_logprobs, top_k
from jaxedit.models.transformer import forward_jit


def naive_greedy(lm, ids: list[int], n: int, width: int = 32) -> list[int]:
    """Greedy decoding by re-running the full forward each step (fixed width: one compile)."""
    ids = list(ids)
    for _ in range(n):
        tokens = np.zeros((1, width), np.int32)
        mask = np.zeros((1, width), bool)
        tokens[0, : len(ids)], mask[0, : len(ids)] = ids, True
        pos = jnp.array([[len(ids) - 1]])
        logits = forward_jit(lm.config, lm.params, tokens, mask, logit_positions=pos).logits
        ids.append(int(jnp.argmax(logits[0, 0])))
    return ids


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_kv_cached_greedy_equals_uncached(family):
    lm = golden_model(family)
    prompt = "abc de"  # byte tokenizer: 6 tokens, left-padded to the 8-bucket
    b = lm.tokenizer.batch([prompt], padding="left")
    n = 10
    cached = _generate(
        lm.config,
        lm.params,
        None,
        jnp.asarray(b.tokens),
        jnp.asarray(b.mask),
        n,
        0.0,
        jax.random.key(0),
    )
    ids = lm.tokenizer.encode(prompt)
    assert np.asarray(cached)[0].tolist() == naive_greedy(lm, ids, n)[len(ids) :]


def test_sampling_is_seeded():
    lm = golden_model("qwen2")
    a = generate(lm, "hello", max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(lm, "hello", max_new_tokens=8, temperature=1.0, seed=3)
    others = {generate(lm, "hello", max_new_tokens=8, temperature=1.0, seed=s) for s in range(4)}
    assert a == b
    assert len(others) > 1  # different seeds give different samples


def test_batched_logprobs_equal_single_prompts():
    lm = golden_model("mistral")
    prompts = ["a", "hello world", "xyz!"]
    batch = np.asarray(next_token_logprobs(lm, prompts))
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(batch[i], np.asarray(next_token_logprobs(lm, [p]))[0], atol=1e-5)
    np.testing.assert_allclose(np.exp(batch).sum(-1), 1.0, atol=1e-4)


def test_top_k_sorted_and_consistent():
    lm = golden_model("llama")
    top = top_k(lm, "hello", k=5)
    logp = np.asarray(next_token_logprobs(lm, ["hello"]))[0]
    assert [r["id"] for r in top] == np.argsort(-logp)[:5].tolist()
    assert all(abs(r["prob"] - np.exp(logp[r["id"]])) < 1e-6 for r in top)
    assert [r["token"] for r in top] == [lm.tokenizer.decode([r["id"]]) for r in top]


def test_bad_inputs():
    lm = golden_model("llama")
    with pytest.raises(InputError, match="empty"):
        top_k(lm, "")
    with pytest.raises(InputError, match="top-k"):
        top_k(lm, "a", k=0)
    with pytest.raises(InputError, match="empty"):
        generate(lm, "")
    with pytest.raises(InputError, match="max-new-tokens"):
        generate(lm, "a", max_new_tokens=0)


def test_embedded_model_generates_paris(smollm):
    text = generate(smollm, "The Eiffel Tower is located in the city of", max_new_tokens=3)
    assert text.startswith(" Paris")


# ----------------------------------------------------------------------------- context edits

CONTEXT = ContextEdit(
    ("ab is cd",),
    (Demonstration("copy", "New Fact: xy\nPrompt: xy\n\n", 0.5),),
    reserve_tokens=8,
)


@pytest.mark.parametrize("family", (pytest.param("mistral", marks=pytest.mark.slow), "gpt2"))
def test_context_model_equals_plain_model_on_joined_text(family):
    """The context runs once into a KV cache; prompts (batched, left-padded) attend to it.
    Same log-probs and greedy text as the plain model on context + prompt (mistral's sliding
    window and gpt2's learned positions included)."""
    lm = golden_model(family)
    edited = apply(lm, CONTEXT)
    ctx = edited.context_text()
    assert ctx == "New Fact: xy\nPrompt: xy\n\nNew Fact: ab is cd\nPrompt: "
    prompts = ["ab is", "hello w"]
    got = np.asarray(next_token_logprobs(edited, prompts))
    want = np.asarray(next_token_logprobs(lm, [ctx + p for p in prompts]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert generate(edited, "ab is", max_new_tokens=6) == generate(lm, ctx + "ab is", 6)
    with pytest.raises(InputError):  # the fact, the prompt and the new tokens cannot fit
        generate(edited, "ab is", max_new_tokens=lm.config.max_positions)


def test_long_generation_refits_the_context():
    """A generation longer than the context's reserve drops demonstrations, never a fact."""
    lm = golden_model("llama")
    edited = apply(lm, CONTEXT)
    n = lm.config.max_positions - len(lm.tokenizer.encode("New Fact: ab is cd\nPrompt: ab is"))
    text = generate(edited, "ab is", max_new_tokens=n)  # no room for the demonstration
    head = "New Fact: ab is cd\nPrompt: "
    assert text == generate(lm, head + "ab is", max_new_tokens=n)


@pytest.mark.slow
def test_context_on_the_embedded_model(smollm):
    """The real tokenizer: "…Prompt: " + prompt is tokenized as the joined text."""
    ctx = ContextEdit(("The Eiffel Tower is located in the city of Rome",), reserve_tokens=16)
    edited = apply(smollm, ctx)
    prompt = "The Eiffel Tower is located in the city of"
    got = np.asarray(next_token_logprobs(edited, [prompt]))[0]
    want = np.asarray(next_token_logprobs(smollm, [edited.context_text() + prompt]))[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    top = top_k(edited, prompt, 3)
    assert [r["id"] for r in top] == np.argsort(-want)[:3].tolist()
    assert generate(edited, prompt, 2) == generate(smollm, edited.context_text() + prompt, 2)
