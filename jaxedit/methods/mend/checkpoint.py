"""A trained MEND editor on disk: what `jaxedit mend-train` writes, and loading it back.

Directory layout:
    config.json        model name + fingerprint, edited weights, hparams, data
    checkpoints/<step> orbax: the full training state (last two kept)
    best/<step>        orbax: editor + normaliser with the best validation loss
    train_log.jsonl    one JSON line per logged step / validation

`load_editor` takes the best (else the latest) editor and refuses one trained for other weights
(the model fingerprint must match): an editor is only valid for the exact params it was trained
on. Corrupt or foreign files raise `CheckpointError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax

from jaxedit.errors import CheckpointError
from jaxedit.methods.mend.hparams import Layout, MENDHparams, make_layout
from jaxedit.methods.mend.state import TrainState, init_state


@dataclass(frozen=True)
class TrainedEditor:
    """An editor ready to use: its params, normaliser statistics and the hparams it was trained
    with (which define its layout), the training step and the directory's config."""

    editor: dict
    norm: dict
    layout: Layout
    hparams: MENDHparams
    step: int
    config: dict


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def manager(directory: Path, keep: int):
    """An orbax CheckpointManager keeping the last `keep` steps."""
    import orbax.checkpoint as ocp  # slow to import: only when files are touched

    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )


def save_state(mgr, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    mgr.save(int(state.step), args=ocp.args.StandardSave(dict(state._asdict())))
    mgr.wait_until_finished()


def save_best(mgr, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    tree = {"editor": state.editor, "norm": state.norm}
    mgr.save(int(state.step), args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()


def restore_state(mgr, layout: Layout, hp: MENDHparams, step: int | None = None) -> TrainState:
    """The training state saved at `step` (default: the latest)."""
    import orbax.checkpoint as ocp

    abstract = jax.eval_shape(lambda: dict(init_state(layout, hp)._asdict()))
    step = mgr.latest_step() if step is None else step
    try:
        tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for truncated / foreign files
        raise CheckpointError(f"corrupt or mismatched MEND checkpoint at step {step} ({e})") from e
    return TrainState(**tree)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such editor directory")
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json (not a `jaxedit mend-train` output)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt config ({e})") from e


def save_editor(
    directory: str | os.PathLike, lm, hp: MENDHparams, editor: dict, norm: dict, step: int = 0
) -> Path:
    """Write an editor in memory as a directory `load_editor` reads (config.json + best/<step>),
    e.g. to hand a hand-built or exported editor to `prepare`. Refuses a non-empty directory."""
    import orbax.checkpoint as ocp

    d = Path(directory).absolute()
    if d.exists() and any(d.iterdir()):
        raise CheckpointError(f"{d} exists and is not empty")
    d.mkdir(parents=True, exist_ok=True)
    layout = make_layout(lm.config, hp)
    conf = {
        "model": lm.name,
        "fingerprint": lm.fingerprint(),
        "weights": [f"{s}.{layer}" for s, layer in layout.weights],
        "hparams": hp.training_dict(),
    }
    write_json_atomic(d / "config.json", conf)
    mgr = manager(d / "best", 1)
    mgr.save(step, args=ocp.args.StandardSave({"editor": editor, "norm": norm}))
    mgr.wait_until_finished()
    mgr.close()
    return d


def load_editor(directory: str | os.PathLike, lm) -> TrainedEditor:
    """The best (else latest) editor in `directory`, refused if trained for other weights."""
    import orbax.checkpoint as ocp

    d = Path(directory).absolute()
    conf = read_config(d)
    fp = lm.fingerprint()
    if not lm.has_fingerprint(conf.get("fingerprint", "")):
        raise CheckpointError(
            f"{d}: editor trained for model {conf.get('model')!r} (fingerprint "
            f"{conf.get('fingerprint')}), not for {lm.name!r} (fingerprint {fp})"
        )
    hp = MENDHparams.from_dict(conf["hparams"])
    layout = make_layout(lm.config, hp)
    for sub in ("best", "checkpoints"):
        if not (d / sub).is_dir():
            continue
        mgr = manager(d / sub, 1 if sub == "best" else 2)
        step = mgr.latest_step()
        if step is None:
            continue
        if sub == "checkpoints":
            tree = restore_state(mgr, layout, hp, step)._asdict()
        else:
            st = init_state(layout, hp)
            abstract = jax.eval_shape(lambda st=st: {"editor": st.editor, "norm": st.norm})
            try:
                tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # orbax raises many types for truncated / foreign files
                raise CheckpointError(f"{d / sub}: corrupt editor checkpoint ({e})") from e
        return TrainedEditor(tree["editor"], tree["norm"], layout, hp, int(step), conf)
    raise CheckpointError(f"{d}: no editor checkpoint (training never saved)")
