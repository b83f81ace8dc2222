"""A thin tokenizer wrapper: ids with character offsets, padding to shape buckets, decoding.

Built on the `tokenizers` library (byte-level BPE and SentencePiece alike). Character offsets
are what locate a subject inside a prompt: never decode-and-match strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from jaxedit.errors import CheckpointError, InputError

BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(n: int) -> int:
    """Smallest shape bucket ≥ n: compile once per bucket, not once per length."""
    for b in BUCKETS:
        if n <= b:
            return b
    return n


def fine_bucket(n: int) -> int:
    """A finer bucket ≥ n: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times
    them): at most a third of it is padding, for a few more compiled shapes than `bucket`."""
    p = 1 << max(0, (n - 1).bit_length())
    return p if p <= 2 or n > 3 * p // 4 else 3 * p // 4


def preview(text: str, n: int = 60) -> str:
    """The start of a text, quoted, for an error message."""
    return repr(text[:n] + "…" if len(text) > n else text)


def checked_text(text) -> str:
    """`text` if it is a str of valid Unicode, else an `InputError` naming the bad byte: bytes
    that are not UTF-8 reach Python as lone surrogates (U+DC80..U+DCFF for byte 0x80..0xFF,
    from argv or a file read with surrogateescape), which the tokenizer cannot take."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"U+{ch:04X}"
        raise InputError(
            f"text is not valid UTF-8 ({what} at character {e.start}): "
            f"{preview(text.encode('utf-8', 'replace').decode('utf-8'))}"
        ) from None
    return text


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # [B T] int32
    mask: np.ndarray  # [B T] bool
    last: np.ndarray  # [B] index of each row's last real token


class TextTokenizer:
    """Wraps `tokenizers.Tokenizer`; knows the BOS convention and pad id of its model.

    Special ids outside the vocabulary (a config's GPT-2 ids 50256 beside a 49,152-token
    vocabulary; `model_vocab` bounds it by the model's embedding rows too) are refused where
    they would be used and dropped where they would not: a BOS the tokenizer prepends is an
    error; an unused BOS and an EOS the model can never emit (so never ends a generation) are
    None; the pad id falls back to the EOS id, then 0 (padded positions are masked anyway).
    """

    def __init__(
        self,
        tok: Tokenizer,
        *,
        add_bos: bool,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        model_vocab: int | None = None,
        max_positions: int | None = None,
    ):
        self.tok = tok
        self.max_positions = max_positions
        n_ids = tok.get_vocab_size(with_added_tokens=True)
        n_ids = n_ids if model_vocab is None else min(n_ids, model_vocab)
        valid = lambda i: i is not None and 0 <= i < n_ids
        if add_bos and bos_id is not None and not valid(bos_id):
            raise CheckpointError(
                f"bos_token_id {bos_id} is outside the vocabulary ({n_ids} ids), yet the "
                "tokenizer prepends it to every text: fix bos_token_id in the checkpoint's config"
            )
        self.bos_id = bos_id if valid(bos_id) else None
        self.eos_id = eos_id if valid(eos_id) else None
        self.add_bos = bool(add_bos and self.bos_id is not None)
        self.pad_id = next((i for i in (pad_id, self.eos_id) if valid(i)), 0)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def check_fits(self, n_tokens: int, text: str = "", what: str = "the prompt") -> None:
        """Refuse a row of `n_tokens` tokens that the model has no positions for."""
        if self.max_positions is not None and n_tokens > self.max_positions:
            raise InputError(
                f"{what} is {n_tokens} tokens, more than the model's {self.max_positions} "
                f"positions{': ' + preview(text) if text else ''}; shorten it"
            )

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and their (begin, end) character spans in `text` (BOS: (0, 0))."""
        enc = self.tok.encode(checked_text(text), add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        if self.add_bos:
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of a continuation (a target answer): never with BOS."""
        return list(self.tok.encode(checked_text(text), add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_strings(self, ids) -> list[str]:
        return [self.decode([i]) for i in ids]

    def batch(
        self,
        texts: list[str] | list[list[int]],
        *,
        padding: str = "left",
        length: int | None = None,
    ) -> Batch:
        """Pad to a shape bucket (or `length`). Left padding keeps the last token at T-1."""
        if padding not in ("left", "right"):
            raise ValueError("padding must be 'left' or 'right'")
        seqs = [self.encode(t) if isinstance(t, str) else list(t) for t in texts]
        if any(len(s) == 0 for s in seqs):
            raise InputError("empty prompt: nothing to tokenize")
        for t, s in zip(texts, seqs, strict=True):
            self.check_fits(len(s), t if isinstance(t, str) else "")
        T = length or bucket(max(len(s) for s in seqs))
        if max(len(s) for s in seqs) > T:
            raise InputError(f"a sequence of {max(map(len, seqs))} tokens exceeds length {T}")
        tokens = np.full((len(seqs), T), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), T), bool)
        last = np.zeros((len(seqs),), np.int32)
        for i, s in enumerate(seqs):
            lo = T - len(s) if padding == "left" else 0
            tokens[i, lo : lo + len(s)] = s
            mask[i, lo : lo + len(s)] = True
            last[i] = lo + len(s) - 1
        return Batch(tokens, mask, last)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> None:
        """tokenizer.json + tokenizer_config.json that `transformers.AutoTokenizer` reads."""
        self.tok.save(str(directory / "tokenizer.json"))
        vocab = self.tok
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "bos_token": None if self.bos_id is None else vocab.id_to_token(self.bos_id),
            "eos_token": None if self.eos_id is None else vocab.id_to_token(self.eos_id),
            "pad_token": vocab.id_to_token(self.pad_id),
            "clean_up_tokenization_spaces": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def load_hf_tokenizer(
    directory: Path,
    hf_config: dict,
    model_vocab: int | None = None,
    max_positions: int | None = None,
) -> TextTokenizer:
    """From a HF directory: tokenizer.json (preferred) or vocab.json + merges.txt.
    `model_vocab`: the model's vocabulary size, which special ids must lie below;
    `max_positions`: the model's, which rows must fit."""
    tj = directory / "tokenizer.json"
    tcfg_path = directory / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    if tj.exists():
        tok = Tokenizer.from_file(str(tj))
        tok.no_padding()
        tok.no_truncation()
    elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        tok = Tokenizer(BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise CheckpointError(f"{directory}: no tokenizer.json (or vocab.json + merges.txt)")
    bos = hf_config.get("bos_token_id")
    eos = hf_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    # Ask the tokenizer itself whether it prepends BOS, then add it ourselves (explicitly).
    probe = tok.encode("a", add_special_tokens=True).ids
    add_bos = bool(tcfg.get("add_bos_token", bos is not None and probe[:1] == [bos]))
    tok.post_processor = None
    pad = hf_config.get("pad_token_id")
    return TextTokenizer(
        tok,
        add_bos=add_bos,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        model_vocab=model_vocab,
        max_positions=max_positions,
    )


# ----------------------------------------------------------------------------- GGUF

_BYTE_LEVEL_SPLITS = {
    # SmolLM splits digits one by one before the GPT-2 byte-level regex (llama.cpp "smollm").
    "smollm": [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ],
    "gpt2": [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "default": [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
}
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_from_gguf(
    fields: dict, model_vocab: int | None = None, max_positions: int | None = None
) -> TextTokenizer:
    """Byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`)."""
    model = fields.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in fields:
        raise CheckpointError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    if model != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer model {model!r} is not supported (jaxedit reads byte-level BPE "
            "'gpt2' vocabularies); export the model to a HF directory instead"
        )
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre in ("qwen2", "deepseek-r1-qwen"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            _BYTE_LEVEL_SPLITS.get(pre, _BYTE_LEVEL_SPLITS["default"])
        )
    tok.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or []
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == 3
    ]
    if control:
        tok.add_special_tokens(control)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    pad = fields.get("tokenizer.ggml.padding_token_id")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    return TextTokenizer(
        tok,
        add_bos=add_bos,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        model_vocab=model_vocab,
        max_positions=max_positions,
    )
