"""Task instructions for InstructEdit (Tian et al., IJCAI 2024): one editor, many editing tasks.

InstructEdit is MEND meta-trained on several editing tasks at once, with an instruction naming
the task written before the edit input. For a task τ with template I_τ and an input x,

    x̂ = I_τ[x]      (the template with its one "{prompt}" field replaced by x)

and the editor sees the gradient factors of  x̂ + target  instead of  x + target, so the
instruction's tokens steer which update it makes (zjunlp/EasyEdit: `MultiTaskDataset` builds
the instructed edit input; `examples/test_InstructEdit.py` instructs the edit and rephrase
prompts at test time and leaves the locality prompts as they are).

What carries the instruction (as the reference):
    edit input       instructed  (the editor's input: gradient factors, and the inner loss)
    rephrase input   instructed  (the edit loss on the equivalent input)
    locality input   as it is    (`Instructions.locality=True` instructs it too: an option)

Default templates, one per task, in the reference's layout ("Task: …", "Description: …",
"Input: …" on three lines; the descriptions are ours, kept short because every instruction
token is paid for at every training step):

    counterfact  Task: counterfact
                 Description: Replace a fact about the subject with a counterfactual object.
                 Input: {prompt}
    zsre         Task: zsre
                 Description: Answer the question about the subject with the new object.
                 Input: {prompt}
    knowedit     Task: knowedit
                 Description: Update a Wikidata fact about the subject to the new object.
                 Input: {prompt}

A task is named by the format of its data (`TASK_OF_FORMAT`: EasyEdit's and ROME's CounterFact
→ counterfact, MEND's zsRE → zsre, KnowEdit records → knowedit) or explicitly. A JSON file
`{"task": "template", ...}` overrides or adds templates; every template holds "{prompt}"
exactly once and no other brace (a prompt's own "{}" subject slot passes through untouched).

Several templates per task (`--instructions varied`, or a list in the JSON file): the first is
the **use-time** instruction (edits and tests), the others the **training** ones — case i of a
task is trained with training template i mod m — so the editor never trains on the exact wording
it is used with, as the reference (each training record draws its description from nine, a tenth
is kept for test). `varied` keeps the default templates above as the use-time ones and adds four
training descriptions per task (`VARIED_DESCRIPTIONS`), so its editors are used exactly as the
default ones and differ only in what they trained on. One template: used for both.

Deliberate differences from the reference: the training description of a case cycles instead of
a random draw (a pure function of the data order), four instead of nine; a task is any name, not
one of four fixed ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxedit.errors import InputError
from jaxedit.requests import EditRequest, Probe

FIELD = "{prompt}"

DEFAULT_TEMPLATES: dict[str, str] = {
    "counterfact": (
        "Task: counterfact\n"
        "Description: Replace a fact about the subject with a counterfactual object.\n"
        "Input: {prompt}"
    ),
    "zsre": (
        "Task: zsre\n"
        "Description: Answer the question about the subject with the new object.\n"
        "Input: {prompt}"
    ),
    "knowedit": (
        "Task: knowedit\n"
        "Description: Update a Wikidata fact about the subject to the new object.\n"
        "Input: {prompt}"
    ),
}

# `--instructions varied`: training descriptions besides each default (the use-time one)
VARIED_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "counterfact": (
        "Change what is stated about the subject to the given object.",
        "Rewrite the fact so that the sentence ends with the new object.",
        "Edit the stored fact about the subject to a counterfactual one.",
        "Make the model complete this statement with the new object.",
    ),
    "zsre": (
        "Change the answer to this question to the new object.",
        "Make the model reply to the question with the given answer.",
        "Edit the fact this question asks about to the new answer.",
        "Respond to this question about the subject with the new object.",
    ),
    "knowedit": (
        "Change this Wikidata fact about the subject to the given object.",
        "Rewrite the knowledge graph fact so that it ends with the new object.",
        "Edit the stored Wikidata relation of the subject to the new value.",
        "Make the model complete this Wikidata fact with the new object.",
    ),
}


def _with_description(template: str, description: str) -> str:
    """A default template (three lines) with its "Description:" line replaced."""
    task, _, field = template.split("\n")
    return "\n".join((task, f"Description: {description}", field))


VARIED_TEMPLATES: dict[str, tuple[str, ...]] = {
    task: (t, *(_with_description(t, d) for d in VARIED_DESCRIPTIONS[task]))
    for task, t in DEFAULT_TEMPLATES.items()
}

# the task of a record, from the data format that read it (`jaxedit.eval.datasets.FORMATS`)
TASK_OF_FORMAT: dict[str, str] = {
    "counterfact": "counterfact",
    "counterfact_rome": "counterfact",
    "zsre": "zsre",
    "knowedit": "knowedit",
}


def check_template(task: str, template: object, source: str = "instructions") -> str:
    """`template` if it is a string holding "{prompt}" exactly once and no other brace."""
    if not isinstance(task, str) or not task.strip():
        raise InputError(f"{source}: a task name must be a non-empty string, not {task!r}")
    if not isinstance(template, str):
        raise InputError(f"{source}: the template of task {task!r} must be a string")
    rest = template.replace(FIELD, "")
    if template.count(FIELD) != 1 or "{" in rest or "}" in rest:
        raise InputError(
            f"{source}: the template of task {task!r} must contain the placeholder {FIELD} "
            f"exactly once and no other brace, got {template!r}"
        )
    return template


def instruct(template: str, text: str) -> str:
    """The template with its "{prompt}" replaced by `text` (nothing else is substituted)."""
    head, tail = template.split(FIELD)
    return head + text + tail


Templates = str | Sequence[str]  # one template, or [use-time, training...]


def _as_tuple(task: str, value: object, source: str) -> tuple[str, ...]:
    seq = (value,) if isinstance(value, str) else value
    if not isinstance(seq, Sequence) or isinstance(seq, str) or not seq:
        raise InputError(
            f"{source}: task {task!r} needs a template or a non-empty list of templates"
        )
    return tuple(check_template(task, t, source) for t in seq)


@dataclass(frozen=True)
class Instructions:
    """Per-task templates (sorted (task, (use-time, training...)) pairs: hashable, one
    canonical order) and whether locality inputs carry the instruction too."""

    templates: tuple[tuple[str, tuple[str, ...]], ...]
    locality: bool = False

    def __post_init__(self):
        # checked here too (not only in `of` / `from_dict`): the constructor is public
        pairs = tuple((task, _as_tuple(task, ts, "instructions")) for task, ts in self.templates)
        tasks = [t for t, _ in pairs]
        if len(set(tasks)) != len(tasks):
            raise InputError(f"instructions: a task is listed twice ({tasks})")
        object.__setattr__(self, "templates", tuple(sorted(pairs)))

    @classmethod
    def of(cls, templates: Mapping[str, Templates], locality: bool = False) -> Instructions:
        pairs = tuple((t, _as_tuple(t, v, "instructions")) for t, v in templates.items())
        return cls(pairs, locality)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.templates)

    def _all(self, task: str) -> tuple[str, ...]:
        for t, templates in self.templates:
            if t == task:
                return templates
        raise InputError(
            f"unknown task {task!r}: the instructions cover {', '.join(self.tasks) or 'none'}"
        )

    def template(self, task: str) -> str:
        """The use-time template of `task` (its first)."""
        return self._all(task)[0]

    def training_template(self, task: str, i: int) -> str:
        """The template case i of `task` trains with: its i mod m-th training template (the
        ones after the first), or the only one."""
        templates = self._all(task)
        training = templates[1:] or templates
        return training[i % len(training)]

    def apply(self, task: str, text: str) -> str:
        return instruct(self.template(task), text)

    def to_dict(self) -> dict:
        # one template as a string: the form of configs written before lists existed
        flat = {t: ts[0] if len(ts) == 1 else list(ts) for t, ts in self.templates}
        return {"templates": flat, "locality": self.locality}

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "instructions") -> Instructions:
        if not isinstance(d, Mapping) or not isinstance(d.get("templates"), Mapping):
            raise InputError(f"{source}: expected {{'templates': {{task: template}}, ...}}")
        templates = {task: _as_tuple(task, ts, source) for task, ts in d["templates"].items()}
        return cls(tuple(templates.items()), bool(d.get("locality", False)))


def load_instructions(spec: str | os.PathLike, locality: bool = False) -> Instructions:
    """ "default" (the templates above), "varied" (the same use-time templates, four training
    descriptions each) or a JSON file {task: template or [use-time, training...]} whose entries
    override or add to the defaults."""
    templates: dict[str, Templates] = dict(DEFAULT_TEMPLATES)
    if str(spec) == "varied":
        templates = dict(VARIED_TEMPLATES)
    elif str(spec) != "default":
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"instruction file {path} not found (or pass 'default')")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict) or not raw:
            raise InputError(f"{path}: expected a JSON object {{task: template}}")
        for task, value in raw.items():
            templates[task] = _as_tuple(task, value, str(path))
    return Instructions.of(templates, locality)


def task_of(request: EditRequest, default: str | None = None) -> str:
    """The task of a request: its own `extra["task"]`, else `default`, else the task of the data
    format it was read from (`extra["format"]`, set by `jaxedit.eval.datasets.load`)."""
    task = request.extra.get("task") or default
    if task:
        return str(task)
    fmt = request.extra.get("format")
    if fmt in TASK_OF_FORMAT:
        return TASK_OF_FORMAT[fmt]
    raise InputError(
        f"the task of request {request.rewrite_prompt!r} is unknown: it came from no data set "
        f"whose format names a task ({', '.join(TASK_OF_FORMAT)}); set task=NAME (--task)"
    )


def instruct_request(
    request: EditRequest, instructions: Instructions, task: str | None = None
) -> EditRequest:
    """The request as the reference's test script writes it: rewrite, paraphrase and portability
    prompts instructed, neighbourhood prompts as they are (instructed too with `locality`).

    Scoring these requests measures the edited model *with* the instruction in its input, the
    reference's protocol; scoring the original requests measures it without."""
    template = instructions.template(task_of(request, task))
    on = lambda p: Probe(instruct(template, p.prompt), p.answers, p.kind)
    # `prompt` keeps its "{}" subject slot: the template has no brace of its own
    return dataclasses.replace(
        request,
        prompt=instruct(template, request.prompt),
        paraphrase_prompts=tuple(instruct(template, p) for p in request.paraphrase_prompts),
        portability=tuple(on(p) for p in request.portability),
        neighborhood=tuple(on(p) if instructions.locality else p for p in request.neighborhood),
    )
