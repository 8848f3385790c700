"""DIDR's generator initialisation (``didr.init_*``): a DMD-style regression warm start, then a fake-score warm-up.

Once per fresh run, before the first DIDR iteration: ``init_regression_steps`` AdamW steps (own optimizer,
``init_lr``) of ``mean_pix (g(z, c) - x_ref(z, c))^2`` on ``init_pairs`` (noise, reference CFG ODE sample) pairs, then
``init_ta_steps`` updates of the fake score (DIDR's TA optimizer) on the initialised generator's samples.
"""
from __future__ import annotations

import torch

from engine.methods.didr.core import DIDR
from engine.methods.didr.math import adapter_params
from engine.nvtx_ranges import nvtx_range
from engine.stepper import TorchStepper
from engine.streams import DIDR_INIT_EPOCH, Stream
from models.base import Cond


class WarmStart:
    """The warm start of one run: its (noise, target) pairs, made on first use and released after."""

    def __init__(self, opt) -> None:
        self.opt = opt
        self.done = False
        self._pairs: tuple[torch.Tensor, Cond, torch.Tensor | None] | None = None  # this rank's pairs

    def regression_pairs(self, ctx, core: DIDR) -> tuple[torch.Tensor, Cond, torch.Tensor | None]:
        """This rank's share (pairs rank, rank + world, ...) of ``init_pairs`` (noise z, reference ODE sample from z,
        None without regression steps) on the training prompts (seeded permutations, so every prompt is used about
        equally), made once per warm start."""
        if self._pairs is None:
            from engine.rollout import sample_noise

            o, cfg, dist = self.opt, ctx.cfg, ctx.dist
            n, p = o.init_pairs, len(ctx.prompts)
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.cat([torch.randperm(p, generator=g) for _ in range(-(-n // p))])[:n]
            idx = torch.arange(dist.rank, n, dist.world_size)
            prompts, _ = ctx.prompts.select(order[idx].tolist())
            shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
            z = sample_noise(idx, shape, seed=cfg.seed, epoch=DIDR_INIT_EPOCH, stream=Stream.DIDR_INIT,
                             device=dist.device)
            cond = core.generator.encode(prompts).to(dist.device)
            bs = max(1, cfg.rollout.batch_size)
            x = None  # the ODE targets only when the regression runs (the fake-score warm-up needs z and c only)
            if o.init_regression_steps:
                x = torch.cat([core.reference_sample(z[a:a + bs], cond.index(slice(a, a + bs)), o.init_ode_steps)
                               for a in range(0, z.shape[0], bs)]) if z.shape[0] else z.float()
            self._pairs = (z, cond, x)
        return self._pairs

    def pair_batch(self, ctx, core: DIDR, gen: torch.Generator) -> tuple[torch.Tensor, Cond, torch.Tensor | None]:
        """A random batch of this rank's pairs (``init_batch_size`` over all ranks)."""
        z, cond, x = self.regression_pairs(ctx, core)
        k = -(-self.opt.init_batch_size // ctx.dist.world_size)
        sel = torch.randint(z.shape[0], (k,), generator=gen)
        return z[sel], cond.index(sel.to(z.device)), None if x is None else x[sel]

    def run(self, ctx, core: DIDR, ta_stepper: TorchStepper) -> None:
        """The initialisation of a fresh run (a resumed run has it in its weights), once, before the first DIDR
        iteration: ``init_regression_steps`` AdamW steps (own optimizer, ``init_lr``) of the regression loss, then
        ``init_ta_steps`` updates of the fake score (the TA optimizer) on the initialised generator's samples.
        Logs one ``didr_init`` record."""
        import time

        if self.done:
            return
        self.done = True
        o, t, dist = self.opt, ctx.cfg.train, ctx.dist
        if (o.init_regression_steps == 0 and o.init_ta_steps == 0) or ctx.global_step > 0:
            return
        t0 = time.time()
        self.regression_pairs(ctx, core)
        record = {"init/pairs": o.init_pairs, "init/steps": o.init_regression_steps,
                  "init/ta_steps": o.init_ta_steps, "init/pairs_s": time.time() - t0}
        gen = torch.Generator().manual_seed(ctx.cfg.seed * 65537 + dist.rank)
        mb = max(1, ctx.layout.micro_batch_size)
        stepper = TorchStepper(adapter_params(core.generator, "policy"), lr=o.init_lr or t.lr,
                               weight_decay=t.weight_decay, betas=t.betas, grad_clip=t.grad_clip,
                               average_over=dist if dist.world_size > 1 else None)

        def loss_of(z, cond, x, sl):
            return core.regression_loss(z[sl], cond.index(sl), x[sl])[0]

        def ta_loss_of(z, cond, x, sl):  # sigma/eps drawn on the CPU generator: the same on any device
            sigma, eps = core.draw(sl.stop - sl.start, z[sl].cpu(), gen)
            return core.ta_loss(z[sl], cond.index(sl), sigma=sigma.to(z.device), eps=eps.to(z.device))[0]

        for name, steps, opt, fn in (("reg_loss", o.init_regression_steps, stepper, loss_of),
                                     ("ta_loss", o.init_ta_steps, ta_stepper, ta_loss_of)):
            losses = []
            for _ in range(steps):
                z, cond, x = self.pair_batch(ctx, core, gen)
                chunks = [slice(a, min(a + mb, z.shape[0])) for a in range(0, z.shape[0], mb)]
                total = 0.0
                for j, sl in enumerate(chunks):
                    with nvtx_range(f"train/init_{name}"):
                        loss = fn(z, cond, x, sl)
                    opt.backward(loss * ((sl.stop - sl.start) / z.shape[0]), last=j == len(chunks) - 1)
                    total = total + loss.detach() * ((sl.stop - sl.start) / z.shape[0])
                losses.append(total)
            if losses:
                losses = torch.stack(losses).float().cpu()
                tail = max(1, len(losses) // 10)
                record[f"init/{name}_first"] = float(losses[:tail].mean())
                record[f"init/{name}_last"] = float(losses[-tail:].mean())
        self._pairs = None  # used once: the noises, prompt embeddings and targets need not stay on the device
        record["init/seconds"] = time.time() - t0
        ctx.logger.log(0, record, kind="didr_init")

