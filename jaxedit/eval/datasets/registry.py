"""Data sets by name: where each one is published, its checksum, and a verified local copy.

    jaxedit data list                      # name, records, size, licence, checksum, source
    jaxedit data get counterfact           # download, verify, keep in the jaxedit cache
    jaxedit eval --data counterfact ...    # a name wherever a data file is expected

Every entry names its file's public URLs (the canonical project's first, then byte-identical
copies pinned to a git commit) and a checksum of the exact bytes: the sha256 where we hold a
copy (computed from the copies in the project's `shared/data`), else the git blob id that the
publishing repository itself recorded for that file (`git hash-object`: sha1 over
"blob <size>\\0" + bytes), so that a download is accepted only when it is that file.

Files are kept in `<cache>/data/` (`<cache>` as for the statistics: $JAXEDIT_CACHE, else
$XDG_CACHE_HOME/jaxedit, else ~/.cache/jaxedit; `jaxedit.stats.cache.default_cache_dir`).
A download goes to a temporary file beside its destination, is verified, and only then renamed
into place: a failed or interrupted download leaves nothing behind (not even a directory it
created). Offline, `get` fails with one line naming the URL and the manual route (download it
by hand and pass the path, or `jaxedit data get NAME --from FILE` to verify and keep it).

`resolve(value, flag)` is what the command line does with every data argument: an existing
path is used as it is; a registered name becomes its cached file, or, when it is not
downloaded yet, the same one-line error. The download itself is `fetch_url(url, dest,
progress)`, a module attribute looked up at call time (tests replace it; `get(fetch=...)` too).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jaxedit.errors import InputError
from jaxedit.io.atomic import file_mode

_ROME = "https://rome.baulab.info/data/dsets"
_ROME_GIT = (
    "https://raw.githubusercontent.com/kmeng01/rome/cb158379516326fe7499a5e8457b651a99eb396c/"
    "dsets/compiled"
)
_KNOWEDIT_HF = "https://huggingface.co/datasets/zjunlp/KnowEdit/resolve/main/benchmark"
_WYREN = (
    "https://raw.githubusercontent.com/wyren726/benchmark-1/"
    "784010520aaaf2ce7ae960a8bceced53ae933d9c/Knowledge-Editing-Benchmark"
)
_SPREAD = (
    "https://raw.githubusercontent.com/Jometeorie/KnowledgeSpread/"
    "d1a8d1ed5367e66010d4d9b081ab388b46c2438c/data"
)
_MQUAKE = (
    "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/"
    "fb43dadc2d8cd19d08ce81c63d957b59deb3f3cd/datasets"
)
_MIT_ROME = "MIT (kmeng01/rome)"
_MIT_EASYEDIT = "MIT (EasyEdit data release, derived from ROME's CounterFact, MIT)"
_ZSRE_LICENCE = "zsRE (Levy et al. 2017) as packaged by MEND/ROME (MIT code); no data licence"
_MIT_MQUAKE = "MIT (princeton-nlp/MQuAKE)"


@dataclass(frozen=True)
class Entry:
    """One registered data file."""

    name: str
    file: str  # the file name in the cache
    title: str
    format: str  # a `jaxedit.eval.datasets.FORMATS` name, or "known_facts" (causal tracing)
    urls: tuple[str, ...]  # tried in order: the canonical source first, then pinned copies
    licence: str
    records: int | None = None
    size: int | None = None  # bytes
    sha256: str | None = None
    git_sha1: str | None = None  # the publisher's git blob id, where no sha256 is known
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if not (self.sha256 or self.git_sha1) or not self.urls:
            raise ValueError(f"data entry {self.name}: a checksum and a URL are required")

    @property
    def checksum(self) -> str:
        """ "sha256:<hex>" or "git-sha1:<hex>": what a download is checked against."""
        return f"sha256:{self.sha256}" if self.sha256 else f"git-sha1:{self.git_sha1}"


ENTRIES: tuple[Entry, ...] = (
    Entry(
        "counterfact",
        "counterfact.json",
        "CounterFact, ROME's original records (paraphrase, neighbourhood, generation prompts)",
        "counterfact_rome",
        (f"{_ROME}/counterfact.json", f"{_ROME_GIT}/counterfact.json"),
        _MIT_ROME,
        records=21919,
        size=45108470,
        git_sha1="34be0e5617d9d4b884fddb197e0f7769d1a31ad3",
    ),
    Entry(
        "counterfact-edit",
        "counterfact-edit.json",
        "CounterFact, EasyEdit's flat 10,000-case edit split (the README's measured runs)",
        "counterfact",
        (
            f"{_SPREAD}/counterfact/counterfact-edit.json",
            f"{_WYREN}/methods/6SimIE/data/counterfact/counterfact-edit.json",
        ),
        _MIT_EASYEDIT,
        records=10000,
        size=3850773,
        sha256="20c225e6299b3c5b2c569bd9103aa212806e0d1e6e0c307de5c379773979b967",
    ),
    Entry(
        "counterfact-train",
        "counterfact-train.json",
        "CounterFact, EasyEdit's flat 10,000-case train split (MEND training, IKE demonstrations)",
        "counterfact",
        (
            f"{_SPREAD}/counterfact/counterfact-train.json",
            f"{_WYREN}/methods/6SimIE/data/counterfact/counterfact-train.json",
        ),
        _MIT_EASYEDIT,
        records=10000,
        size=3849872,
        sha256="bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0",
    ),
    Entry(
        "known_1000",
        "known_1000.json",
        "ROME's known facts (causal tracing set; 1,209 records despite the name)",
        "known_facts",
        (f"{_ROME}/known_1000.json", f"{_ROME_GIT}/known_1000.json"),
        _MIT_ROME,
        records=1209,
        size=343229,
        sha256="61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a",
        aliases=("known-facts", "knowns"),
    ),
    Entry(
        "zsre",
        "zsre_mend_eval.json",
        "zsRE question answering, the MEND/ROME evaluation split",
        "zsre",
        (f"{_ROME}/zsre_mend_eval.json", f"{_ROME_GIT}/zsre_mend.json"),
        _ZSRE_LICENCE,
        git_sha1="8546c90abc10b77ebc9fd69de178cf7837ff86dc",
    ),
    Entry(
        "zsre-portability",
        "zsre_mend_eval_portability_gpt4.json",
        "zsRE, EasyEdit's evaluation subset with portability questions",
        "zsre",
        (
            "https://raw.githubusercontent.com/JasonForJoy/Model-Editing-Hurt/"
            "82614b0414cfe6284ba0b136174f00716a4fe531/edited-data/"
            "zsre_mend_eval_portability_gpt4.json",
            f"{_WYREN}/methods/6SimIE/data/ZsRE/zsre_mend_edit.json",
        ),
        _ZSRE_LICENCE + "; EasyEdit additions MIT",
        records=1037,
        size=842861,
        sha256="0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
    ),
    Entry(
        "zsre-train-1k",
        "zsre_mend_train-1k.json",
        "zsRE, a 1,000-record subset of the MEND train split (KnowledgeSpread's selection)",
        "zsre",
        (f"{_SPREAD}/zsre/zsre_mend_train-1k.json",),
        _ZSRE_LICENCE,
        records=1000,
        size=524937,
        sha256="09dbb446f4afa1e500e051806430d286ef260fa6dd89e3590a9756f8b060a229",
    ),
    Entry(
        "knowedit-zsre",
        "ZsRE-test-all.json",
        "KnowEdit ZsRE test set (locality and portability probes)",
        "knowedit",
        (
            f"{_KNOWEDIT_HF}/ZsRE/ZsRE-test-all.json",
            f"{_WYREN}/wyren/dataset/zsre/ZsRE-test-all.json",
        ),
        "MIT (zjunlp/KnowEdit)",
        records=1301,
        size=1519289,
        sha256="0e0214dda853a906ef02bef58c7ce2978af5a962e91fc4a10827e0125459905c",
        aliases=("knowedit",),
    ),
    Entry(
        "knowedit-wiki-cf",
        "test_cf.json",
        "KnowEdit WikiData_counterfact test set (not ROME's CounterFact)",
        "knowedit",
        (
            f"{_KNOWEDIT_HF}/wiki_counterfact/test_cf.json",
            f"{_WYREN}/wyren/dataset/wiki_counterfact/test_cf.json",
        ),
        "MIT (zjunlp/KnowEdit)",
        records=839,
        size=2924593,
        sha256="efc01ba398dfe04975939f729aab45523addb3c6b3cf41d7429ba5de1d45225b",
    ),
    Entry(
        "knowedit-wiki-cf-train",
        "train_cf.json",
        "KnowEdit WikiData_counterfact train set",
        "knowedit",
        (
            f"{_KNOWEDIT_HF}/wiki_counterfact/train_cf.json",
            f"{_WYREN}/wyren/dataset/wiki_counterfact/train_cf.json",
        ),
        "MIT (zjunlp/KnowEdit)",
        records=1427,
        size=1386892,
        sha256="0e535169a46e759245667c40041ed31b3c38daf1818ee29b304c12b5d77f23ea",
    ),
    Entry(
        "mquake",
        "MQuAKE-CF-3k-v2.json",
        "MQuAKE-CF-3k v2: multi-hop questions over 1-4 edits (the paper's results)",
        "mquake",
        (f"{_MQUAKE}/MQuAKE-CF-3k-v2.json",),
        _MIT_MQUAKE,
        records=3000,
        git_sha1="6cf0904341e9910ce702641c5a24547ce23ff1e2",
    ),
    Entry(
        "mquake-t",
        "MQuAKE-T.json",
        "MQuAKE-T: multi-hop questions over real-world (temporal) changes",
        "mquake",
        (f"{_MQUAKE}/MQuAKE-T.json",),
        _MIT_MQUAKE,
        records=1825,
        git_sha1="afd89d0c8fe5e304f771bad88cc0ced611278fe0",
    ),
    Entry(
        "mquake-hard",
        "MQuAKE-hard.json",
        "MQuAKE-hard: 429 four-hop MQuAKE-CF cases (a third party's selection)",
        "mquake",
        (
            "https://raw.githubusercontent.com/Alanzxd/memit_for_mquake/"
            "890e204b7006c3088811a6646a738d411f266446/data/MQuAKE-hard.json",
        ),
        _MIT_MQUAKE,
        records=429,
        size=1943567,
        sha256="fc78dc7bec4625d3ce6e2923acae7f1920691b0b23e663182bf799f2856f2a11",
    ),
)


# ----------------------------------------------------------------------------- lookup


def names() -> list[str]:
    return [e.name for e in ENTRIES]


def entry(name: str) -> Entry | None:
    """The entry registered under `name` or one of its aliases (case-insensitive), or None."""
    key = str(name).strip().lower()
    for e in ENTRIES:
        if key == e.name or key in e.aliases:
            return e
    return None


def get_entry(name: str) -> Entry:
    e = entry(name)
    if e is None:
        raise InputError(f"no data set named {name!r}; registered: {', '.join(names())}")
    return e


def data_dir() -> Path:
    """`<cache>/data`: beside the statistics cache (`jaxedit.stats.cache.default_cache_dir`)."""
    from jaxedit.stats.cache import default_cache_dir

    return default_cache_dir().parent / "data"


def local_path(e: Entry, directory: str | os.PathLike | None = None) -> Path:
    """Where `e` is (or would be) kept: `directory` (default `data_dir()`) / its file name."""
    return Path(directory if directory is not None else data_dir()) / e.file


def cached(name: str, directory: str | os.PathLike | None = None) -> Path | None:
    """The local file of a registered name when present (and of the registered size), else
    None. `get` verifies the checksum when it writes; this only checks the size, cheaply."""
    e = get_entry(name)
    p = local_path(e, directory)
    if not p.is_file() or (e.size is not None and p.stat().st_size != e.size):
        return None
    return p


def manual_route(e: Entry, flag: str = "--data") -> str:
    return (
        f"download {e.urls[0]} by hand and pass it as {flag} PATH "
        f"(or keep it with `jaxedit data get {e.name} --from PATH`)"
    )


def resolve(value: str | None, flag: str = "--data") -> str | None:
    """A data argument as a path: an existing path as given; a registered name as its cached
    file; a name not downloaded yet is an `InputError` saying how to get it. Anything else is
    returned unchanged (the loader then names the missing file)."""
    if value is None or Path(value).expanduser().exists():
        return value
    e = entry(value)
    if e is None:
        return value
    p = cached(e.name)
    if p is None:
        raise InputError(
            f"{flag} {value}: the data set {e.name!r} is not downloaded: run `jaxedit data get "
            f"{e.name}`, or {manual_route(e, flag)}"
        )
    return str(p)


# ----------------------------------------------------------------------------- checksums


def file_digest(path: str | os.PathLike, kind: str) -> str:
    """sha256 of the bytes ("sha256"), or the git blob id ("git-sha1")."""
    path = Path(path)
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
    if kind == "git-sha1":
        h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(e: Entry, path: str | os.PathLike) -> str | None:
    """None when `path` holds exactly `e`'s file, else the reason it does not."""
    kind, want = e.checksum.split(":", 1)
    size = Path(path).stat().st_size
    if e.size is not None and size != e.size:
        return f"{size:,} bytes, expected {e.size:,}"
    got = file_digest(path, kind)
    return None if got == want else f"{kind} {got[:12]}…, expected {want[:12]}…"


# ----------------------------------------------------------------------------- download


def fetch_url(url: str, dest: Path, progress: bool = False, timeout: float = 60.0) -> None:
    """Stream `url` into the file `dest` (raises OSError / ValueError / HTTPException)."""
    req = urllib.request.Request(url, headers={"User-Agent": "jaxedit"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        from tqdm.auto import tqdm

        with tqdm(
            total=int(total) if total and total.isdigit() else None,
            unit="B",
            unit_scale=True,
            desc=Path(dest).name.split(".part")[0].lstrip("."),
            disable=not progress,
            file=sys.stderr,
        ) as bar:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        return getattr(reason, "strerror", None) or str(reason)
    return str(err) or type(err).__name__


@dataclass(frozen=True)
class Fetched:
    path: Path
    source: str  # the URL it came from, the --from file, or "cache"
    checksum: str
    downloaded: bool


def get(
    name: str,
    directory: str | os.PathLike | None = None,
    *,
    source_file: str | os.PathLike | None = None,
    progress: bool = False,
    fetch: Callable[[str, Path, bool], None] | None = None,
) -> Fetched:
    """The verified local copy of `name` in `directory` (default `data_dir()`).

    A copy already there that verifies is kept. Otherwise each URL is tried in turn (or the
    file `source_file` copied, for a manual download); the first whose bytes verify is renamed
    into place. Nothing is left behind on failure; the error is one line (`InputError`).
    """
    e = get_entry(name)
    dest = local_path(e, directory)
    if dest.is_file() and verify(e, dest) is None:
        return Fetched(dest, "cache", e.checksum, False)
    fetch = fetch or fetch_url  # looked up now: tests replace the module attribute
    if source_file is not None:
        src = Path(source_file).expanduser()
        if not src.is_file():
            raise InputError(f"--from {src}: file not found")
        sources = [(str(src), lambda _url, tmp, _p: shutil.copyfile(src, tmp))]
    else:
        sources = [(url, fetch) for url in e.urls]
    created = _missing_parents(dest.parent)
    failures = []
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for where, how in sources:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            os.close(fd)
            try:
                how(where, Path(tmp), progress)
                bad = verify(e, tmp)
                if bad is None:
                    os.chmod(tmp, file_mode())  # mkstemp's 0600 -> what open() would give
                    os.replace(tmp, dest)
                    return Fetched(dest, where, e.checksum, True)
                failures.append(f"{where}: checksum mismatch ({bad})")
            except (OSError, ValueError, http.client.HTTPException) as err:
                failures.append(f"{where}: {_reason(err)}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except BaseException:
        _remove_empty(created)
        raise
    _remove_empty(created)
    if source_file is not None:
        raise InputError(f"--from {failures[0]}: not the registered {e.name} file")
    first = failures[0]
    more = f" (and {len(failures) - 1} mirror(s) failed too)" if len(failures) > 1 else ""
    raise InputError(f"cannot download {e.name} from {first}{more}; {manual_route(e)}")


def local_or_get(
    name: str, path: str | os.PathLike | None = None, *, progress: bool = False
) -> Path:
    """`path` when that file exists (a checkout with the shared data beside it), else the
    verified cached copy of `name`, downloaded the first time (`get`; offline: its one-line
    `InputError`). The notebooks find their data this way, here and in Colab alike."""
    if path is not None and Path(path).expanduser().is_file():
        return Path(path).expanduser()
    return get(name, progress=progress).path


def _missing_parents(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, deepest first."""
    out, d = [], directory.absolute()
    while not d.exists():
        out.append(d)
        d = d.parent
    return out


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return
