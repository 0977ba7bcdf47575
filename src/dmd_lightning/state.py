"""What a DMDModule checkpoint holds and how it is read back.

Held: the trained networks (generator, its EMA, fake score, GAN head), both optimizers and schedules (Lightning's
part), the update count and the RNG states, so that `--ckpt_path` continues the same trajectory. Left out: the
networks that never train (teacher, regression and evaluation networks; at SD1.5 scale the teacher alone is
3.4 GB) and a LoRA network's frozen base, all of which the configured model loads from their own files.
`warm_start` takes only the trained networks of another run (`init_from`).
"""

from __future__ import annotations

import warnings

from dmd_lightning.checkpoint import load_checkpoint_file
from dmd_lightning.checks import check_same_model, is_finite_module
from dmd_lightning.errors import CheckpointError, NonFiniteError
from dmd_lightning.frozen import drop_frozen, fill_frozen
from dmd_lightning.rng import rng_states, set_rng_states

FROZEN = ("teacher.", "regression_loss.", "evaluators.")  # state-dict prefixes of networks that never train
TRAINED = ("generator.", "generator_ema.", "fake_score.")


def untrained_keys(module) -> list[str]:
    """Keys of the trained networks' parameters that do not train: a LoRA's frozen base, and its EMA twin."""
    frozen = [k for k, p in module.generator.named_parameters() if not p.requires_grad]
    return ([f"generator.{k}" for k in frozen] + [f"generator_ema.{k}" for k in frozen]
            + [f"fake_score.{k}" for k, p in module.fake_score.named_parameters() if not p.requires_grad])


def save_state(module, checkpoint: dict) -> None:
    """on_save_checkpoint: refuses non-finite weights, leaves out what the model loads itself, adds the update
    count and the RNG states."""
    for name in ("generator", "fake_score", "generator_ema", "classifier"):
        if getattr(module, name) is not None and not is_finite_module(getattr(module, name)):
            raise NonFiniteError(f"{name} has non-finite weights at iteration {module.iteration}; not saving")
    drop_frozen(checkpoint["state_dict"], FROZEN)
    for k in untrained_keys(module):
        checkpoint["state_dict"].pop(k, None)
    checkpoint["dmd_iteration"] = module.iteration
    checkpoint["dmd_accumulate"] = module.optim.accumulate
    checkpoint["dmd_rng"] = {"global": rng_states(), "noise": module.noise.state()}


def load_state(module, checkpoint: dict) -> dict | None:
    """on_load_checkpoint: completes the state dict with what the model loaded itself, refuses another model's
    (CheckpointError naming the weights), sets the update count; the RNG states to restore, or None."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError("the checkpoint holds no 'state_dict': pass a checkpoint written by `dmd fit`")
    own, state = module.state_dict(), fill_frozen(module, checkpoint["state_dict"], FROZEN)
    for k in untrained_keys(module):
        state.setdefault(k, own[k])
    check_same_model(own, state)
    module.iteration = int(checkpoint.get("dmd_iteration", 0))
    accumulate = int(checkpoint.get("dmd_accumulate", module.optim.accumulate))
    if accumulate != module.optim.accumulate:  # the same number of updates, in batches of the new accumulation
        warnings.warn(f"resuming with optim.accumulate {module.optim.accumulate} where the checkpoint has "
                      f"{accumulate}: training continues from the same update, on other batches than the "
                      "uninterrupted run's")
        module.iteration = module.iteration // accumulate * module.optim.accumulate
    rng = checkpoint.get("dmd_rng")
    return rng if rng is not None and rng["noise"] is not None else None


def upgrade_hparams(hparams: dict, init_args) -> dict:
    """A checkpoint's hyper-parameters in today's DMDModule arguments: `compile` was a bool (with `compile_backend`)
    before it became a Compilation, `on_nonfinite` and `max_consecutive_skips` before NonFinite. `init_args`: the
    configured model's; a model whose `compile` is a bool (the teacher's) keeps its own."""
    hp = dict(hparams)
    if isinstance(hp.get("compile"), bool) and not isinstance(init_args.get("compile"), bool):
        backend = hp.pop("compile_backend", "inductor")
        hp["compile"] = {"backend": backend, "mode": None} if hp["compile"] else None
    if "on_nonfinite" in hp and "nonfinite" in init_args:
        hp["nonfinite"] = {"action": hp.pop("on_nonfinite"), "max_consecutive": hp.pop("max_consecutive_skips", 20),
                           "check": "update"}
    return hp


def restore_rng(module, rng: dict) -> None:
    """The RNG states load_state returned, set before the first training step after a resume (not when the
    checkpoint loads: the data loaders' set-up still draws numbers after that)."""
    set_rng_states(rng["global"])
    module.noise.load(rng["noise"], module.device)


def warm_start(module, path: str) -> None:
    """The generator, its EMA and the fake score of another run's checkpoint (a file or a sharded folder), nothing
    else of it (optimizers, schedules, GAN head and update count start afresh; the EMA continues without a warm-up):
    DMD2's second SD stage starts from the first's networks this way, adding the GAN at a lower learning rate."""
    state = {k: v for k, v in load_checkpoint_file(path).get("state_dict", {}).items() if k.startswith(TRAINED)}
    own, frozen = module.state_dict(), set(untrained_keys(module))
    missing = [k for k in own if k.startswith(TRAINED) and k not in state and k not in frozen]
    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or shapes or any(k not in own for k in state):
        raise CheckpointError(f"init_from {path}: its networks are not this model's (missing: {missing[:1]}, "
                              f"other shapes: {shapes[:1]}); use a checkpoint of the same teacher and generator")
    module.load_state_dict(state, strict=False)
