"""The README's Python API block runs as written on the embedded model (slow: ~1.5 min)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest

README = Path(__file__).parent.parent / "README.md"


def api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_api_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block writes eiffel.safetensors
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(api_block(), "README.md", "exec"), scope)
    printed = out.getvalue().splitlines()
    assert "' Paris'" in printed[0] and printed[1].startswith("[{'token': ' Rome'")
    je, lm, lm0 = scope["je"], scope["lm"], scope["lm0"]
    assert isinstance(scope["edit"], je.WeightEdit) and os.path.exists("eiffel.safetensors")
    for a, b in zip(jax.tree.leaves(lm0.params), jax.tree.leaves(lm.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # restored
