"""Key statistics for closed-form edits: C = E[k kᵀ] at `mlp_key` of a layer over a corpus.

    from jaxedit import stats
    st = stats.layer_stats(lm, layer, "wikipedia", n_tokens=stats.DEFAULT_N_TOKENS)
    st.mom2  # [F F]

Modules: `corpora` (self-sampled text, WikiText, Wikipedia, files), `second_moment` (the
streaming, data-parallel kernel `second_moment.second_moment` and `layer_stats`), `cache`
(keyed, atomic, validated files).
"""

from jaxedit.stats.cache import (
    Stats,
    cache_key,
    cache_path,
    default_cache_dir,
    load_stats,
    model_fingerprint,
    save_stats,
)
from jaxedit.stats.corpora import (
    HF_CORPORA,
    Corpus,
    corpus_fingerprint,
    load_corpus,
    sample_tokens,
    start_token,
)

# The kernel `second_moment.second_moment` is not re-exported: the name would shadow the module.
from jaxedit.stats.second_moment import (
    DEFAULT_N_TOKENS,
    data_mesh,
    layer_stats,
    layers_stats,
    pack,
    pack_segments,
)

__all__ = [
    "DEFAULT_N_TOKENS",
    "HF_CORPORA",
    "Corpus",
    "Stats",
    "cache_key",
    "cache_path",
    "corpus_fingerprint",
    "data_mesh",
    "default_cache_dir",
    "layer_stats",
    "layers_stats",
    "load_corpus",
    "load_stats",
    "model_fingerprint",
    "pack",
    "pack_segments",
    "sample_tokens",
    "save_stats",
    "start_token",
]
