"""InstructEdit: task instructions (golden strings), multi-task MEND training (task-balanced,
resumable), the method on the protocol, and bad input. An instruction-free InstructEdit editor
is MEND: same seed, same data -> bit-identical params."""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest

import jaxedit as je
from jaxedit.errors import CheckpointError, ConfigError, InputError
from jaxedit.eval import datasets
from jaxedit.methods.mend import checkpoint as ckpt
from jaxedit.methods.mend import data as md
from jaxedit.methods.mend import instructions as ins
from jaxedit.methods.mend import train as mt
from jaxedit.methods.mend.hparams import MENDHparams, make_layout
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import init_params
from jaxedit.requests import EditRequest, Probe

# The documented templates (jaxedit/methods/mend/instructions.py, README), written out in full.
CF_EDIT = (
    "Task: counterfact\n"
    "Description: Replace a fact about the subject with a counterfactual object.\n"
    "Input: Toko Yasuda, the"
)
ZSRE_EDIT = (
    "Task: zsre\n"
    "Description: Answer the question about the subject with the new object.\n"
    "Input: What is the product made by UniFirst?"
)
KE_EDIT = (
    "Task: knowedit\n"
    "Description: Update a Wikidata fact about the subject to the new object.\n"
    "Input: The name of the country which Goursez Vreizh is associated with is"
)


def _tiny(smollm, seed=0) -> LanguageModel:
    """A tiny random Llama sharing the embedded model's tokenizer (fast to compile)."""
    cfg = ModelConfig(
        model_type="llama",
        family="llama",
        vocab_size=smollm.config.vocab_size,
        d_model=32,
        n_layers=4,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        d_ff=64,
        max_positions=128,
    )
    return LanguageModel("tiny-llama", cfg, init_params(cfg, seed), smollm.tokenizer)


@pytest.fixture(scope="module")
def paths(data_dir):
    return {
        "counterfact": f"{data_dir}/counterfact/counterfact-train.json",
        "zsre": f"{data_dir}/zsre/zsre_mend_train-1k.json",
        "knowedit": f"{data_dir}/knowedit/train_cf.json",
    }


def _hp(**kw) -> MENDHparams:
    base = dict(rank=8, batch=2, accumulate=2, lr=1e-3, lr_lr=1e-3, max_len=24)
    return MENDHparams(**{**base, **kw})


def _leaves(directory, layout, hp):
    mgr = ckpt.manager(directory / "checkpoints", 2)
    return [np.asarray(x) for x in jax.tree.leaves(ckpt.restore_state(mgr, layout, hp))]


# ----------------------------------------------------------------------------- templates


def test_default_templates_golden(paths):
    """Each task's default instruction, applied to a record of its data set, exactly as the
    module docstring and the README document it."""
    d = ins.load_instructions("default")
    assert d.tasks == ("counterfact", "knowedit", "zsre") and not d.locality
    cf = md.load_cases(paths["counterfact"], limit=1)[0]
    zs = md.load_cases(paths["zsre"], limit=1)[0]
    ke = md.load_cases(paths["knowedit"], limit=1)[0]
    assert (cf.task, zs.task, ke.task) == ("counterfact", "zsre", "knowedit")
    assert d.apply(cf.task, cf.prompt) == CF_EDIT
    assert d.apply(zs.task, zs.prompt) == ZSRE_EDIT
    assert d.apply(ke.task, ke.prompt) == KE_EDIT
    # what the training inputs carry: edit and rephrase instructed, locality as it is
    (inner, t1), (outer, t2), (loc, a) = md.case_texts(zs, d)
    assert inner == ZSRE_EDIT and (t1, t2) == ("unmanned aircraft",) * 2
    assert outer == ZSRE_EDIT.replace(zs.prompt, "What will be the product of UniFirst?")
    assert loc == "nq question: john goodman's character in the big lebowski"
    assert a == "Walter Sobchak"
    located = md.case_texts(zs, ins.Instructions(d.templates, locality=True))[2][0]
    assert located == ZSRE_EDIT.replace(zs.prompt, loc)
    # KnowEdit's train file has no rephrase: the prompt stands in; locality: Relation_Specificity
    assert ke.rephrase == ke.prompt
    assert (ke.loc_prompt, ke.loc_answer) == (
        "The name of the founder of Goursez Vreizh is",
        "Jean Le Fustec",
    )
    # no instructions: MEND's inputs
    assert md.case_texts(cf) == (
        (cf.prompt, cf.target),
        (cf.rephrase, cf.target),
        (cf.loc_prompt, cf.loc_answer),
    )


def test_varied_templates_golden(paths):
    """`varied`: the default templates are used at edit time, and case i of a task trains with
    the (i mod 4)-th of the task's four documented descriptions."""
    v, d = ins.load_instructions("varied"), ins.load_instructions("default")
    assert v.tasks == d.tasks and all(v.template(t) == d.template(t) for t in d.tasks)
    zs = md.load_cases(paths["zsre"], limit=5)
    inner = [md.case_texts(c, v, i)[0][0] for i, c in enumerate(zs)]
    head = "Task: zsre\nDescription: "
    assert inner[0] == head + "Change the answer to this question to the new object.\nInput: " + (
        zs[0].prompt
    )
    assert (
        inner[3]
        == (head + "Respond to this question about the subject with the new object.\nInput: ")
        + zs[3].prompt
    )
    assert inner[4] == inner[0].replace(zs[0].prompt, zs[4].prompt)  # four, in turn
    assert md.case_texts(zs[1], v, 1)[1][0].startswith(
        head + "Make the model reply to the question with the given answer.\nInput: "
    )  # the rephrase input carries the case's training instruction too
    for t in v.tasks:  # no training description is the use-time one
        assert v.template(t) not in {v.training_template(t, i) for i in range(4)}
    # an editor's config holds every template; a one-template task stays a string, as before
    assert ins.Instructions.from_dict(v.to_dict()) == v
    assert d.to_dict()["templates"]["zsre"] == ins.DEFAULT_TEMPLATES["zsre"]


def test_instructed_tokens_are_the_instructed_text(smollm, paths):
    """Tokenising with instructions = tokenising cases whose texts were instructed by hand."""
    d = ins.load_instructions("default")
    cases = md.load_cases(paths["zsre"], limit=6)
    by_hand = [
        md.Case(
            d.apply("zsre", c.prompt),
            c.target,
            d.apply("zsre", c.rephrase),
            c.loc_prompt,
            c.loc_answer,
        )
        for c in cases
    ]
    a = md.tokenize_cases(smollm.tokenizer, cases, 48, 8, d)
    b = md.tokenize_cases(smollm.tokenizer, by_hand, 48, 8)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    first = a.inner[0][0, 0][a.inner[1][0, 0]]
    assert smollm.tokenizer.decode(list(first)).startswith("Task: zsre\nDescription:")


def test_instruct_request_is_the_reference_test_protocol():
    r = EditRequest(
        "{} was born in",
        "Alan Turing",
        "Paris",
        "London",
        paraphrase_prompts=("Alan Turing's birthplace is",),
        neighborhood=(Probe("Ada Lovelace was born in", ("London",), "neighborhood"),),
        portability=(Probe("The country Alan Turing was born in is", ("France",), "x"),),
        extra={"format": "counterfact_rome"},
    )
    d = ins.load_instructions("default")
    head = d.template("counterfact").replace("{prompt}", "")
    out = ins.instruct_request(r, d)
    assert out.rewrite_prompt == head + "Alan Turing was born in"
    assert out.paraphrase_prompts == (head + "Alan Turing's birthplace is",)
    assert out.portability[0].prompt == head + "The country Alan Turing was born in is"
    assert out.neighborhood == r.neighborhood  # locality prompts as they are
    on = ins.instruct_request(r, ins.Instructions(d.templates, locality=True))
    assert on.neighborhood[0].prompt == head + "Ada Lovelace was born in"
    # the task: the request's own, else the given default, else the data format's
    assert ins.task_of(r) == "counterfact" and ins.task_of(r, "zsre") == "zsre"
    tagged = EditRequest("{} x", "s", "t", extra={"task": "knowedit", "format": "zsre"})
    assert ins.task_of(tagged, "zsre") == "knowedit"
    with pytest.raises(InputError, match="task of request"):
        ins.task_of(EditRequest("{} x", "s", "t"))


def test_dataset_requests_know_their_format(paths):
    ds = datasets.load(paths["zsre"], n=2)
    assert [r.extra["format"] for r in ds.requests] == ["zsre", "zsre"]
    assert ins.task_of(ds.requests[0]) == "zsre"


# ----------------------------------------------------------------------------- data order


def test_balanced_indices_pure_balanced_and_mend_for_one_task():
    sizes = (7, 3, 5)
    offsets = (0, 7, 10)
    draws = [md.balanced_indices(sizes, s, 4, 1) for s in range(30)]
    assert all(np.array_equal(a, md.balanced_indices(sizes, s, 4, 1)) for s, a in enumerate(draws))
    flat = np.concatenate(draws)
    task = np.searchsorted(offsets, flat, side="right") - 1
    assert list(task[:6]) == [0, 1, 2, 0, 1, 2]  # the tasks in turn
    assert np.bincount(task).tolist() == [40, 40, 40]  # whatever their sizes
    for t, (n, off) in enumerate(zip(sizes, offsets, strict=True)):
        mine = flat[task == t] - off
        assert sorted(mine[:n]) == list(range(n))  # each task's first epoch: a permutation
    for s in range(5):  # one task: MEND's order, exactly
        assert np.array_equal(md.balanced_indices((10,), s, 4, 3), md.batch_indices(10, s, 4, 3))


def test_load_data_names_tasks(paths):
    cases = md.load_data(f"{paths['counterfact']},myzsre={paths['zsre']}", limit=3)
    assert [c.task for c in cases] == ["counterfact"] * 3 + ["myzsre"] * 3
    with pytest.raises(InputError, match="comes from two files"):
        md.load_data(f"{paths['zsre']},{paths['zsre']}", limit=3)
    with pytest.raises(InputError, match="empty entry"):
        md.load_data(f"{paths['zsre']},", limit=3)


# ----------------------------------------------------------------------------- training


@pytest.mark.slow  # ~70 s on 2 cores: two trainings and two edits on the tiny model
def test_instruction_free_instructedit_is_mend(smollm, paths, tmp_path):
    """The InstructEdit path with an empty instruction ("{prompt}") and the data read as a task
    list trains the same editor as MEND, bit for bit, and edits identically."""
    lm = _tiny(smollm)
    hp = _hp()
    kw = dict(steps=3, val_every=2, val_size=4, log_every=1, progress=False)
    mt.train(lm, md.load_cases(paths["counterfact"], limit=30), tmp_path / "mend", hp, **kw)
    empty = ins.Instructions.of({"counterfact": "{prompt}"})
    cases = md.load_data(paths["counterfact"], limit=30)
    mt.train(lm, cases, tmp_path / "ie", hp, instructions=empty, **kw)
    layout = make_layout(lm.config, hp)
    a, b = _leaves(tmp_path / "mend", layout, hp), _leaves(tmp_path / "ie", layout, hp)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], b[0] * 0)  # (the editor is not all zeros)
    assert json.loads((tmp_path / "ie" / "config.json").read_text())["instructions"] == {
        "templates": {"counterfact": "{prompt}"},
        "locality": False,
    }

    reqs = datasets.load(paths["counterfact"].replace("train", "edit"), n=2).requests
    mend = je.methods.get("mend")
    m = je.methods.get("instructedit")
    e1, _ = mend.compute(lm, mend.prepare(lm, hp.replace(editor=str(tmp_path / "mend"))), reqs)
    e2, info = m.compute(lm, m.prepare(lm, m.hparams(editor=str(tmp_path / "ie"))), reqs)
    assert info["tasks"] == ["counterfact"] * 2 and e2.meta["method"] == "instructedit"
    for d1, d2 in zip(e1.deltas, e2.deltas, strict=True):
        np.testing.assert_array_equal(d1.left, d2.left)
        np.testing.assert_array_equal(d1.right, d2.right)


@pytest.mark.slow  # ~80 s on 2 cores: three trainings of the tiny model on two tasks
def test_multitask_resume_is_bit_identical_and_edits(smollm, paths, tmp_path):
    lm = _tiny(smollm)
    hp = _hp(max_len=48)
    d = ins.load_instructions("default")
    cases = md.load_data(f"{paths['counterfact']},{paths['zsre']}", limit=20)
    kw = dict(steps=4, val_every=2, val_size=3, log_every=1, progress=False, instructions=d)
    full = mt.train(lm, cases, tmp_path / "full", hp, **kw)
    assert list(full["tasks"]) == ["counterfact", "zsre"]
    mt.train(lm, cases, tmp_path / "part", hp, stop_after=2, **kw)  # a "crash" after step 2
    resumed = mt.train(lm, cases, tmp_path / "part", hp, resume=True, **kw)
    assert resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    layout = make_layout(lm.config, hp)
    a, b = _leaves(tmp_path / "full", layout, hp), _leaves(tmp_path / "part", layout, hp)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    log = (tmp_path / "full" / "train_log.jsonl").read_text()
    assert log == (tmp_path / "part" / "train_log.jsonl").read_text()
    val = [json.loads(ln) for ln in log.splitlines() if "best" in json.loads(ln)][-1]
    per_task = [val[f"{t}/edit/acc_val"] for t in ("counterfact", "zsre")]
    assert val["edit/acc_val"] == pytest.approx(np.mean(per_task))
    # other instructions or tasks: not the same run
    other = ins.Instructions.of({**dict(d.templates), "zsre": "Q: {prompt}"})
    with pytest.raises(CheckpointError, match="other tasks or instructions"):
        mt.train(lm, cases, tmp_path / "part", hp, **{**kw, "instructions": other}, resume=True)

    # the editor through the protocol: each request's task from its data format
    m = je.methods.get("instructedit")
    state = m.prepare(lm, m.hparams(editor=str(tmp_path / "full")))
    assert state.trained_tasks == ("counterfact", "zsre")
    zs = datasets.load(paths["zsre"], n=1).requests
    ke = datasets.load(paths["knowedit"], n=1).requests
    edit, info = m.compute(lm, state, zs + ke)
    assert info["tasks"] == ["zsre", "knowedit"] and info["unseen_tasks"] == ["knowedit"]
    assert edit.meta["requests"][0].startswith("Task: zsre\n")
    lm2 = je.apply(lm, edit)
    assert not np.array_equal(
        get_weight(lm2.params, "mlp_out", 3), get_weight(lm.params, "mlp_out", 3)
    )
    # the instruction steers the edit: the same request edited as another task differs
    as_zsre, _ = m.compute(lm, state, zs)
    as_cf = m.prepare(lm, m.hparams(editor=str(tmp_path / "full"), task="counterfact"))
    as_cf, _ = m.compute(lm, as_cf, zs)
    assert as_cf.meta["tasks"] == ["counterfact"]
    assert not np.allclose(as_cf.deltas[-1].matrix(), as_zsre.deltas[-1].matrix())
    # unknown task (no template in the editor), and a MEND editor without instructions
    with pytest.raises(InputError, match="unknown task 'mquake'"):
        m.prepare(lm, m.hparams(editor=str(tmp_path / "full"), task="mquake"))
    plain = tmp_path / "plain"
    mt.train(lm, cases[:20], plain, hp, **{**kw, "instructions": None, "steps": 1})
    with pytest.raises(InputError, match="trained without instructions"):
        m.prepare(lm, m.hparams(editor=str(plain)))


# ----------------------------------------------------------------------------- bad input


def test_bad_instruction_files(tmp_path):
    cases = {
        "missing placeholder": ({"zsre": "Task: zsre\nInput:"}, "placeholder \\{prompt\\}"),
        "twice": ({"zsre": "{prompt} {prompt}"}, "exactly once"),
        "other brace": ({"zsre": "Task {x}: {prompt}"}, "no other brace"),
        "not a string": ({"zsre": 3}, "a template or a non-empty list"),
        "empty list": ({"zsre": []}, "a template or a non-empty list"),
        "bad list entry": ({"zsre": ["{prompt}", "Q:"]}, "placeholder \\{prompt\\}"),
        "list of non-strings": ({"zsre": [["{prompt}"]]}, "must be a string"),
        "not an object": (["{prompt}"], "JSON object"),
    }
    for name, (content, match) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(content))
        with pytest.raises(InputError, match=match):
            ins.load_instructions(f)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        ins.load_instructions(tmp_path / "bad.json")
    with pytest.raises(InputError, match="not found"):
        ins.load_instructions(tmp_path / "missing.json")
    # a file overrides and adds to the defaults
    (tmp_path / "ok.json").write_text(json.dumps({"zsre": "Q: {prompt}", "mquake": "M {prompt}"}))
    d = ins.load_instructions(tmp_path / "ok.json")
    assert d.apply("zsre", "x") == "Q: x" and d.apply("mquake", "y") == "M y"
    assert d.template("counterfact") == ins.DEFAULT_TEMPLATES["counterfact"]
    with pytest.raises(InputError, match="unknown task 'wiki'"):
        d.template("wiki")
    # a list: the first is the use-time template, the others the training ones, in turn
    (tmp_path / "list.json").write_text(
        json.dumps({"zsre": ["Q: {prompt}", "A {prompt}", "B {prompt}"]})
    )
    d = ins.load_instructions(tmp_path / "list.json")
    assert d.apply("zsre", "x") == "Q: x"
    training = [d.training_template("zsre", i) for i in range(3)]
    assert training == ["A {prompt}", "B {prompt}", "A {prompt}"]
    assert d.training_template("counterfact", 7) == ins.DEFAULT_TEMPLATES["counterfact"]
    assert ins.Instructions.from_dict(d.to_dict()) == d


def test_training_on_a_task_without_instruction_is_refused(smollm, paths, tmp_path):
    cases = md.load_data(f"wiki={paths['zsre']}", limit=40)
    with pytest.raises(InputError, match="unknown task 'wiki'"):
        mt.train(
            _tiny(smollm),
            cases,
            tmp_path / "o",
            _hp(),
            instructions=ins.load_instructions("default"),
            progress=False,
        )
    assert not (tmp_path / "o").exists()  # nothing written


def test_cli_bad_instructions_exit_2(paths, tmp_path, capsys):
    from jaxedit.cli.main import main

    f = tmp_path / "i.json"
    f.write_text(json.dumps({"zsre": "no placeholder"}))
    argv = ["mend-train", "--data", paths["zsre"], "--out", str(tmp_path / "o")]
    assert main([*argv, "--instructions", str(f)]) == 2
    err = capsys.readouterr().err
    assert "placeholder {prompt}" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--instruct-locality"]) == 2
    assert "needs --instructions" in capsys.readouterr().err


def test_cli_editor_and_task_flags(smollm):
    from jaxedit.cli.method_args import method_and_hparams

    args = argparse.Namespace(
        method="instructedit", hparams=None, hparam_overrides=[], editor="E", task="zsre"
    )
    _, hp = method_and_hparams(args, smollm)
    assert (hp.editor, hp.task, hp.edit_scale) == ("E", "zsre", 1.0)
    args = argparse.Namespace(
        method="none", hparams=None, hparam_overrides=[], editor=None, task="zsre"
    )
    with pytest.raises(ConfigError, match="unknown"):
        method_and_hparams(args, smollm)
    m = je.methods.get("instructedit")
    with pytest.raises(InputError, match="needs a trained editor"):
        m.prepare(smollm, m.hparams())
    with pytest.raises(ConfigError, match="edit_scale"):
        m.hparams(edit_scale=-1.0)
