"""Meta-training of a MEND editor: one jitted step, orbax checkpoints that resume exactly.

One step, for a batch of B independent edits (vmapped):

    1. u, δ of the edit loss on  prompt + target_new  (one grad per edit; constants below),
    2. fold every token's u, δ into the running mean / std (MEND's normaliser, training mode),
    3. W̃ = W + η ∇̃W  per edit, then on the edited model
       L = c_edit · NLL(target_new | rephrase) + c_loc · KL(p_W ‖ p_W̃)  on the locality input
       (KL at every token of it, or only where it predicts its answer: `loc_kl_positions`),
    4. Adam on (editor, η) — clipped by global norm, accumulated over `accumulate` steps
       (optax.MultiSteps), η stepped with lr_lr (+ lr when `eta_outer`: the reference steps η
       with both of its optimisers, whose Adam directions coincide).

The data order is a pure function of (seed, step), and the checkpoint holds editor, normaliser,
optimiser state, step and early-stopping state, so a resumed run continues bit-identically.
Files: `jaxedit.methods.mend.checkpoint`.

Several tasks (InstructEdit): the cases are grouped by `Case.task`, each task keeps its own last
`val_size` usable cases for validation, the steps draw the tasks in turn (`balanced_indices`),
and validation reports every task and their mean. With `Instructions` each case's inputs carry
its task's instruction (`jaxedit.methods.mend.instructions`); the editor directory records the
instructions, which the editor is then used with. One task without instructions is MEND.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxedit.errors import CheckpointError, InputError
from jaxedit.methods.mend.checkpoint import (
    manager,
    read_config,
    restore_state,
    save_best,
    save_state,
    write_json_atomic,
)
from jaxedit.methods.mend.data import Case, EditBatch, balanced_indices, concat, tokenize_cases
from jaxedit.methods.mend.editor import apply_updates, pseudo_gradients, update_norm
from jaxedit.methods.mend.factors import (
    first_layer,
    gradient_factors,
    prefix_resid,
    shift_layout,
    split_top,
    top_forward,
)
from jaxedit.methods.mend.hparams import Layout, MENDHparams, make_layout
from jaxedit.methods.mend.inputs import (
    Labelled,
    answer_positions,
    every_position,
    labelled,
)
from jaxedit.methods.mend.instructions import Instructions
from jaxedit.methods.mend.losses import kl_loc, label_accuracy, loc_kl_mask, nll
from jaxedit.methods.mend.state import TrainState, init_state, make_optimizer
from jaxedit.models.sharding import mesh_of, put_batch

# ----------------------------------------------------------------------------- the step


def _labelled(part, hp: MENDHparams) -> Labelled:
    return labelled(part[0], part[1], part[2], hp.max_target)


def _loc_rows(loc) -> Labelled:
    """The locality input scored at every position: both KL definitions read from it."""
    return every_position(loc[0], loc[1])


def _prepare_edit(cfg, layout, hp, params, inner, outer, loc):
    """For one edit ([1, T] arrays): factors, residuals entering the edited blocks, pre-edit
    logits of the locality input. Nothing here depends on the editor."""
    first = first_layer(layout)
    cfg_top, top = split_top(cfg, params, first)
    x_in, x_loc = _labelled(inner, hp), _loc_rows(loc)
    # one prefix pass for the three sequences
    h0 = prefix_resid(
        cfg,
        params,
        jnp.concatenate([inner[0], outer[0], loc[0]]),
        jnp.concatenate([inner[1], outer[1], loc[1]]),
        first,
    )
    h_in, h_out, h_loc = (None, None, None) if h0 is None else (h0[:1], h0[1:2], h0[2:])
    _, factors = gradient_factors(cfg_top, top, shift_layout(layout, first), x_in, h_in)
    pre_loc = top_forward(cfg_top, top, x_loc, h_loc).logits
    return jax.lax.stop_gradient((factors, h_in, h_out, h_loc, pre_loc))


def _edited_losses(cfg, layout, hp, params, editor, norm, prepared, inner, outer, loc):
    """Loss and metrics of one edit (no batch axis: arrays [1, T])."""
    factors, h_in, h_out, h_loc, pre_loc = prepared
    first = first_layer(layout)
    cfg_top, top = split_top(cfg, params, first)
    grads, _ = pseudo_gradients(editor, norm, layout, factors, hp.norm)
    new_top = apply_updates(top, shift_layout(layout, first), editor["edit_lrs"], grads)
    x_out = _labelled(outer, hp)
    # the edit rows share one forward of the edited blocks: [edit input,] rephrase
    rows, hs = [x_out], [h_out]
    if hp.inner_loss:
        rows, hs = [_labelled(inner, hp), *rows], [h_in, *hs]
    x_edit = Labelled(*(jnp.concatenate(a) for a in zip(*rows, strict=True)))
    h_edit = None if h_out is None else jnp.concatenate(hs)
    post_edit = top_forward(cfg_top, new_top, x_edit, h_edit)
    # the locality row at every position (its own forward: P differs from the edit rows')
    post_loc = top_forward(cfg_top, new_top, _loc_rows(loc), h_loc).logits
    l_edit = nll(post_edit.logits, x_edit)  # token mean over the edit rows (reference's NLL)
    mask, labels = loc[1], loc[2]
    kl = {p: kl_loc(pre_loc, post_loc, loc_kl_mask(mask, labels, p)) for p in ("all", "answer")}
    # locality: answer tokens whose argmax prediction the edit left unchanged
    answer = answer_positions(labels) & mask
    same = (jnp.argmax(post_loc, -1) == jnp.argmax(pre_loc, -1)) & answer
    keep = jnp.sum(same) / jnp.maximum(jnp.sum(answer), 1)
    metrics = {
        "loss/edit": l_edit,
        "loss/loc": kl[hp.loc_kl_positions],
        "kl/all": kl["all"],
        "kl/answer": kl["answer"],
        "edit/acc": label_accuracy(post_edit.logits[-1:], x_out),
        "loc/acc": keep,
    }
    if hp.inner_loss:
        metrics["edit/acc_inner"] = label_accuracy(post_edit.logits[:1], rows[0])
    return hp.c_edit * l_edit + hp.c_loc * kl[hp.loc_kl_positions], metrics


def _prepare_batch(cfg, layout, hp, params, batch: EditBatch):
    one = lambda i, o, lc: _prepare_edit(cfg, layout, hp, params, i, o, lc)
    return jax.vmap(one)(batch.inner, batch.outer, batch.loc)


def _meta_loss(cfg, layout, hp, params, editor, norm, prepared, batch):
    one = lambda p, i, o, lc: _edited_losses(cfg, layout, hp, params, editor, norm, p, i, o, lc)
    losses, metrics = jax.vmap(one)(prepared, batch.inner, batch.outer, batch.loc)
    metrics = jax.tree.map(jnp.mean, metrics)
    loss = jnp.mean(losses)
    return loss, {**metrics, "loss/total_edit": loss}


def train_step(cfg, layout: Layout, hp: MENDHparams, params, state: TrainState, batch: EditBatch):
    """One meta-training step (pure; `jax.jit` it with cfg, layout, hp static)."""
    prepared = _prepare_batch(cfg, layout, hp, params, batch)
    factors = prepared[0]
    norm = state.norm
    if hp.norm:  # training mode: fold this batch's tokens in first, then normalise with it
        norm = {
            g: update_norm(
                norm[g],
                factors.u[g].reshape(-1, factors.u[g].shape[-1]),
                factors.d[g].reshape(-1, factors.d[g].shape[-1]),
                factors.m[g].reshape(-1),
            )
            for g in norm
        }
    loss_fn = lambda ed: _meta_loss(cfg, layout, hp, params, ed, norm, prepared, batch)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.editor)
    opt = make_optimizer(hp, state.editor)
    updates, opt_state = opt.update(grads, state.opt_state, state.editor)
    editor = optax.apply_updates(state.editor, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["edit_lr_mean"] = jnp.mean(editor["edit_lrs"])
    new_state = state._replace(step=state.step + 1, editor=editor, norm=norm, opt_state=opt_state)
    return new_state, metrics


def eval_step(cfg, layout: Layout, hp: MENDHparams, params, editor, norm, batch: EditBatch):
    """Validation metrics of a batch (no normaliser update, no optimiser)."""
    prepared = _prepare_batch(cfg, layout, hp, params, batch)
    return _meta_loss(cfg, layout, hp, params, editor, norm, prepared, batch)[1]


def jit_steps(cfg, layout, hp):
    step = jax.jit(lambda p, s, b: train_step(cfg, layout, hp, p, s, b))
    ev = jax.jit(lambda p, e, n, b: eval_step(cfg, layout, hp, p, e, n, b))
    return step, ev


# ----------------------------------------------------------------------------- the loop


def _fmt(metrics: dict) -> dict:
    return {k: round(float(v), 6) for k, v in metrics.items()}


def split_edits(mesh, batch: EditBatch) -> EditBatch:
    """Data parallel on a mesh (`jaxedit.models.sharding`): the batch's edits split over its
    batch axes, so each device runs its own edits' inner and outer passes and XLA averages the
    editor's gradients across them (unchanged without a mesh, or when the edits do not divide)."""
    return EditBatch(*(put_batch(mesh, *part) for part in batch))


def evaluate(ev, params, editor, norm, data: EditBatch, batch: int) -> dict:
    """Mean validation metrics over `data` (the last partial batch wraps around)."""
    n = len(data)
    sums: dict[str, float] = {}
    n_batches = -(-n // batch)
    for i in range(n_batches):
        idx = np.arange(i * batch, (i + 1) * batch) % n
        m = ev(params, editor, norm, split_edits(mesh_of(params), data.take(idx)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {f"{k}_val": v / n_batches for k, v in sums.items()}


def _run_config(
    lm,
    layout: Layout,
    hp: MENDHparams,
    data_name: str,
    tasks: dict[str, tuple[int, int]],
    instructions: Instructions | None,
):
    return {
        "model": lm.name,
        "fingerprint": lm.fingerprint(),
        "model_config": lm.config.to_dict(),
        "weights": [f"{s}.{layer}" for s, layer in layout.weights],
        "groups": {n: {"in": i, "out": o, "members": list(m)} for n, i, o, m in layout.groups},
        "hparams": hp.training_dict(),
        "data": data_name,
        "n_train": sum(n for n, _ in tasks.values()),
        "n_val": sum(n for _, n in tasks.values()),
        "tasks": {t: {"n_train": a, "n_val": b} for t, (a, b) in tasks.items()},
        "instructions": None if instructions is None else instructions.to_dict(),
    }


def _open_run(out: Path, conf: dict, resume: bool) -> None:
    """Create `out` (or check that a resumed run matches it) and write its config."""
    if out.exists() and any(out.iterdir()) and not resume:
        raise InputError(f"{out} exists and is not empty; pass --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / "config.json").exists():
        old = read_config(out)
        same_hp = MENDHparams.from_dict(old["hparams"]).training_dict() == conf["hparams"]
        if old.get("fingerprint") != conf["fingerprint"] or not same_hp:
            raise CheckpointError(f"{out}: trained for another model or hparams; cannot resume")
        # a run from before tasks / instructions existed: one task, no instructions
        same_tasks = "tasks" not in old or list(old["tasks"]) == list(conf["tasks"])
        if old.get("instructions") != conf["instructions"] or not same_tasks:
            raise CheckpointError(f"{out}: trained on other tasks or instructions; cannot resume")
    write_json_atomic(out / "config.json", conf)


def _validate(ev, params, state: TrainState, vals: dict[str, EditBatch], hp, best_mgr, log):
    """Validation metrics (with several tasks: each task's, and their mean); the early-stopping
    state updated and the best editor saved."""
    run = lambda v: evaluate(ev, params, state.editor, state.norm, v, hp.batch)
    if len(vals) == 1:
        vm = run(next(iter(vals.values())))
    else:
        per = {t: run(v) for t, v in vals.items()}
        vm = {k: float(np.mean([m[k] for m in per.values()])) for k in next(iter(per.values()))}
        vm |= {f"{t}/{k}": v for t, m in per.items() for k, v in m.items()}
    better = vm["loss/total_edit_val"] < float(state.best_val)
    if better:
        state = state._replace(
            best_val=jnp.asarray(vm["loss/total_edit_val"], jnp.float32),
            since_best=jnp.zeros((), jnp.int32),
        )
        save_best(best_mgr, state)
    else:
        state = state._replace(since_best=state.since_best + 1)
    log.write(json.dumps({"step": int(state.step), "best": better, **_fmt(vm)}) + "\n")
    log.flush()
    return state


def split_tasks(
    tok, cases: list[Case], hp: MENDHparams, val_size: int, instructions: Instructions | None
) -> dict[str, tuple[EditBatch, EditBatch]]:
    """{task: (train, validation)} in the order tasks first appear; each task's validation
    edits are its last `val_size` usable cases. Every task needs an instruction when
    `instructions` are given."""
    tasks: dict[str, list[Case]] = {}
    for c in cases:
        tasks.setdefault(c.task, []).append(c)
    if instructions is not None:
        for t in tasks:
            instructions.template(t)  # an unknown task fails here, before any training
    out = {}
    for t, cs in tasks.items():
        data = tokenize_cases(tok, cs, hp.max_len, hp.max_target, instructions)
        if len(data) <= val_size:
            name = f"task {t!r}: only" if len(tasks) > 1 else "only"
            raise InputError(f"{name} {len(data)} usable cases; need more than val_size={val_size}")
        out[t] = (
            data.take(np.arange(len(data) - val_size)),
            data.take(np.arange(len(data) - val_size, len(data))),
        )
    return out


def train(
    lm,
    cases: list[Case],
    out_dir: str | os.PathLike,
    hp: MENDHparams,
    *,
    steps: int = 300,
    val_every: int = 50,
    val_size: int = 32,
    patience: int = 5,
    log_every: int = 10,
    resume: bool = False,
    progress: bool = True,
    data_name: str = "",
    stop_after: int | None = None,
    instructions: Instructions | None = None,
) -> dict:
    """Meta-train an editor on `cases` (one task or several: `Case.task`), with the task
    instructions written into their inputs when `instructions` are given (InstructEdit);
    returns a summary. `stop_after` ends the run early (for tests)."""
    out = Path(out_dir).absolute()
    layout = make_layout(lm.config, hp)
    split = split_tasks(lm.tokenizer, cases, hp, val_size, instructions)
    sizes = tuple(len(tr) for tr, _ in split.values())
    train_data = concat([tr for tr, _ in split.values()])
    vals = {t: va for t, (_, va) in split.items()}
    tasks = {t: (len(tr), len(va)) for t, (tr, va) in split.items()}
    conf = _run_config(lm, layout, hp, data_name, tasks, instructions)
    _open_run(out, conf, resume)

    mgr, best_mgr = manager(out / "checkpoints", 2), manager(out / "best", 1)
    state = init_state(layout, hp)
    if resume and mgr.latest_step() is not None:
        state = restore_state(mgr, layout, hp)
    start = int(state.step)
    log_path = out / "train_log.jsonl"
    _truncate_log(log_path, start)
    step_fn, ev = jit_steps(lm.config, layout, hp)
    params, mesh = lm.params, mesh_of(lm.params)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="mend-train", dynamic_ncols=True)
    t0, stopped, last = time.perf_counter(), False, {}
    acc: dict[str, float] = {}
    n_acc = 0
    with open(log_path, "a") as log:
        while int(state.step) < steps:
            s = int(state.step)
            idx = balanced_indices(sizes, s, hp.batch, hp.seed)
            state, metrics = step_fn(params, state, split_edits(mesh, train_data.take(idx)))
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + float(v)
            n_acc += 1
            s += 1
            if s % log_every == 0 or s == steps:
                last = {k: v / n_acc for k, v in acc.items()}
                log.write(json.dumps({"step": s, **_fmt(last)}) + "\n")
                log.flush()
                acc, n_acc = {}, 0
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{last['loss/total_edit']:.3f}",
                        edit=f"{last['edit/acc']:.2f}",
                        loc=f"{last['loc/acc']:.2f}",
                    )
            if bar is not None:
                bar.update(1)
            if s % val_every == 0 or s == steps:
                state = _validate(ev, params, state, vals, hp, best_mgr, log)
                save_state(mgr, state)  # state after validation: resumes with the same stopper
                if int(state.since_best) >= patience:
                    stopped = True
                    break
            if stop_after is not None and s - start >= stop_after:
                break
    if bar is not None:
        bar.close()
    if int(state.step) % val_every != 0 and not stopped:
        save_state(mgr, state)
    mgr.close()
    best_mgr.close()
    elapsed = time.perf_counter() - t0
    done = int(state.step) - start
    return {
        "out": str(out),
        "steps": int(state.step),
        "steps_this_run": done,
        "seconds": round(elapsed, 2),
        "steps_per_s": round(done / elapsed, 4) if elapsed > 0 else None,
        "early_stopped": stopped,
        "best_val_loss": float(state.best_val),
        "last_train": _fmt(last) if last else {},
        "n_train": len(train_data),
        "tasks": conf["tasks"],
        "weights": conf["weights"],
    }


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the restored step: they belong to work the crash threw away."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))
