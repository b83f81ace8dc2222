"""Data sets by name: `jaxedit data list / get / path`, verified atomic downloads, and names
accepted wherever the command line takes a data file. No test touches the network: the
download is replaced (`registry.fetch_url`) by copies of the shared files, by failures, or by
the real `fetch_url` on file:// and closed-port URLs."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
from pathlib import Path

import pytest

from jaxedit import cli
from jaxedit.cli.commands.data import resolve_data_args
from jaxedit.errors import InputError
from jaxedit.eval import datasets
from jaxedit.eval.datasets import registry
from jaxedit.io.atomic import file_mode

# The shared copies each registered sha256 was computed from.
SHARED = {
    "counterfact-edit": "counterfact/counterfact-edit.json",
    "counterfact-train": "counterfact/counterfact-train.json",
    "known_1000": "counterfact/known_1000.json",
    "zsre-portability": "zsre/zsre_mend_eval_portability_gpt4.json",
    "zsre-train-1k": "zsre/zsre_mend_train-1k.json",
    "knowedit-zsre": "knowedit/ZsRE-test-all.json",
    "knowedit-wiki-cf": "knowedit/test_cf.json",
    "knowedit-wiki-cf-train": "knowedit/train_cf.json",
    "mquake-hard": "mquake/MQuAKE-hard.json",
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty jaxedit cache (nothing in it yet, not even the directory)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXEDIT_CACHE", str(root))
    return root


@pytest.fixture
def offline(monkeypatch):
    """Every download fails as it does without a network; the URLs tried are recorded."""
    tried = []

    def fail(url, dest, progress=False):
        tried.append(url)
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(registry, "fetch_url", fail)
    return tried


def _copying(data_dir, name):
    """A download that delivers the shared copy of `name` (and records the URLs asked)."""
    src = Path(data_dir) / SHARED[name]
    asked = []

    def fetch(url, dest, progress=False):
        asked.append(url)
        dest.write_bytes(src.read_bytes())

    return fetch, asked


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# ----------------------------------------------------------------------------- the table


def test_registry_covers_the_five_families_with_checksums_and_urls():
    formats = {e.format for e in registry.ENTRIES}
    assert {"counterfact_rome", "counterfact", "zsre", "knowedit", "mquake", "known_facts"} <= (
        formats
    )
    for e in registry.ENTRIES:
        assert e.urls and all(u.startswith("https://") for u in e.urls), e.name
        assert e.sha256 or e.git_sha1, e.name
        digest = e.sha256 or e.git_sha1
        assert len(digest) == (64 if e.sha256 else 40) and int(digest, 16) >= 0
        assert e.licence
    # Canonical sources first: ROME's site for its files, princeton-nlp for MQuAKE, HF for KnowEdit.
    assert registry.get_entry("counterfact").urls[0] == (
        "https://rome.baulab.info/data/dsets/counterfact.json"
    )
    assert registry.get_entry("known-facts").name == "known_1000"
    assert "princeton-nlp/MQuAKE" in registry.get_entry("mquake").urls[0]
    assert (
        registry.get_entry("knowedit").urls[0].startswith("https://huggingface.co/datasets/zjunlp")
    )
    assert len(set(registry.names())) == len(registry.ENTRIES)


def test_registered_checksums_sizes_and_counts_match_the_shared_copies(data_dir):
    for name, rel in SHARED.items():
        e, path = registry.get_entry(name), Path(data_dir) / rel
        assert registry.verify(e, path) is None, name
        assert path.stat().st_size == e.size
        assert len(json.loads(path.read_text())) == e.records
    # The git blob id is the same checksum git computes (known_1000: ROME's own blob).
    known = Path(data_dir) / SHARED["known_1000"]
    assert registry.file_digest(known, "git-sha1") == "6c711e97d27581fe837009b683684f23fa50a634"
    # Each file's format is the one the loaders detect.
    for name in ("counterfact-edit", "zsre-portability", "knowedit-zsre", "mquake-hard"):
        e = registry.get_entry(name)
        first = json.loads((Path(data_dir) / SHARED[name]).read_text())[0]
        assert datasets.detect_format(first) == e.format


def test_data_list_works_offline(cache, offline, capsys):
    rc, out, err = _run(capsys, "data", "list")
    assert rc == 0, err
    for name in ("counterfact", "zsre", "knowedit-zsre", "mquake", "known_1000"):
        assert f"  {name} " in out
    assert "https://rome.baulab.info/data/dsets/counterfact.json" in out
    assert registry.get_entry("counterfact-edit").sha256 in out
    rc, out, _ = _run(capsys, "data", "list", "--json")
    rows = json.loads(out)["data"]
    assert [r["name"] for r in rows] == registry.names()
    assert not any(r["cached"] for r in rows)
    assert offline == [] and not (cache / "data").exists()  # no download, nothing written


# ----------------------------------------------------------------------------- get


def test_get_offline_fails_with_one_line_and_writes_nothing(cache, offline, capsys):
    rc, out, err = _run(capsys, "data", "get", "counterfact")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert "https://rome.baulab.info/data/dsets/counterfact.json" in line
    assert "Name or service not known" in line and "--data PATH" in line
    assert "Traceback" not in err
    assert offline == list(registry.get_entry("counterfact").urls)  # canonical, then mirror
    assert not (cache / "data").exists()  # not even the directory


def test_real_fetch_url_to_a_closed_port_fails_cleanly(cache, tmp_path):
    def closed(url, dest, progress=False):
        registry.fetch_url("http://127.0.0.1:9/known_1000.json", dest, progress, timeout=5.0)

    with pytest.raises(InputError) as e:
        registry.get("known_1000", fetch=closed)
    assert "cannot download known_1000" in str(e.value) and "\n" not in str(e.value)
    assert not (cache / "data").exists()


def test_get_downloads_verifies_and_keeps(cache, data_dir, monkeypatch, capsys):
    fetch, asked = _copying(data_dir, "known_1000")
    monkeypatch.setattr(registry, "fetch_url", fetch)
    rc, out, err = _run(capsys, "data", "get", "known-facts", "--json")
    assert rc == 0, err
    r = json.loads(out)
    path = Path(r["path"])
    assert path == cache / "data" / "known_1000.json" and r["downloaded"]
    assert r["source"] == registry.get_entry("known_1000").urls[0] and len(asked) == 1
    assert path.read_bytes() == (Path(data_dir) / SHARED["known_1000"]).read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == file_mode()  # 0644 under umask 022
    assert _files(cache / "data") == [path]  # no temporary file left
    # Present and valid: kept, nothing fetched again; `data path` names it.
    rc, out, _ = _run(capsys, "data", "get", "known_1000")
    assert rc == 0 and "already present" in out and len(asked) == 1
    rc, out, _ = _run(capsys, "data", "path", "known_1000")
    assert rc == 0 and out.strip() == str(path)


def test_real_fetch_url_streams_a_file_url(cache, data_dir):
    src = Path(data_dir) / SHARED["mquake-hard"]
    got = registry.get(
        "mquake-hard", fetch=lambda url, dest, p: registry.fetch_url(src.as_uri(), dest, p)
    )
    assert got.downloaded and got.path.read_bytes() == src.read_bytes()


def test_checksum_mismatch_is_refused_and_leaves_nothing(cache, tmp_path, capsys, monkeypatch):
    def wrong(url, dest, progress=False):
        dest.write_bytes(b'[{"known_id": 0}]')

    monkeypatch.setattr(registry, "fetch_url", wrong)
    rc, _, err = _run(capsys, "data", "get", "known_1000", "--dir", str(tmp_path / "d" / "e"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "checksum mismatch" in err and "expected" in err
    assert not (tmp_path / "d").exists()
    # An existing directory is kept, but holds no partial file.
    (tmp_path / "keep").mkdir()
    with pytest.raises(InputError, match="checksum mismatch"):
        registry.get("known_1000", tmp_path / "keep")
    assert _files(tmp_path / "keep") == []


def test_a_failing_source_falls_back_to_the_pinned_mirror(cache, data_dir):
    fetch, asked = _copying(data_dir, "counterfact-edit")
    first = registry.get_entry("counterfact-edit").urls[0]

    def flaky(url, dest, progress=False):
        if url == first:
            raise urllib.error.HTTPError(url, 404, "not found", None, None)
        fetch(url, dest, progress)

    got = registry.get("counterfact-edit", fetch=flaky)
    assert got.source == registry.get_entry("counterfact-edit").urls[1] and asked == [got.source]


def test_get_from_a_manual_download(cache, data_dir, tmp_path, offline):
    got = registry.get("zsre-train-1k", source_file=Path(data_dir) / SHARED["zsre-train-1k"])
    assert got.path == cache / "data" / "zsre_mend_train-1k.json" and offline == []
    wrong = tmp_path / "wrong.json"
    wrong.write_text("[]")
    with pytest.raises(InputError, match="not the registered zsre-portability"):
        registry.get("zsre-portability", source_file=wrong)
    assert not (cache / "data" / "zsre_mend_eval_portability_gpt4.json").exists()


def test_a_corrupt_cached_copy_is_replaced(cache, data_dir):
    fetch, asked = _copying(data_dir, "known_1000")
    dest = registry.local_path(registry.get_entry("known_1000"))
    dest.parent.mkdir(parents=True)
    dest.write_text("truncated")
    assert registry.cached("known_1000") is None  # wrong size: not taken as cached
    got = registry.get("known_1000", fetch=fetch)
    assert got.downloaded and registry.verify(registry.get_entry("known_1000"), dest) is None


def test_unknown_name(cache, capsys):
    rc, _, err = _run(capsys, "data", "get", "imagenet")
    assert rc == 2 and "no data set named 'imagenet'" in err and "counterfact" in err


# ----------------------------------------------------------------------------- names as paths


def test_names_resolve_to_cached_files(cache, data_dir, tmp_path):
    with pytest.raises(InputError) as e:
        registry.resolve("counterfact-edit", "--requests")
    msg = str(e.value)
    assert "jaxedit data get counterfact-edit" in msg and "--requests PATH" in msg
    assert registry.get_entry("counterfact-edit").urls[0] in msg and "\n" not in msg
    fetch, _ = _copying(data_dir, "counterfact-edit")
    got = registry.get("counterfact-edit", fetch=fetch)
    assert registry.resolve("counterfact-edit") == str(got.path)
    assert registry.resolve("COUNTERFACT-EDIT") == str(got.path)
    # Paths are used as given: existing ones (even one named like a data set) and missing ones.
    here = tmp_path / "counterfact"
    here.write_text("[]")
    os.chdir(tmp_path)
    assert registry.resolve("counterfact") == "counterfact"
    assert registry.resolve("no/such/file.json") == "no/such/file.json"
    assert registry.resolve(None) is None


def test_every_cli_data_argument_accepts_a_name(cache, data_dir, capsys):
    from jaxedit.cli.main import build_parser

    fetch, _ = _copying(data_dir, "counterfact-edit")
    path = str(registry.get("counterfact-edit", fetch=fetch).path)
    fetch, _ = _copying(data_dir, "known_1000")
    known = str(registry.get("known_1000", fetch=fetch).path)
    both = ["eval", "--data", "counterfact-edit", "--known-facts", "known-facts"]
    cases = [
        (both, "data", path),
        (both, "known_facts", known),
        (["trace", "--data", "known_1000"], "data", known),
        (["mend-train", "--data", "counterfact-edit", "--out", "x"], "data", path),
        (["edit", "--requests", "counterfact-edit"], "requests", path),
        (["mend-train", "--data", "counterfact-edit,known_1000", "--out", "x"], "data",
         f"{path},{known}"),
        (["eval", "--method", "ike", "--set", "demos=counterfact-edit", "--set", "k=4"],
         "hparam_overrides", [f"demos={path}", "k=4"]),
    ]  # fmt: skip
    for argv, dest, want in cases:
        args = build_parser().parse_args(argv)
        resolve_data_args(args)
        assert getattr(args, dest) == want, argv
    # Not downloaded: the command stops with the one line, before loading any model.
    rc, out, err = _run(capsys, "eval", "--data", "zsre", "--model", "no-such-model")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "jaxedit data get zsre" in err and "rome.baulab.info" in err
    rc, out, err = _run(capsys, "edit", "--method", "ike", "--set", "demos=zsre", "--model", "x")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--set demos=" in err and "jaxedit data get zsre" in err


def test_local_or_get_prefers_the_shared_copy_then_downloads(
    cache, data_dir, tmp_path, monkeypatch
):
    """What the notebooks call: the shared file when it is there, else the cached download."""
    shared = Path(data_dir) / SHARED["known_1000"]
    assert registry.local_or_get("known_1000", shared) == shared
    assert not cache.exists()  # nothing downloaded for a file that is there
    fetch, asked = _copying(data_dir, "known_1000")
    monkeypatch.setattr(registry, "fetch_url", fetch)
    got = registry.local_or_get("known_1000", tmp_path / "not-here.json")
    assert got == registry.local_path(registry.get_entry("known_1000"))
    assert got.read_bytes() == shared.read_bytes() and len(asked) == 1
