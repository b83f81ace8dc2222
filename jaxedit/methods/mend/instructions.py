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

Deliberate differences from the reference: one template per task (the reference draws each
training record's description from nine, keeping a tenth for test); a task is any name, not
one of four fixed ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Instructions:
    """Per-task templates (sorted (task, template) pairs: hashable, one canonical order) and
    whether locality inputs carry the instruction too."""

    templates: tuple[tuple[str, str], ...]
    locality: bool = False

    def __post_init__(self):
        for task, template in self.templates:
            check_template(task, template)
        tasks = [t for t, _ in self.templates]
        if len(set(tasks)) != len(tasks):
            raise InputError(f"instructions: a task is listed twice ({tasks})")
        object.__setattr__(self, "templates", tuple(sorted(self.templates)))

    @classmethod
    def of(cls, templates: Mapping[str, str], locality: bool = False) -> Instructions:
        return cls(tuple(templates.items()), locality)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.templates)

    def template(self, task: str) -> str:
        for t, template in self.templates:
            if t == task:
                return template
        raise InputError(
            f"unknown task {task!r}: the instructions cover {', '.join(self.tasks) or 'none'}"
        )

    def apply(self, task: str, text: str) -> str:
        return instruct(self.template(task), text)

    def to_dict(self) -> dict:
        return {"templates": dict(self.templates), "locality": self.locality}

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "instructions") -> Instructions:
        if not isinstance(d, Mapping) or not isinstance(d.get("templates"), Mapping):
            raise InputError(f"{source}: expected {{'templates': {{task: template}}, ...}}")
        for task, template in d["templates"].items():
            check_template(task, template, source)
        return cls.of(d["templates"], bool(d.get("locality", False)))


def load_instructions(spec: str | os.PathLike, locality: bool = False) -> Instructions:
    """ "default" (the templates above) or a JSON file {task: template} whose entries override
    or add to the defaults."""
    templates = dict(DEFAULT_TEMPLATES)
    if str(spec) != "default":
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"instruction file {path} not found (or pass 'default')")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict) or not raw:
            raise InputError(f"{path}: expected a JSON object {{task: template}}")
        for task, template in raw.items():
            templates[task] = check_template(task, template, str(path))
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
