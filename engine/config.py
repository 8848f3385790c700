"""Typed configuration: the schema (dataclass sections), YAML recipes, dotted ``key=value`` overrides, validation.

A run's config is one :class:`Config`. It is built from (in order) the dataclass defaults, a YAML recipe, then
command-line overrides such as ``train.micro_batch_size=4`` or ``crd.kl_beta=0``. The options of the chosen method
live in a section named after it (``crd:``, ``nft:``, ...) whose dataclass the method registers
(``engine.methods.Method.Config``); ``Config.algo`` holds that section's instance.

Every value is type-checked against its field annotation; any problem raises :class:`ConfigError` with one sentence
naming the key (``train.py`` prints it and exits with code 2).

Every option is declared with :func:`engine.options.opt` (default + help line), so ``--help`` describes all of them;
the type checking and recipe/override reading are :mod:`engine.options` (schema-agnostic); the batch arithmetic
(per-rank sizes, accumulation, micro-batch layout) is :mod:`engine.batch`. This module is the schema, the loader and
the value checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError  # noqa: F401  (re-exported: the error type of every config problem)
from engine.options import build_dataclass, help_lines as option_help_lines, opt, parse_override, read_yaml, set_path
from engine.options import to_dict  # noqa: F401  (re-exported: engine.loop/context/runlog write configs back)
from engine.registry import import_path, is_import_path
from engine.rewards.registry import RewardSpec


# ---------------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    family: str = opt("testbed", "model family (models.FAMILIES): testbed | sd3 | flux | onestep (SD/SDXL-Turbo-style "
                                  "UNet), or a 'module:Class' path to your own FlowModel subclass")
    path: str = opt("checkpoints/testbed/base", "local diffusers-style model directory")
    random_init: bool = opt(False, "testbed only: build a random-init model from `size` instead of loading `path`")
    size: dict = opt({}, "family settings: testbed: TestbedConfig overrides for random_init (e.g. {num_layers: 1}); "
                         "gmm: models.gmm.GMMSettings (world, dim, teacher, ...)")
    finetune: str = opt("lora", "lora | full (full fine-tuning keeps policy/old/sampler copies + frozen pretrained)")
    lora_rank: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(0.0, "LoRA alpha (0 = rank, i.e. scale 1)")
    lora_targets: list = opt([], "LoRA target module names ([] = the model family's default attention projections)")
    resolution: int = opt(32, "image height = width in pixels")
    dtype: str = opt("fp32", "weights dtype of the frozen network: fp32 | bf16")


@dataclass
class DataConfig:
    train_prompts: str = opt("data/testbed/train.jsonl", "training prompts (.txt / .jsonl / GenEval metadata)")
    test_prompts: str = opt("data/testbed/test.jsonl", "held-out prompts for eval ('' = none)")
    kind: str = opt("", "prompt file kind: '' (auto) | plain | ocr | geneval")
    prompts_per_epoch: int = opt(8, "P: prompts drawn per epoch (all ranks together)")
    group_size: int = opt(8, "G: samples per prompt (a group)")
    balance_tags: bool = opt(False, "draw each epoch's prompts evenly over the GenEval tags (families) of the metadata "
                             "instead of uniformly over prompts")


@dataclass
class RolloutConfig:
    num_steps: int = opt(10, "N: deterministic Euler ODE steps of the rollout")
    batch_size: int = opt(16, "per-rank rollout batch (samples per sampler call)")


@dataclass
class TrainConfig:
    epochs: int = opt(40, "number of epochs (rollout + updates)")
    micro_batch_size: int = opt(8, "samples per rank per micro-step (one timestep)")
    gradient_steps_per_epoch: int = opt(2, "optimizer steps per epoch")
    num_timesteps: int = opt(0, "K training timesteps per sample (0 = all eligible sigmas)")
    timestep_fraction: float = opt(0.99, "train on the noisiest int(N * fraction) sampler sigmas (NFT's default "
                                         "nft.timestep_choice=official: K = int(N * fraction) of ALL N sigmas)")
    timestep_sharing: str = opt("sample", "CRD/NFT: who shares the K training sigmas: sample (independent draws per "
                                          "sample) | group (every member of a prompt group, drawn by the group id) | "
                                          "micro_batch (every sample of one GLOBAL micro-batch, all ranks, drawn by "
                                          "its number s*a+j in the epoch: the CRD first author's trainer)")
    timestep_sampling: str = opt("discrete", "CRD/NFT: training sigma values: discrete (entries of the sampler's "
                                             "sigma table) | uniform (sigma ~ U(sigma_min, sigma_max)) | "
                                             "logit_normal (sigmoid(N(mean, std)) clamped to [sigma_min, "
                                             "sigma_max]); sigma_min/sigma_max: the smallest/largest eligible "
                                             "table sigma (never 0)")
    logit_normal: list[float] = opt([0.0, 1.0], "[mean, std] of train.timestep_sampling=logit_normal (std > 0)")
    lr: float = opt(3e-4, "AdamW learning rate")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "gradient-norm clip (0 = off)")
    warmup_steps: int = opt(0, "linear LR warm-up over this many optimizer steps")
    dtype: str = opt("fp32", "training precision: fp32 | bf16")
    max_bad_reward_fraction: float = opt(0.25, "abort when more than this fraction of an epoch's samples have "
                                                "a NaN/failed reward (those groups are dropped below it)")
    kernel_backend: str = opt("auto", "loss kernels of every method (CRD/NFT/FDFO): auto (fused Triton on CUDA, or "
                                      "on CPU under TRITON_INTERPRET=1; torch otherwise) | torch (the reference) | "
                                      "triton")
    stack_timesteps: bool = opt(False, "CRD/NFT: run a micro-batch's K timesteps as ONE stacked policy forward/"
                                       "backward (and one anchor pass, one snapshot pass): fewer, larger GEMMs, same "
                                       "gradient, K-fold activation memory (off by default: 3-6% slower on CPU, "
                                       "benchmarks/README.md; try it on GPUs with small micro-batches)")
    compile: bool = opt(False, "torch.compile the model's network (every adapter; recompiles only in the first epoch)")
    overlap_rewards: bool = opt(True, "score each rollout chunk (rollout.batch_size) in a background thread while "
                                      "the next is sampled (same rewards as scoring after, for per-image rewards)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = opt(0, "ZeRO stage 0 | 1 | 2 | 3")
    optimizer: str = opt("torch", "torch (torch.optim.AdamW) | deepspeed (FusedAdam / DeepSpeedCPUAdam)")
    offload_optimizer: bool = opt(False, "ZeRO-1/2/3: keep optimizer state on the CPU (needs optimizer=deepspeed)")
    offload_params: bool = opt(False, "ZeRO-3: keep parameters on the CPU")
    param_persistence_threshold: int = opt(100000, "ZeRO-3: parameters this small stay unpartitioned")
    reduce_bucket_size: int = opt(50_000_000, "ZeRO gradient reduce bucket (elements)")
    backend: str = opt("auto", "collective backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo")


@dataclass
class DistributedConfig:
    timeout_s: float = opt(600.0, "seconds a collective may wait for a peer before it fails (the process-group "
                                  "timeout); a rank whose heartbeat has been silent for half of it (stopped, frozen "
                                  "or killed) is named in one line and the run exits with code 1 "
                                  "(engine.distributed.Heartbeat)")


@dataclass
class LogConfig:
    tensorboard: bool = opt(True, "write TensorBoard event files")
    wandb: bool = opt(False, "log to Weights & Biases when installed")
    wandb_project: str = opt("rlflow", "W&B project")
    grid_every: int = opt(10, "save a PNG sample grid every this many epochs (0 = never)")
    progress: bool = opt(True, "progress bar on rank 0")


@dataclass
class CheckpointConfig:
    every: int = opt(10, "checkpoint every this many epochs (0 = only at the end)")
    keep: int = opt(3, "keep the last K checkpoints")
    resume: str = opt("", "'' (fresh) | auto (latest in output_dir/checkpoints) | a checkpoint path")
    at_end: bool = opt(True, "checkpoint after the last epoch")


@dataclass
class EvalConfig:
    every: int = opt(0, "evaluate on test prompts every this many epochs (0 = only before/after)")
    num_prompts: int = opt(32, "held-out prompts per evaluation (0 = no eval)")
    adapter: str = opt("policy", "weights to evaluate: policy | ema")
    after_training: str = opt("", "'module:callable' that train.py calls as fn(cfg) after the last epoch when "
                                  "checkpoint.at_end (the testbed recipes: engine.testbed.eval:before_after, the "
                                  "before/after table on the held-out prompts); '' = none")


@dataclass
class Config:
    method: str = opt("crd", "method registry name: crd | nft | ...")
    output_dir: str = opt("runs/{method}", "run directory (logs, grids, checkpoints); {method} is substituted")
    seed: int = opt(0, "seed of every random draw (prompts, noise, timesteps)")
    model: ModelConfig = opt(ModelConfig(), "the model family, weights and adapters")
    data: DataConfig = opt(DataConfig(), "prompts and groups")
    rollout: RolloutConfig = opt(RolloutConfig(), "the sampler")
    train: TrainConfig = opt(TrainConfig(), "the optimisation")
    deepspeed: DeepSpeedConfig = opt(DeepSpeedConfig(), "ZeRO and collectives")
    distributed: DistributedConfig = opt(DistributedConfig(), "process-group timeout and the stalled-rank watchdog")
    rewards: list[RewardSpec] = opt([RewardSpec()], "reward specs [{name, weight, backend, kwargs}]")
    log: LogConfig = opt(LogConfig(), "logging")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "checkpoints and resume")
    eval: EvalConfig = opt(EvalConfig(), "held-out evaluation")
    #: the method's options (YAML section named after the method); set by load_config
    algo: Any = field(default=None, metadata={"help": "(the method's section)", "internal": True})

    @property
    def run_dir(self) -> str:
        # a plug-in method "pkg.mod:MyMethod" names its run folder by the class ("runs/MyMethod")
        return self.output_dir.replace("{method}", self.method.rpartition(":")[2])


def load_config(path: str | None = None, overrides: list[str] = (), method: str | None = None,
                method_configs: dict[str, type] | None = None) -> Config:
    """Defaults <- YAML ``path`` <- ``overrides``; ``method`` (the CLI's ``--method``) wins over the YAML's.

    ``method_configs`` maps method names to their option dataclasses (default: the method registry, plus the chosen
    method when it is a ``module:Class`` plug-in; its section is the class's ``name``). Every method section present
    in the YAML is type-checked; ``Config.algo`` is the chosen method's.
    """
    tree = read_yaml(path) if path else {}
    for ov in overrides:
        k, v = parse_override(ov)
        set_path(tree, k, v)
    if method is not None:  # the command line names the method (a recipe written for another one still loads)
        tree["method"] = method
    chosen = tree.get("method", Config.method if isinstance(Config.method, str) else "crd")
    if not isinstance(chosen, str):
        raise ConfigError(f"config key 'method' must be a method name or a 'module:Class' path, got {chosen!r}")
    if method_configs is None:
        from engine.methods import method_configs as registry_configs, section_name
        method_configs, section = registry_configs(chosen), section_name(chosen)
    else:
        section = chosen
    if section not in method_configs:
        raise ConfigError(f"unknown method {chosen!r}; registered methods: {', '.join(sorted(method_configs))}")
    sections = {name: tree.pop(name) for name in list(tree) if name in method_configs}
    for name, sec in sections.items():
        if sec is not None and not isinstance(sec, dict):
            raise ConfigError(f"config section {name!r} must be a mapping")
    algos = {name: build_dataclass(method_configs[name], sec or {}, name) for name, sec in sections.items()}
    cfg = build_dataclass(Config, tree)
    cfg.algo = algos.get(section) or method_configs[section]()
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that do not need the world size (ConfigError naming the key)."""
    def need(ok: bool, key: str, what: str, got: Any) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r} must be {what}, got {got!r}")

    from models import FAMILIES  # the model-family registry lives with the models
    need(cfg.model.family in FAMILIES, "model.family",
         f"a registered family ({', '.join(FAMILIES.names())}) or a 'module:Class' path", cfg.model.family)
    FAMILIES.get(cfg.model.family)  # a plug-in's import error is one sentence now, before any process group
    need(cfg.model.finetune in ("lora", "full"), "model.finetune", "lora or full", cfg.model.finetune)
    need(cfg.model.dtype in ("fp32", "bf16"), "model.dtype", "fp32 or bf16", cfg.model.dtype)
    need(cfg.train.dtype in ("fp32", "bf16"), "train.dtype", "fp32 or bf16", cfg.train.dtype)
    need(cfg.model.lora_rank >= 1, "model.lora_rank", ">= 1", cfg.model.lora_rank)
    need(cfg.model.resolution >= 1, "model.resolution", ">= 1", cfg.model.resolution)
    need(cfg.data.prompts_per_epoch >= 1, "data.prompts_per_epoch", ">= 1", cfg.data.prompts_per_epoch)
    need(cfg.data.group_size >= 1, "data.group_size", ">= 1", cfg.data.group_size)
    need(cfg.rollout.num_steps >= 1, "rollout.num_steps", ">= 1", cfg.rollout.num_steps)
    need(cfg.rollout.batch_size >= 1, "rollout.batch_size", ">= 1", cfg.rollout.batch_size)
    need(cfg.train.epochs >= 0, "train.epochs", ">= 0", cfg.train.epochs)
    need(cfg.train.micro_batch_size >= 1, "train.micro_batch_size", ">= 1", cfg.train.micro_batch_size)
    need(cfg.train.gradient_steps_per_epoch >= 1, "train.gradient_steps_per_epoch", ">= 1",
         cfg.train.gradient_steps_per_epoch)
    need(cfg.train.num_timesteps >= 0, "train.num_timesteps", ">= 0", cfg.train.num_timesteps)
    need(0 < cfg.train.timestep_fraction <= 1, "train.timestep_fraction", "in (0, 1]", cfg.train.timestep_fraction)
    need(cfg.train.timestep_sharing in ("sample", "group", "micro_batch"), "train.timestep_sharing",
         "sample, group or micro_batch", cfg.train.timestep_sharing)
    need(cfg.train.timestep_sampling in ("discrete", "uniform", "logit_normal"), "train.timestep_sampling",
         "discrete, uniform or logit_normal", cfg.train.timestep_sampling)
    need(len(cfg.train.logit_normal) == 2 and math.isfinite(cfg.train.logit_normal[0])
         and 0 < cfg.train.logit_normal[1] < math.inf,
         "train.logit_normal", "[mean, std] with finite mean and std > 0", cfg.train.logit_normal)
    need(cfg.train.lr > 0, "train.lr", "> 0", cfg.train.lr)
    need(len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas), "train.betas",
         "two numbers in [0, 1)", cfg.train.betas)
    need(cfg.train.grad_clip >= 0, "train.grad_clip", ">= 0", cfg.train.grad_clip)
    need(cfg.train.kernel_backend in ("auto", "torch", "triton"), "train.kernel_backend", "auto, torch or triton",
         cfg.train.kernel_backend)
    need(0 <= cfg.train.max_bad_reward_fraction <= 1, "train.max_bad_reward_fraction", "in [0, 1]",
         cfg.train.max_bad_reward_fraction)
    need(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "0, 1, 2 or 3", cfg.deepspeed.zero_stage)
    need(cfg.deepspeed.optimizer in ("torch", "deepspeed"), "deepspeed.optimizer", "torch or deepspeed",
         cfg.deepspeed.optimizer)
    need(cfg.deepspeed.backend in ("auto", "nccl", "gloo"), "deepspeed.backend", "auto, nccl or gloo",
         cfg.deepspeed.backend)
    need(math.isfinite(cfg.distributed.timeout_s) and cfg.distributed.timeout_s >= 1, "distributed.timeout_s",
         "a number of seconds >= 1 (the heartbeat needs a few beats per timeout)", cfg.distributed.timeout_s)
    need(not cfg.deepspeed.offload_params or cfg.deepspeed.zero_stage == 3, "deepspeed.offload_params",
         "false unless deepspeed.zero_stage is 3", cfg.deepspeed.offload_params)
    need(not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage >= 1, "deepspeed.offload_optimizer",
         "false unless deepspeed.zero_stage >= 1", cfg.deepspeed.offload_optimizer)
    need(len(cfg.rewards) >= 1, "rewards", "a non-empty list of reward specs", cfg.rewards)
    for i, r in enumerate(cfg.rewards):
        r.validate(f"rewards[{i}]")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", ">= 1", cfg.checkpoint.keep)
    need(cfg.checkpoint.every >= 0, "checkpoint.every", ">= 0", cfg.checkpoint.every)
    need(cfg.eval.adapter in ("policy", "ema"), "eval.adapter", "policy or ema", cfg.eval.adapter)
    if cfg.eval.after_training:
        need(is_import_path(cfg.eval.after_training), "eval.after_training", "'' or a 'module:callable' path",
             cfg.eval.after_training)
        import_path(cfg.eval.after_training, "eval.after_training")  # a typo fails now, not after the run
    if hasattr(cfg.algo, "validate"):
        cfg.algo.validate(cfg)


def help_lines(cls=Config, prefix: str = "") -> list[str]:
    """One line per option of ``cls`` (default: the whole run config): ``key (type, default X): help``."""
    return option_help_lines(cls, prefix)
