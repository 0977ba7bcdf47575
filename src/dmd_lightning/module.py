"""DMDModule: alternates generator and fake-score updates (DMD Algorithm 1; DMD2's two time-scale rule)."""

from __future__ import annotations

import copy

import torch
from lightning import LightningModule
from torch import Tensor, nn

from dmd_lightning.checks import (
    NonFinitePolicy,
    check_dmd_arguments,
    check_labels,
    check_same_model,
    check_sample_shape,
    is_finite_module,
    warn_error_gain,
)
from dmd_lightning.denoisers import Denoiser
from dmd_lightning.ema import ema_tensors, ema_update, warmup_decay
from dmd_lightning.errors import CheckpointError, ConfigError, NonFiniteError
from dmd_lightning.gan import BottleneckClassifier, gan_classifier_loss, gan_generator_loss
from dmd_lightning.generator import OneStepGenerator
from dmd_lightning.losses import denoising_loss, distribution_matching_loss
from dmd_lightning.metrics.evaluation import Evaluator, Evaluators
from dmd_lightning.optim import adamw_with_schedule
from dmd_lightning.rng import GlobalNoise, rng_states, set_rng_states


class DMDModule(LightningModule):
    """Distribution Matching Distillation with manual optimization.

    One iteration: on every `fake_updates_per_generator_update`-th, a generator update by the DM loss plus
    `regression_weight` x the regression loss on noise-image pairs; then a fake-score update by the denoising
    loss on the generator's detached samples at t ~ U[fake_t_range * T]. `global_step` (and `max_steps`) counts
    optimizer steps of both networks: 2 per iteration with a generator update, 1 without.

    The generator is a copy of the teacher reading pure noise at t = T-1 (DMD Sec. 3.1), which needs a teacher
    whose x0-prediction is well conditioned there (v-prediction on a zero-terminal-SNR schedule; docs/teacher.md).
    Its EMA warms up (update n uses min(ema_decay, (1 + n) / (10 + n))) unless `ema_warmup=False`. Each lr warms
    up over `warmup_steps` updates, then stays or (`lr_decay="cosine"`) decays to `min_lr_ratio` x lr by
    `decay_steps` generator updates (default: from max_steps). Validation scores the EMA generator (`val/...`)
    and, with `validate_raw`, the raw one (`val/raw/...`).

    A non-finite loss or gradient skips the update (`on_nonfinite="skip"`) or stops (`"stop"`); after
    `max_consecutive_skips` skips in a row training stops. Ablations (paper Table 2): `dm_weight=0` is
    regression only, `use_fake_score=False` the real score alone, `regression_loss=None` DMD without regression.

    The losses' t and eps come from the module's own generator, drawn for the global batch of all ranks, each
    rank using its slice: a DDP run matches one process with the global batch. That generator's state and the
    global RNG states are checkpointed, so a resumed run continues the same trajectory.
    """

    def __init__(
        self,
        teacher: Denoiser,
        generator: nn.Module | None = None,
        fake_score: Denoiser | None = None,
        regression_loss: nn.Module | None = None,
        evaluator: Evaluator | None = None,
        guidance_scale: float = 1.0,
        regression_weight: float = 0.25,
        dm_weight: float = 1.0,
        use_fake_score: bool = True,
        fake_updates_per_generator_update: int = 1,
        t_range: tuple[float, float] = (0.02, 0.98),
        fake_t_range: tuple[float, float] = (0.0, 1.0),
        generator_lr: float = 1e-5,
        fake_lr: float = 1e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        lr_decay: str = "constant",
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        gradient_clip: float = 10.0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        on_nonfinite: str = "skip",
        max_consecutive_skips: int = 20,
        validate_raw: bool = False,
        gan_generator_weight: float = 0.0,
        gan_classifier_weight: float = 0.0,
        compile: bool = False,
        compile_backend: str = "inductor",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher", "generator", "fake_score", "regression_loss", "evaluator"])
        check_dmd_arguments(self.hparams)
        self.automatic_optimization = False
        if fake_score is None and dm_weight > 0:  # the fake score as DMD builds it: a fine-tuned teacher copy
            warn_error_gain(teacher.schedule, t_range)
        self.teacher = teacher.requires_grad_(False).eval()
        self.generator = generator if generator is not None else OneStepGenerator.from_teacher(teacher)
        if len(getattr(self.generator, "timesteps", (0,))) > 1 and regression_loss is not None and regression_weight > 0:
            raise ConfigError("the regression loss needs a one-step generator (its pairs map noise to a sample); "
                              "set regression_loss: null for a multi-step generator")
        self.fake_score = fake_score if fake_score is not None else copy.deepcopy(teacher).requires_grad_(True)
        self.generator.train()  # copies of the (eval-mode) teacher: Lightning keeps submodules' modes
        self.fake_score.train()
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        # DMD2's GAN: a classifier head on the fake score's bottleneck, trained with the fake score
        gan = gan_generator_weight > 0 or gan_classifier_weight > 0
        self.classifier = BottleneckClassifier(self.fake_score) if gan else None
        self.regression_loss = regression_loss
        self.evaluators = Evaluators(evaluator, raw=validate_raw)
        self.iteration = 0  # training iterations done; with the ratio it gives the update phase
        self.noise = GlobalNoise()  # the losses' t and eps
        self.nonfinite = NonFinitePolicy(on_nonfinite, max_consecutive_skips)
        self._restored: dict | None = None  # RNG states from a checkpoint, applied before the next step
        self._ema_tensors: tuple | None = None

    # ----------------------------------------------------------------------------------------------- setup
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen networks stay in eval mode through Lightning's .train() calls
        self.generator_ema.eval()
        return self

    def configure_model(self) -> None:
        """`compile`: the generator's, fake score's and teacher's networks (not this module) compiled in place with
        torch.compile, parameters and state-dict keys unchanged; `compile_backend` "aot_eager" captures the graphs
        without generating code (tests). Nothing flips requires_grad between the phases, so no recompiles."""
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for net in (self.generator, self.fake_score, self.teacher):
                getattr(net, "unet", net).compile(backend=self.hparams.compile_backend)
            self._compiled = True

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        shape = getattr(datamodule, "sample_shape", None)
        if shape is not None:
            check_sample_shape(self.teacher, tuple(shape))
        check_labels(self.teacher, getattr(datamodule, "num_classes", None))
        if self.classifier is not None and datamodule is not None and getattr(datamodule, "real", None) is None:
            raise ConfigError("gan_generator_weight / gan_classifier_weight > 0 need real images: set the data "
                              "module's real_images (e.g. dmd_lightning.fmnist.data.FashionMNISTImages)")

    def configure_optimizers(self):
        hp, total = self.hparams, self._decay_steps()
        # each warms up over its own first updates; the fake score's decay follows the generator's phase
        ratio = hp.fake_updates_per_generator_update
        opt_g, sch_g = adamw_with_schedule(self.generator.parameters(), hp.generator_lr, tuple(hp.betas),
                                           hp.weight_decay, hp.warmup_steps, total, hp.min_lr_ratio)
        fake_params = [*self.fake_score.parameters(), *(self.classifier.parameters() if self.classifier else [])]
        opt_f, sch_f = adamw_with_schedule(fake_params, hp.fake_lr, tuple(hp.betas), hp.weight_decay,
                                           hp.warmup_steps, total and total * ratio, hp.min_lr_ratio)
        return [opt_g, opt_f], [sch_g, sch_f]

    def _decay_steps(self) -> int | None:
        """Generator updates over which a cosine lr decays: `decay_steps`, else the trainer's max_steps (which
        counts both networks' optimizer steps: 1 + ratio per generator update, 1 without a fake score)."""
        hp = self.hparams
        if hp.lr_decay == "constant":
            return None
        if hp.decay_steps is not None:
            return hp.decay_steps
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps <= 0:
            raise ConfigError("lr_decay='cosine' needs decay_steps or the trainer's max_steps")
        per_update = 1 + (hp.fake_updates_per_generator_update if self.trains_fake_score else 0)
        return max(1, max_steps // per_update)

    # -------------------------------------------------------------------------------------------- training
    @property
    def trains_fake_score(self) -> bool:
        return self.hparams.use_fake_score and self.hparams.dm_weight > 0

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        opt_g, opt_f = self.optimizers()
        sch_g, sch_f = self.lr_schedulers()
        z, cond = batch["z"], batch.get("cond")
        generator_turn = self.iteration % hp.fake_updates_per_generator_update == 0
        self.iteration += 1

        # No toggle_optimizer: each backward reaches one network by construction (the DM loss runs both denoisers
        # under no_grad, the GAN term the fake score and classifier with detached parameters, the fake score trains
        # on detached samples), and toggling walks every module.
        if generator_turn:
            x = self._generate(z, cond)
            terms = {}
            if hp.dm_weight > 0:
                fake = self.fake_score if hp.use_fake_score else None
                t, eps = self._draw(x, self.teacher.schedule, hp.t_range)
                terms["dm"], stats = distribution_matching_loss(
                    x, self.teacher, fake, cond, hp.guidance_scale, t=t, eps=eps
                )
                if self._logs_now:
                    self.log_dict(stats, on_step=True)
            if self.regression_loss is not None and hp.regression_weight > 0 and "pair_z" in batch:
                x_reg = self.generator(batch["pair_z"], batch.get("pair_cond"))
                terms["regression"] = self.regression_loss(x_reg, batch["pair_x"])
            if hp.gan_generator_weight > 0:
                terms["gan"] = gan_generator_loss(self._logits(x, cond, frozen=True))
            weights = {"dm": hp.dm_weight, "regression": hp.regression_weight, "gan": hp.gan_generator_weight}
            loss = sum(weights[k] * v for k, v in terms.items())
            self._step(opt_g, sch_g, self.generator, loss, terms, "generator")
            if self._ema_tensors is None:  # cached: the module walks cost more than a small network's update
                self._ema_tensors = ema_tensors(self.generator_ema, self.generator)
            updates = (self.iteration - 1) // hp.fake_updates_per_generator_update  # generator updates before this
            ema_update(self._ema_tensors, warmup_decay(hp.ema_decay, updates) if hp.ema_warmup else hp.ema_decay)
            x = x.detach()
        elif self.trains_fake_score:
            with torch.no_grad():
                x = self._generate(z, cond)

        if self.trains_fake_score:
            t, eps = self._draw(x, self.fake_score.schedule, hp.fake_t_range)
            terms = {"denoising": denoising_loss(self.fake_score, x, cond, t, eps)}
            if hp.gan_classifier_weight > 0 and "real_x" in batch:
                terms["classifier"] = gan_classifier_loss(self._logits(batch["real_x"], batch.get("real_cond")),
                                                          self._logits(x, cond))
            loss_f = terms["denoising"] + hp.gan_classifier_weight * terms.get("classifier", 0.0)
            self._step(opt_f, sch_f, self.fake_score, loss_f, terms, "fake_score")
        if self._logs_now:
            self.log("train/iteration", float(self.iteration), on_step=True)

    @property
    def _logs_now(self) -> bool:
        """Lightning writes step metrics every `log_every_n_steps` only; the self.log calls in between cost
        time for nothing (about 12% of a small network's iteration), so they are skipped."""
        return self._trainer is None or self.iteration % self.trainer.log_every_n_steps == 0

    def _generate(self, z: Tensor, cond) -> Tensor:
        """The generator's output at a random one of its K steps, whose input the generator itself made from z
        without gradient (DMD2's backward simulation); for K = 1 simply G(z)."""
        if not hasattr(self.generator, "simulate"):  # a generator of the user's own (e.g. the toy's MLP)
            return self.generator(z, cond)
        steps = len(self.generator.timesteps)
        k = self.noise.draw_index(steps, z.device) if steps > 1 else 0
        eps = [self._draw(z, self.teacher.schedule, (0, 1))[1] for _ in range(k)]
        return self.generator.step(self.generator.simulate(z, k, cond, eps=eps), k, cond)

    def _logits(self, x0: Tensor, cond, frozen: bool = False) -> Tensor:
        """The GAN classifier's logits for x0 noised at t ~ U[fake_t_range * T] (DMD2 Sec. 4.3); frozen: the
        gradient reaches x0 only (the generator's term)."""
        t, eps = self._draw(x0, self.fake_score.schedule, self.hparams.fake_t_range)
        return self.classifier(self.fake_score, self.fake_score.schedule.add_noise(x0, eps, t), t, cond, frozen)

    def _draw(self, x: Tensor, schedule, t_range) -> tuple[Tensor, Tensor]:
        rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        return self.noise.draw(x, schedule, tuple(t_range), rank, world)

    def on_train_start(self) -> None:
        self._ema_tensors = None  # a device move since the last fit replaces buffers

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._restored is not None:  # here, not in on_load_checkpoint: loader set-up still draws numbers
            set_rng_states(self._restored["global"])
            self.noise.load(self._restored["noise"], self.device)
            self._restored = None

    def _step(self, opt, sched, net: nn.Module, loss: Tensor, terms: dict, name: str) -> None:
        """Backward, clip, check for non-finite values, step. Logs every term and the gradient norm."""
        self.manual_backward(loss)
        # the optimizer's own list: walking the network's modules costs more than a small network's update
        params = [p for group in opt.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.gradient_clip)
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        if not torch.isfinite(grad_norm):
            bad.append("gradient")
        # every rank must take the same decision, or the replicas drift apart
        if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False) and not bad:
            bad.append("loss or gradient on another rank")
        if self._logs_now:
            for k, v in terms.items():
                self.log(f"{name}/loss_{k}", v, on_step=True, prog_bar=True)
            self.log(f"{name}/grad_norm", grad_norm, on_step=True)
            self.log(f"{name}/lr", sched.get_last_lr()[0], on_step=True)
        where = f"{name} update at iteration {self.iteration} (global step {self.global_step})"
        if self.nonfinite.skip(bad, where, net, name):
            self.print(f"warning: non-finite {', '.join(bad)} in the {where}; update skipped")
            self.log(f"{name}/skipped", 1.0, on_step=True)
        else:
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def sample(self, z: Tensor, cond=None, ema: bool = True, seed: int = 0) -> Tensor:
        """K network evaluations per sample (K = 1: one), by the EMA generator unless ema=False; the fresh noise
        between steps comes from `seed`, so that validations and `dmd predict` are repeatable."""
        net = self.generator_ema if ema else self.generator
        if not hasattr(net, "simulate"):
            return net(z, cond)
        return net(z, cond, torch.Generator(device=z.device).manual_seed(seed))

    def on_validation_epoch_start(self) -> None:
        self.evaluators.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for evaluator, ema in self.evaluators.active().values():
            samples = self.sample(batch["z"], batch.get("cond"), ema=ema, seed=batch_idx)
            evaluator.update(samples, batch)
            if batch_idx == 0 and not self.trainer.sanity_checking:
                log_grid(self.logger, f"samples/{'ema' if ema else 'raw'}", samples[:64], self.global_step)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.evaluators.compute(), sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"x": self.sample(batch["z"], batch.get("cond"), seed=batch_idx), **batch}

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for name in ("generator", "fake_score", "generator_ema"):
            if not is_finite_module(getattr(self, name)):
                raise NonFiniteError(f"{name} has non-finite weights at iteration {self.iteration}; not saving")
        state = checkpoint["state_dict"]
        for k in [k for k in state if k.startswith(FROZEN)]:
            del state[k]
        checkpoint["dmd_iteration"] = self.iteration
        checkpoint["dmd_rng"] = {"global": rng_states(), "noise": self.noise.state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError("the checkpoint holds no 'state_dict': pass a checkpoint written by `dmd fit`")
        check_same_model(self.state_dict(), self.fill_frozen(checkpoint["state_dict"]))
        self.iteration = int(checkpoint.get("dmd_iteration", 0))
        rng = checkpoint.get("dmd_rng")
        self._restored = rng if rng is not None and rng["noise"] is not None else None

    def fill_frozen(self, state: dict) -> dict:
        """Complete a checkpoint's state dict with the frozen networks' weights as this module holds them
        (loaded from their own files). Checkpoints leave them out: at SD1.5 scale the teacher alone is 3.4 GB.
        Older checkpoints that hold them keep their own."""
        for prefix in FROZEN:
            net = getattr(self, prefix.rstrip("."), None)
            if isinstance(net, nn.Module):
                for k, v in net.state_dict(prefix=prefix).items():
                    state.setdefault(k, v)
        return state


def log_grid(logger, tag: str, images: Tensor, step: int) -> None:
    """The first validation batch's samples (fixed seeds and labels, so the same images at every validation) as
    one grid image in TensorBoard; pixel-space images in [-1, 1] with 1 or 3 channels only (not latents)."""
    experiment = getattr(logger, "experiment", None)
    if not hasattr(experiment, "add_image") or images.dim() != 4 or images.shape[1] not in (1, 3):
        return
    from torchvision.utils import make_grid

    grid = make_grid(((images.float() + 1) / 2).clamp(0, 1).cpu(), nrow=8, padding=2, pad_value=1.0)
    experiment.add_image(tag, grid, step)


# state-dict prefixes of the networks that never train: left out of checkpoints
FROZEN = ("teacher.", "regression_loss.", "evaluators.")
