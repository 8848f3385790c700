"""Short CPU runs of every method whose per-step metrics and final weights pin the engine's behaviour.

``python -m tests.behaviour_runs NAME [--tiny-dir DIR]`` trains run ``NAME`` of :data:`RUNS` in this process (one
thread) and prints one JSON line: every numeric per-optimizer-step metric and a SHA-256 per tensor of the model's
final state (trainable adapters, snapshots, frozen base). ``tests/golden/behaviour.json`` holds what the engine gave
BEFORE the "one house" refactor (recorded at commit 0a28f68); ``tests/test_behaviour_unchanged.py`` checks that
today's engine reproduces it bit for bit (its ``nft`` entry re-recorded on 2026-12-03 for the official DiffusionNFT
std floor and timestep choice). Not a test module itself (spawned workers import it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: run name -> (recipe, overrides on top of tests.test_engine_helpers.tiny_overrides)
RUNS = {
    "crd": ("configs/testbed_crd.yaml", {}),
    "crd_stacked_adaptive": ("configs/testbed_crd.yaml", {"train.stack_timesteps": "true", "crd.rho": "advantage",
                                                          "crd.sampler_schedule": "0-0.5-0.0-0.5"}),
    "nft": ("configs/testbed_nft.yaml", {"nft.kl_beta": 0.01}),
    "fdfo": ("configs/testbed_fdfo.yaml", {"data.group_size": 2, "data.prompts_per_epoch": 4,
                                           "fdfo.num_steps": 3, "fdfo.micro_batch_items": 4,
                                           "fdfo.kl_lambda": 0.1, "train.gradient_steps_per_epoch": 2}),
    "didr": ("configs/testbed_didr.yaml", {"data.group_size": 2, "data.prompts_per_epoch": 4,
                                           "train.micro_batch_size": 2, "train.gradient_steps_per_epoch": 2,
                                           "train.lr": 1e-3, "didr.ta_lr": 1e-3, "didr.cfg_scale": 2.0,
                                           "didr.init_pairs": 8, "didr.init_regression_steps": 3,
                                           "didr.init_ode_steps": 2, "didr.init_batch_size": 4,
                                           "didr.init_ta_steps": 2, "didr.ta_steps": 2}),
    "didr_terminal": ("configs/testbed_didr.yaml", {"data.group_size": 2, "data.prompts_per_epoch": 4,
                                                    "train.micro_batch_size": 2, "train.gradient_steps_per_epoch": 2,
                                                    "train.lr": 1e-3, "didr.ta_lr": 1e-3, "didr.cfg_scale": 2.0,
                                                    "didr.reward_mode": "terminal", "didr.weighting": "dmd_x0",
                                                    "model.finetune": "full"}),
    # the tiny diffusers SD3 (VAE latents, three text encoders, LoRA), CRD with its CFG anchor
    "crd_sd3": ("configs/testbed_crd.yaml", {"model.family": "sd3", "model.random_init": "false",
                                             "model.resolution": 16, "train.epochs": 1}),
}
#: per-step keys that are not the method's arithmetic (none today; timings live in the epoch records)
SKIP = ()


def tensor_digest(t) -> str:
    import torch
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def run(name: str, tiny_dir: str | None) -> dict:
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    from tests.test_engine_helpers import register_test_rewards, tiny_overrides
    register_test_rewards()
    import engine.loop as loop
    from engine.config import load_config

    recipe, extra = RUNS[name]
    extra = dict(extra)
    if extra.get("model.family") == "sd3":
        if tiny_dir is None:
            from models.tiny import save_tiny_sd3
            tiny_dir = str(save_tiny_sd3(tempfile.mkdtemp(prefix="behaviour_sd3_")))
        extra["model.path"] = tiny_dir
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, name)
        captured = {}
        real_build = loop.build

        def build(cfg):  # keep the context: the final weights are hashed after the run
            ctx, start = real_build(cfg)
            captured["ctx"] = ctx
            return ctx, start

        loop.build = build
        try:
            loop.train(load_config(os.path.join(ROOT, recipe), tiny_overrides(out, **extra)))
        finally:
            loop.build = real_build
        steps = []
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                if rec["kind"] == "step":
                    steps.append({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in SKIP
                                  and k not in ("kind", "time")})
    flow = captured["ctx"].model
    flow = getattr(flow, "_model", flow)
    state = {k: tensor_digest(v) for k, v in flow.state_dict().items()}
    return {"steps": steps, "weights": state}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=sorted(RUNS))
    p.add_argument("--tiny-dir", default=None)
    a = p.parse_args(argv)
    print("BEHAVIOUR " + json.dumps(run(a.name, a.tiny_dir), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
