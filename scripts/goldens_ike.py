"""IKE parity goldens: the prompt strings the IKE repository's code builds, for fixed records
and fixed demonstration choices, so that tests/test_ike_parity.py can compare jaxedit's
rendered context + query with them (no PyTorch needed there).

    uv run python scripts/goldens_ike.py /path/to/IKE   # a checkout of Zce1112zslx/IKE
    # -> tests/goldens/methods/ike/*.json

The reference is the checkout's `icl.py` (Zce1112zslx/IKE at 6ffd872), imported from the path
given on the command line (nothing of it is copied here):

- `construct_icl_examples(idx, demos)` (lines 30-51) builds the retrieved demonstrations and
  is called as it is. Its inputs are fixed by this script: the module's `corpus_idx` (the
  nearest-first record ids, offset by 2000 as line 37 reads them) holds our chosen records,
  and its `random` is replaced by a scripted stand-in whose `shuffle` puts our chosen kinds
  first in the 32-entry kind list (a permutation of it: the 4 : 12 : 16 counts are kept) and
  whose `choice` returns our chosen paraphrase / neighbour.
- `icl_lm_eval(model, tokenizer, icl_examples, targets, x)` (lines 54-66) joins the
  demonstrations, the query and the target into the text the model reads; it is called with
  a tokenizer that records that text (and a stand-in model), so the strings are the
  reference's own.
- Two steps sit inline in `icl.py`'s `__main__` loop and cannot be imported; they are
  re-enacted here from the reference file: line 129 appends the edited fact's own copy
  demonstration (`New Fact: {prompt} {target_new}\\nPrompt: {prompt} {target_new}\\n\\n`),
  and lines 133 / 146 / 156 build the query `x` as `New Fact: {prompt} {target_new}\\nPrompt:
  {query}` for the rewrite prompt, each paraphrase and each neighbour.

Records are CounterFact's own (ROME format), from the shared data set's `original_format/`
file given by --records; the paper's `clean_paraphrase.py` (a data-preparation script) is not
applied: both sides read the same paraphrase strings.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "goldens" / "methods" / "ike"
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "original_format" / "least_orthogonal.json"
KIND_CODE = {"copy": 0, "update": 1, "retain": 2}  # icl.py's `o` (lines 42-49)

# Each case: the edit (an index into the records), the other records nearest first, and for
# each of those the kind and which paraphrase / neighbour (None for a copy).
CASES = {
    "k8_mixed": {
        "edit": 0,
        "nearest": [3, 7, 1, 5, 2, 8, 4, 6],
        "kinds": ["retain", "update", "retain", "copy", "update", "retain", "update", "retain"],
        "options": [0, 1, 4, None, 0, 9, 1, 2],
    },
    "k3_other_relation": {
        "edit": 5,
        "nearest": [9, 0, 2],
        "kinds": ["update", "copy", "retain"],
        "options": [1, None, 3],
    },
}


class ScriptedRandom:
    """Stands in for `random` inside icl.py: fixed kinds first, fixed choices in order."""

    def __init__(self, kinds: list[str], options: list[int | None]):
        self.kinds = [KIND_CODE[k] for k in kinds]
        self.options = [o for o in options if o is not None]

    def shuffle(self, order: list) -> None:
        rest = Counter(order)
        rest.subtract(self.kinds)
        if any(c < 0 for c in rest.values()):
            raise ValueError(f"kinds {self.kinds} do not fit the reference's mix {Counter(order)}")
        order[:] = self.kinds + [k for k in sorted(rest) for _ in range(rest[k])]

    def choice(self, seq):
        return seq[self.options.pop(0)]


class RecordingTokenizer:
    """Records the text `icl_lm_eval` tokenizes; returns ids of the right shape."""

    def __init__(self, torch):
        self.torch, self.texts = torch, []

    def encode(self, text):
        return list(range(len(text.split())))

    def __call__(self, text, return_tensors=None):
        self.texts.append(text)
        return {"input_ids": self.torch.zeros((1, len(text.split()) + 1), dtype=self.torch.long)}


def load_reference(checkout: Path):
    """Import the checkout's icl.py (it reads corpus_idx.txt relative to the working dir)."""
    try:
        import transformers  # noqa: F401
    except ImportError:  # icl.py imports model classes it never uses in the functions we call
        stub = types.ModuleType("transformers")
        for name in ("GPT2LMHeadModel", "GPT2TokenizerFast", "GPTJForCausalLM", "GPT2Tokenizer"):
            setattr(stub, name, object)
        stub.GPTNeoForCausalLM, stub.set_seed = object, lambda seed: None
        sys.modules["transformers"] = stub
    spec = importlib.util.spec_from_file_location("ike_reference_icl", checkout / "icl.py")
    module = importlib.util.module_from_spec(spec)
    with _cwd(checkout):
        spec.loader.exec_module(module)
    module.device = "cpu"
    return module


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def golden(icl, records: list[dict], case: dict) -> dict:
    import torch

    line = records[case["edit"]]
    rw = line["requested_rewrite"]
    prompt = rw["prompt"].format(rw["subject"])
    target_new, target_true = rw["target_new"]["str"], rw["target_true"]["str"]

    icl.corpus_idx = [[i + 2000 for i in case["nearest"]]]  # line 37: demos[demo_id - 2000]
    icl.random = ScriptedRandom(case["kinds"], case["options"])
    icl_examples = icl.construct_icl_examples(0, records)
    # icl.py line 129 (inline in its main loop): the edited fact's own copy demonstration.
    icl_examples.append(f"New Fact: {prompt} {target_new}\nPrompt: {prompt} {target_new}\n\n")

    queries = [("rewrite", prompt, [target_new, target_true])]
    queries += [("paraphrase", p, [target_new, target_true]) for p in line["paraphrase_prompts"]]
    queries += [
        ("neighborhood", n, [target_true, target_new]) for n in line["neighborhood_prompts"]
    ]
    model = lambda input_ids, labels: types.SimpleNamespace(loss=torch.tensor(0.0))
    texts = []
    for kind, query, targets in queries:
        tok = RecordingTokenizer(torch)
        # icl.py lines 133 / 146 / 156 (inline): the query after the new fact.
        x = f"New Fact: {prompt} {target_new}\nPrompt: {query}"
        icl.icl_lm_eval(model, tok, icl_examples, targets, x)
        for target, text in zip(targets, tok.texts, strict=True):
            texts.append({"kind": kind, "query": query, "target": target, "text": text})
    return {
        "reference": "Zce1112zslx/IKE@6ffd872 icl.py (construct_icl_examples, icl_lm_eval, "
        "lines 129/133/146/156 re-enacted)",
        "edit": case["edit"],
        "nearest": case["nearest"],
        "kinds": case["kinds"],
        "options": case["options"],
        "demonstrations": icl_examples,
        "texts": texts,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkout", type=Path, help="a checkout of github.com/Zce1112zslx/IKE")
    p.add_argument("--records", type=Path, default=DATA, help="CounterFact records (ROME format)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    keep = ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")
    records = [{k: r[k] for k in keep} for r in json.loads(args.records.read_text())]
    icl = load_reference(args.checkout.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        g = {"records": records, **golden(icl, records, case)}
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(g, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {path} ({len(g['texts'])} texts)")


if __name__ == "__main__":
    main()
