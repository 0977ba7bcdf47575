"""DMDModule: alternates generator and fake-score updates (DMD Algorithm 1; DMD2's two time-scale rule)."""

from __future__ import annotations

import copy
from dataclasses import asdict

import torch
from lightning import LightningModule
from torch import Tensor, nn

from dmd_lightning.checks import (
    check_data,
    check_dmd_arguments,
    check_per_step,
    check_regression,
    real_images,
    warn_error_gain,
)
from dmd_lightning.denoisers import Denoiser
from dmd_lightning.ema import EMA
from dmd_lightning.gan import BottleneckClassifier, GANLoss, gan_classifier_loss, gan_generator_loss
from dmd_lightning.generator import OneStepGenerator, sample
from dmd_lightning.images import log_grid
from dmd_lightning.losses import DenoisingLoss, DMLoss
from dmd_lightning.metrics.evaluation import Evaluator, Evaluators
from dmd_lightning.optim import Optimization
from dmd_lightning.perf import Compilation, sync_every
from dmd_lightning.rng import GlobalNoise, rank_world, repeated_batch, steps_seed
from dmd_lightning.state import load_state, restore_rng, save_state, warm_start
from dmd_lightning.update import GuardedUpdate, NonFinite


class DMDModule(LightningModule):
    """Distribution Matching Distillation with manual optimization.

    One iteration: on every `fake_updates_per_generator_update`-th, a generator update by `dm_loss` plus
    `regression_weight` x `regression_loss` on noise-image pairs (plus DMD2's GAN term with `gan`); then a
    fake-score update by `fake_loss` on the generator's detached samples (plus the GAN classifier's loss on real
    images). `global_step` (and `max_steps`) counts optimizer steps of both networks: 2 per iteration with a
    generator update, 1 without. With `optim.accumulate = N` an iteration takes N batches.

    The generator defaults to a copy of the teacher reading pure noise at t = T-1 (DMD Sec. 3.1; generator.py).
    With a K-step generator one fake score (DMD2) models the mixture of all K steps' outputs; `fake_score_per_step`
    keeps K copies instead, the k-th trained on step k's outputs and giving step k's DM gradient (and GAN features).
    `step_draw` says which step's outputs an update sees: "update", one step drawn per update for the whole batch
    (DMD2's backward simulation), or "sample", a step per sample, every global batch holding the K steps in equal
    shares (as the official DMD2 code's denoising path without backward simulation draws them, per sample).
    Its EMA (ema.py) warms up unless `ema_warmup=False`. Validation scores the EMA generator (`val/...`) and,
    with `validate_raw`, the raw one (`val/raw/...`). `nonfinite` guards each update (update.py).

    The losses' t and eps come from the module's own generator, drawn for the global batch of all ranks (and
    micro-batches), each keeping its part: a DDP run matches one process with the global batch, and N
    accumulated micro-batches one batch N times larger. That generator's state and the global RNG states are
    checkpointed, so a resumed run continues the same trajectory.
    """

    def __init__(
        self,
        teacher: Denoiser,
        generator: nn.Module | None = None,
        fake_score: Denoiser | None = None,
        dm_loss: DMLoss = DMLoss(),
        fake_loss: DenoisingLoss = DenoisingLoss(),
        regression_loss: nn.Module | None = None,
        regression_weight: float = 0.25,
        gan: GANLoss | None = None,
        optim: Optimization = Optimization(),
        fake_updates_per_generator_update: int = 1,
        fake_score_per_step: bool = False,
        step_draw: str = "update",
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        evaluator: Evaluator | None = None,
        validate_raw: bool = False,
        nonfinite: NonFinite = NonFinite(),
        compile: Compilation | None = None,
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher", "generator", "fake_score", "regression_loss", "evaluator"])
        configured = {"dm_loss": dm_loss, "fake_loss": fake_loss, "gan": gan, "optim": optim, "nonfinite": nonfinite,
                      "compile": compile}
        self.hparams.update({k: asdict(v) for k, v in configured.items() if v is not None})  # plain, safe to load
        check_dmd_arguments(self.hparams)
        self.dm_loss, self.fake_loss, self.gan, self.optim, self.compilation = dm_loss, fake_loss, gan, optim, compile
        self.automatic_optimization = False
        if fake_score is None and dm_loss.weight > 0:  # the fake score as DMD builds it: a fine-tuned teacher copy
            warn_error_gain(teacher.schedule, dm_loss.t_range)
        self.teacher = teacher.requires_grad_(False).eval()
        self.generator = generator if generator is not None else OneStepGenerator.from_teacher(teacher)
        check_regression(self.generator, regression_loss, regression_weight)
        fake = fake_score if fake_score is not None else copy.deepcopy(teacher).requires_grad_(True)
        steps = len(getattr(self.generator, "timesteps", ()))
        check_per_step(fake_score_per_step, steps, step_draw)
        if fake_score_per_step:  # a copy for each step
            fake = nn.ModuleList([fake] + [copy.deepcopy(fake) for _ in range(steps - 1)])
        self.fake_score = fake
        self.generator.train()  # copies of the (eval-mode) teacher: Lightning keeps submodules' modes
        self.fake_score.train()
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        # DMD2's GAN: a classifier head on the fake score's bottleneck, trained with the fake score (one head for all
        # of a per-step fake score's copies)
        self.classifier = BottleneckClassifier(self.fake_score_of(0)) if gan is not None else None
        self.regression_loss = regression_loss
        self.evaluators = Evaluators(evaluator, raw=validate_raw)
        self.iteration = 0  # training batches done; with accumulate and the ratio they give the update phase
        self.noise = GlobalNoise()  # the losses' t and eps
        self.updates = {name: GuardedUpdate(name, nonfinite) for name in ("generator", "fake_score")}
        self._micro = 0  # micro-batch of the update in progress
        self._restored: dict | None = None  # RNG states from a checkpoint, applied before the next step
        self.averager = EMA(self.generator_ema, self.generator, ema_decay, ema_warmup)

    # ----------------------------------------------------------------------------------------------- setup
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen networks stay in eval mode through Lightning's .train() calls
        self.generator_ema.eval()
        return self

    def configure_model(self) -> None:
        """`compile`: the networks (not this module) compiled in place (perf.Compilation); the GAN classifier's pass
        through the fake score's encoder half too."""
        if self.compilation is not None and not getattr(self, "_compiled", False):
            nets = (self.generator, *self.fake_scores, self.teacher, self.classifier)
            self.compilation.apply(net for net in nets if net is not None)
            self._compiled = True

    def setup(self, stage: str) -> None:
        check_data(self.teacher, getattr(self.trainer, "datamodule", None), gan=self.classifier is not None)
        if stage == "fit" and self.hparams.init_from:  # before Lightning restores a --ckpt_path, which wins
            warm_start(self, self.hparams.init_from)
            self.averager.reset()
            self.averager.warmup = False  # the loaded EMA is an average already: continued, not restarted

    def configure_optimizers(self):
        ratio = self.hparams.fake_updates_per_generator_update
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        return self.optim.build(self.generator, [self.fake_score, self.classifier], ratio, max_steps,
                                steps_per_update=1 + (ratio if self.trains_fake_score else 0))

    # -------------------------------------------------------------------------------------------- training
    @property
    def trains_fake_score(self) -> bool:
        """Whether the fake score (and the GAN classifier on it) has updates: when the DM loss reads it, and with a
        GAN whatever the DM loss does (DMD2's GAN-only ablation still trains both)."""
        return (self.dm_loss.use_fake_score and self.dm_loss.weight > 0) or self.gan is not None

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.compilation is not None:
            self.compilation.step_begin(self.device)
        opt_g, opt_f = self.optimizers()
        sch_g, sch_f = self.lr_schedulers()
        z, cond = batch["z"], batch.get("cond")
        update, self._micro = divmod(self.iteration, self.optim.accumulate)  # updates before, micro-batch of this
        generator_turn = update % self.hparams.fake_updates_per_generator_update == 0
        last = self._micro == self.optim.accumulate - 1
        if self.optim.accumulate > 1 and self._micro == 0:  # each micro-batch draws the whole update's numbers
            self.noise.mark()
        elif self.optim.accumulate > 1:  # and keeps its part
            self.noise.rewind()
        self.iteration += 1

        # No toggle_optimizer: each backward reaches one network by construction (the DM loss runs both denoisers
        # under no_grad, the GAN term the fake score and classifier with detached parameters, the fake score trains
        # on detached samples), and toggling walks every module.
        if generator_turn:
            x, step = self._generate(z, cond, update)
            fake = self.fake_score_of(step)
            terms, stats = {}, {}
            if self.dm_loss.weight > 0:
                t, eps = self._draw(x, self.teacher.schedule, self.dm_loss.t_range)
                terms["dm"], stats = self.dm_loss(x, self.teacher, fake, cond, t, eps)
            if self.regression_loss is not None and self.hparams.regression_weight > 0 and "pair_z" in batch:
                x_reg = self.generator(batch["pair_z"], batch.get("pair_cond"))
                terms["regression"] = self.regression_loss(x_reg, batch["pair_x"])
            if self.gan is not None:
                terms["gan"] = gan_generator_loss(self.classifier.input_gradient_only(fake, *self._noised(fake, x), cond))
            weights = {"dm": self.dm_loss.weight, "regression": self.hparams.regression_weight,
                       "gan": self.gan.generator_weight if self.gan else 0.0}
            self.updates["generator"].run(self, opt_g, sch_g, sum(weights[k] * v for k, v in terms.items()), terms, last,
                                          stats=stats)
            if last:  # after the generator's update, with the number of its updates before
                self.averager.update(update // self.hparams.fake_updates_per_generator_update)
            x = x.detach()
        elif self.trains_fake_score:
            with torch.no_grad():
                x, step = self._generate(z, cond, update)
            fake = self.fake_score_of(step)

        if self.trains_fake_score:
            t, eps = self._draw(x, fake.schedule, self.fake_loss.t_range)
            terms = {"denoising": self.fake_loss(fake, x, cond, t, eps)}
            if self.gan is not None:
                real = self.classifier(fake, *self._noised(fake, real_images(batch)), batch.get("real_cond"))
                terms["classifier"] = gan_classifier_loss(real, self.classifier(fake, *self._noised(fake, x), cond))
            loss = terms["denoising"] + (self.gan.classifier_weight * terms["classifier"] if self.gan else 0.0)
            self.updates["fake_score"].run(self, opt_f, sch_f, loss, terms, last)
        if self.logs_now:  # each network's latest update, which need not fall on this iteration
            self.log("train/iteration", float(self.iteration), on_step=True)
            for update in self.updates.values():
                update.flush(self)

    @property
    def logs_now(self) -> bool:
        """Lightning writes step metrics every `log_every_n_steps` only; the self.log calls in between cost
        time for nothing (about 12% of a small network's iteration), so they are skipped. With logging off (0) the
        non-finite guard still reports (check="logging") every 50 iterations."""
        return self._trainer is None or self.iteration % sync_every(self.trainer) == 0

    @property
    def mid_update(self) -> bool:
        """Whether accumulated gradients await the rest of an update's micro-batches (no checkpoint then)."""
        return self.iteration % self.optim.accumulate != 0

    @property
    def fake_scores(self) -> list[Denoiser]:
        return list(self.fake_score) if isinstance(self.fake_score, nn.ModuleList) else [self.fake_score]

    def fake_score_of(self, k: int) -> Denoiser:
        """The fake score for the generator's step k: the one, or with `fake_score_per_step` the k-th copy."""
        return self.fake_score[k] if isinstance(self.fake_score, nn.ModuleList) else self.fake_score

    def _generate(self, z: Tensor, cond, update: int) -> tuple[Tensor, int | Tensor]:
        """The generator's output at a random one of its K steps (drawn per update, or per sample with
        `step_draw="sample"`), whose input the generator itself made from z without gradient (DMD2's backward
        simulation), and the step(s); for K = 1 simply G(z), 0."""
        if not hasattr(self.generator, "simulate"):  # a generator of the user's own (e.g. the toy's MLP)
            return self.generator(z, cond), 0
        steps = len(self.generator.timesteps)
        k = self.noise.draw_index(steps, update) if steps > 1 else 0
        if steps > 1 and self.hparams.step_draw == "sample":  # sample i of the global batch: step (i + k) mod K
            rank, world = rank_world(self)
            part, n = self._micro * world + rank, z.shape[0]
            k = (torch.arange(part * n, (part + 1) * n) + k) % steps  # on the host: no device synchronisation
        sims = steps - 1 if torch.is_tensor(k) else k  # the same draws on every rank and micro-batch
        eps = [self._draw(z, self.teacher.schedule, (0, 1))[1] for _ in range(sims)]
        return self.generator.step(self.generator.simulate(z, k, cond, eps=eps), k, cond), k

    def _noised(self, fake: Denoiser, x0: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, t): x0 noised at a t of the fake score's range, where the GAN classifier reads it (DMD2 Sec. 4.3)."""
        t, eps = self._draw(x0, fake.schedule, self.fake_loss.t_range)
        return fake.schedule.add_noise(x0, eps, t), t

    def _draw(self, x: Tensor, schedule, t_range) -> tuple[Tensor, Tensor]:
        rank, world = rank_world(self)
        part, parts = self._micro * world + rank, self.optim.accumulate * world
        return self.noise.draw(x, schedule, tuple(t_range), part, parts)

    def on_train_start(self) -> None:
        self.averager.reset()  # a device move since the last fit replaces buffers

    def on_train_end(self) -> None:
        for update in self.updates.values():  # check="logging": skips since the last logging step
            update.report(self, "end of training", log=False)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._restored is not None:
            restore_rng(self, self._restored)
            self._restored = None

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def sample(self, z: Tensor, cond=None, ema: bool = True, seed: int = 0, index: int = 0) -> Tensor:
        """K network evaluations per sample (K = 1: one), by the EMA generator unless ema=False; the fresh noise
        between steps comes from item `index` of `seed`'s stream, so that validations and `dmd predict` repeat."""
        return sample(self.generator_ema if ema else self.generator, z, cond, seed, index)

    def on_validation_epoch_start(self) -> None:
        self.evaluators.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if repeated_batch(self, batch_idx):  # DistributedSampler's padding: scored on another rank already
            return
        for evaluator, ema in self.evaluators.active().values():
            samples = self.sample(batch["z"], batch.get("cond"), ema, *steps_seed(self, batch, batch_idx))
            evaluator.update(samples, batch)
            if batch_idx == 0 and not self.trainer.sanity_checking:  # fixed seeds and labels: the same images
                log_grid(self.logger, f"samples/{'ema' if ema else 'raw'}", samples[:64], self.global_step)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.evaluators.compute(), sync_dist=True)

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"x": self.sample(batch["z"], batch.get("cond"), True, *steps_seed(self, batch, batch_idx)), **batch}

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = load_state(self, checkpoint)  # applied before the next training step
