"""The one edit-request type every method and every data set speaks."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxedit.errors import InputError


@dataclass(frozen=True)
class Probe:
    """A test prompt with its accepted answers (aliases), e.g. a portability question."""

    prompt: str
    answers: tuple[str, ...]
    kind: str = ""  # e.g. "Reasoning", "Subject_Aliasing", "reverse", "Relation_Specificity"


@dataclass(frozen=True)
class EditRequest:
    """Rewrite (subject, relation) -> target_new.

    `prompt` holds "{}" where the subject goes ("{} is located in the city of").
    Target strings are continuations: by convention they start with a space when the data
    set writes them without one (see `jaxedit.eval.scoring` for the exact rule).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[Probe, ...] = ()  # unrelated prompts with their true answers
    portability: tuple[Probe, ...] = ()
    reverse: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        validate(self)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)


def validate(r: EditRequest) -> None:
    if "{}" not in r.prompt:
        raise InputError(f"prompt {r.prompt!r} has no '{{}}' placeholder for the subject")
    if not r.subject.strip():
        raise InputError("empty subject")
    if not r.target_new.strip():
        raise InputError("empty target")


def from_prompt(prompt: str, subject: str, target_new: str, **kw) -> EditRequest:
    """Accept a prompt with "{}" or a prompt that contains the subject literally."""
    if "{}" not in prompt:
        if subject not in prompt:
            raise InputError(f"subject {subject!r} not found in prompt {prompt!r}")
        prompt = prompt.replace(subject, "{}", 1)
    return EditRequest(prompt=prompt, subject=subject, target_new=target_new, **kw)
