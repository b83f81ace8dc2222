"""InstructEdit (Tian et al., IJCAI 2024): one MEND editor for many editing tasks, steered by a
task instruction written before the edit input.

For a request of task τ with instruction template I_τ, edit prompt x and new target y:

    x̂ = I_τ[x]                                    (`jaxedit.methods.mend.instructions`)
    ΔW_l = s · η_l · Σ_t ũ_t δ̃_tᵀ  of  L = NLL(y | x̂)     (MEND, `jaxedit.methods.mend.method`)

so InstructEdit *is* MEND with an instructed edit input and an editor meta-trained on several
tasks at once; this module only chooses the instruction. Training:

    jaxedit mend-train --data counterfact-train.json,zsre_mend_train-1k.json \\
        --instructions default --hparams smollm2-135m-instructedit --out editors/instructedit

(task-balanced steps; edit and rephrase inputs instructed, locality inputs as they are, as the
reference zjunlp/EasyEdit trains; the directory records the instructions). Use:

    m = je.methods.get("instructedit")
    hp = m.hparams(editor="editors/instructedit")        # + task="zsre" to fix the task
    edit, info = m.compute(lm, m.prepare(lm, hp), requests)

The task of a request: its `extra["task"]`, else the hparams `task` (`--task`), else the format
of the data set it was read from (`jaxedit.eval.datasets.load` records it). A task the editor
has no template for is an error; a task it has a template for but never trained on (the
held-out task) is allowed: transfer to it is what InstructEdit claims.

The edited model is scored on the request's own prompts (`jaxedit eval`), i.e. used without the
instruction. The reference's test scores the instructed prompts instead; that protocol is
`jaxedit eval --method mend` on `instructions.instruct_request(r, ...)` (same editor).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from jaxedit.edits import WeightEdit
from jaxedit.errors import ConfigError, InputError
from jaxedit.methods.base import EditMethod, PrepareOptions
from jaxedit.methods.mend.hparams import MENDHparams
from jaxedit.methods.mend.instructions import Instructions, instruct, task_of
from jaxedit.methods.mend.method import MENDState
from jaxedit.methods.mend.method import compute as mend_compute
from jaxedit.methods.mend.method import prepare as mend_prepare
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest


@dataclass(frozen=True)
class InstructEditHparams:
    """Use-time settings only: the editor (a `jaxedit mend-train --instructions` directory) holds
    its network, the weights it edits and its instructions."""

    editor: str | None = None
    edit_scale: float = 1.0  # multiplies every η_l, as MEND's
    task: str | None = None  # every request's task (None: each request's own, see above)

    def __post_init__(self):
        if not (math.isfinite(self.edit_scale) and self.edit_scale >= 0):
            raise ConfigError(f"edit_scale must be a finite number ≥ 0, not {self.edit_scale}")


@dataclass(frozen=True)
class InstructEditState:
    mend: MENDState
    instructions: Instructions
    task: str | None
    trained_tasks: tuple[str, ...]  # the tasks the editor saw in training (others: transfer)


def prepare(lm: LanguageModel, hp: InstructEditHparams, opts: PrepareOptions) -> InstructEditState:
    """Load the editor; refuse one trained without instructions (a plain MEND editor)."""
    if not hp.editor:
        raise InputError(
            "InstructEdit needs a trained editor: set editor=DIR (--editor DIR; see "
            "`jaxedit mend-train --instructions`)"
        )
    state = mend_prepare(lm, MENDHparams(editor=hp.editor, edit_scale=hp.edit_scale), opts)
    conf = state.trained.config
    if not conf.get("instructions"):
        raise InputError(
            f"{hp.editor}: this editor was trained without instructions; use --method mend"
        )
    instructions = Instructions.from_dict(conf["instructions"], f"{hp.editor}/config.json")
    if hp.task is not None:
        instructions.template(hp.task)  # an unknown task fails before any edit
    return InstructEditState(state, instructions, hp.task, tuple(conf.get("tasks", ())))


def instructed(
    requests: list[EditRequest], instructions: Instructions, task: str | None = None
) -> tuple[list[EditRequest], list[str]]:
    """The requests with their edit prompt written into their task's template, and the tasks."""
    tasks = [task_of(r, task) for r in requests]
    out = [
        dataclasses.replace(r, prompt=instruct(instructions.template(t), r.prompt))
        for r, t in zip(requests, tasks, strict=True)
    ]
    return out, tasks


def compute(
    lm: LanguageModel, state: InstructEditState, requests: list[EditRequest]
) -> tuple[WeightEdit, dict]:
    """MEND's edit of the instructed requests (one step on all their edit tokens)."""
    reqs, tasks = instructed(requests, state.instructions, state.task)
    edit, info = mend_compute(lm, state.mend, reqs)
    info["tasks"] = tasks
    info["unseen_tasks"] = sorted({t for t in tasks if t not in state.trained_tasks})
    meta = {**edit.meta, "method": "instructedit", "tasks": tasks}
    return WeightEdit(edit.deltas, meta), info


METHOD = EditMethod(
    name="instructedit",
    hparams_cls=InstructEditHparams,
    prepare_fn=prepare,
    compute_fn=compute,
    summary="InstructEdit: one MEND editor for many tasks, the task's instruction before the edit",
    default_hparams=InstructEditHparams,
)
