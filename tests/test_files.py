"""Files a user keeps: written whole or not at all, with the modes any other file gets (0644 /
0755 under umask 022, not mkstemp's 0600); output directories refused, kept or removed as the
commands promise; no terminal codes into pipes."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from jaxedit.errors import InputError
from jaxedit.io import atomic

GOLDEN = Path(__file__).parent / "goldens" / "gpt2"


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_umask_read_without_changing_it(umask022):
    assert atomic.umask() == 0o022
    assert (atomic.file_mode(), atomic.dir_mode()) == (0o644, 0o755)
    os.umask(0o077)
    assert (atomic.file_mode(), atomic.dir_mode()) == (0o600, 0o700)  # a private umask is kept


def test_atomic_writes_have_normal_modes(tmp_path, umask022):
    p = atomic.write_bytes_atomic(tmp_path / "a" / "x.bin", b"abc")
    assert p.read_bytes() == b"abc" and mode(p) == 0o644
    atomic.write_text_atomic(p, "é")
    assert p.read_text(encoding="utf-8") == "é" and mode(p) == 0o644
    assert [f.name for f in p.parent.iterdir()] == ["x.bin"]  # no temporary left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    p = atomic.write_text_atomic(tmp_path / "x.json", "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir(tmp_path, umask022):
    with atomic.atomic_dir(tmp_path / "out") as d:
        (d / "f").write_text("x")
    assert mode(tmp_path / "out") == 0o755 and (tmp_path / "out" / "f").exists()
    with pytest.raises(InputError, match="not empty"), atomic.atomic_dir(tmp_path / "out"):
        pass
    with pytest.raises(RuntimeError), atomic.atomic_dir(tmp_path / "new") as d:
        (d / "f").write_text("x")
        raise RuntimeError("crash")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_out_dir_rules(tmp_path):
    out = tmp_path / "run"
    atomic.check_out_dir(out)  # new: fine
    out.mkdir()
    atomic.check_out_dir(out)  # empty: fine
    (out / "results.json").write_text("{}")
    with pytest.raises(InputError, match="--resume to continue it, --force to overwrite"):
        atomic.check_out_dir(out)
    with pytest.raises(InputError, match=r"--force to overwrite, or choose"):
        atomic.check_out_dir(out, resumable=False)
    atomic.check_out_dir(out, resume=True)
    atomic.check_out_dir(out, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        atomic.check_out_dir(tmp_path / "file")


def test_only_new_empty_dirs_are_removed(tmp_path):
    empty, nested, kept = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    empty.mkdir()
    (nested / "x" / "y").mkdir(parents=True)
    (kept / "sub").mkdir(parents=True)
    (kept / "sub" / ".partial").write_text("x")
    atomic.remove_new_empty_dirs([empty, nested, kept, tmp_path / "never"])
    assert not empty.exists() and not nested.exists() and (kept / "sub" / ".partial").exists()


def test_statistics_cache_file_mode(tmp_path, umask022):
    from jaxedit.stats.cache import Stats, load_stats, save_stats

    st = Stats(np.eye(3), 5, {"layer": 1, "width": 3})
    save_stats(tmp_path / "c.npz", st)
    assert mode(tmp_path / "c.npz") == 0o644
    assert load_stats(tmp_path / "c.npz").count == 5
    assert [f.name for f in tmp_path.iterdir()] == ["c.npz"]


def test_generate_writes_plain_text_into_a_pipe(monkeypatch):
    from jaxedit.cli.commands import generate

    r = {"prompt": "The Eiffel Tower is", "completion": " in Paris"}

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert generate.render(r) == "The Eiffel Tower is in Paris"
    monkeypatch.setattr("sys.stdout", Tty())
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\033[1m" in generate.render(r)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\033" not in generate.render(r)


def test_exported_model_and_edit_have_normal_modes(tmp_path, umask022):
    import jaxedit as je

    lm = je.load(str(GOLDEN))
    out = je.save_hf(lm, tmp_path / "exported")
    assert mode(out) == 0o755
    files = sorted(out.iterdir())
    assert files and all(mode(f) == 0o644 for f in files), [(f.name, oct(mode(f))) for f in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary left
    edit = je.WeightEdit((je.WeightDelta("mlp_out", 0, dense=np.zeros((64, 32), np.float32)),))
    je.save_edit(edit, tmp_path / "e.safetensors")
    assert mode(tmp_path / "e.safetensors") == 0o644
