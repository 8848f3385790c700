"""DeepSpeed and the collectives the engine needs.

- :func:`init_distributed`: one process (plain ``python``), ``torchrun`` or the ``deepspeed`` launcher; gloo on CPU,
  nccl on CUDA (``deepspeed.backend``). A single process without launcher variables gets a private local rendezvous.
- :func:`deepspeed_config`: ZeRO stage 0/1/2/3, optimizer offload, parameter offload, bf16, clipping and
  accumulation from our :class:`~engine.config.Config` and :class:`~engine.batch.BatchLayout`.
- :func:`initialize`: the whole ``FlowModel`` (wrapped in :class:`VelocityModule` so every call goes through the
  engine's forward and its ZeRO-3 hooks) goes to ``deepspeed.initialize`` with only the trainable parameters; frozen
  weights (pretrained base, snapshots) are partitioned under ZeRO-3 like everything else but hold no optimizer state.
- :class:`Dist`: rank helpers, group-aware all-gathers of DETACHED per-sample scalars (never latents or images),
  one all-reduce of a metric vector per optimizer step, rank-0-only I/O with barriers.
- :class:`Heartbeat`: ranks that never hang. ``distributed.timeout_s`` is the process group's timeout (a collective
  waiting longer fails); a rank that stops without exiting (SIGSTOP, a frozen host) would otherwise hold every peer
  for that long with no word of who is missing, so each rank beats in the process group's store and watches its
  ring successor: one silent for half the timeout is named in one line and this rank exits (code 1), which makes
  the launcher end the run. A rank that dies is noticed sooner by the collectives themselves (its sockets close).
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

from engine.batch import BatchLayout
from engine.config import Config


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, ...]`` (same shape on every rank) -> ``[world_size, n, ...]``, detached."""
        x = x.detach().contiguous()
        if self.world_size == 1:
            return x.unsqueeze(0)
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        tdist.all_gather(out, x)
        return torch.stack(out)

    def gather_samples(self, x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """This rank's per-sample values (in its processing order) -> all ``N`` samples in global order."""
        gathered = self.all_gather(x)
        out = torch.empty((layout.samples_per_epoch,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        for r in range(self.world_size):
            out[layout.rank_indices(r).to(x.device)] = gathered[r]
        return out

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            x = x.clone()
            tdist.all_reduce(x)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            x = x.clone()
            tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
        return x

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (one tiny all-reduce)."""
        return bool(self.all_reduce_max(torch.tensor([float(flag)], device=self.device)).item())

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block, then the others (for I/O that must happen once, e.g. creating directories)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


#: exit code of a rank whose watchdog found a stalled peer (a failure of the run, like train.py's one-line errors)
STALL_EXIT_CODE = 1
#: added to a rank's beat counter when its process exits (normally or not): its silence from then on is no stall
_DONE = 1 << 40


class Heartbeat:
    """Stalled-rank watchdog over the process group's key-value store (two daemon threads per rank).

    The beat thread adds 1 to this rank's counter every ``interval`` seconds and reads its ring successor's
    (``(rank + 1) % world``: O(world) store traffic in all, every rank watched by one peer). The watch thread, which
    never touches the store, decides on the local monotonic clock (no clock agreement between hosts needed):

    - the successor's counter has not moved for ``stall_s`` while this rank's own round trips are fresh: it is
      stalled (or was killed outside a collective);
    - one store round trip has been pending for ``stall_s``: the store's host is stalled (rank 0's process under the
      ``deepspeed`` launcher and plain launches; torchrun's agent holds it under torchrun).

    Either way one line naming the rank goes to stderr and this process leaves with :data:`STALL_EXIT_CODE` at once
    (``os._exit``: a peer frozen mid-collective would block a normal exit). If this process itself was frozen (its
    watch thread woke far too late), its clocks restart instead of blaming a healthy peer. Only frozen processes
    trip it: the threads beat while the main thread computes, writes checkpoints or waits in a collective.
    """

    def __init__(self, store, rank: int, world: int, stall_s: float, where: str = "") -> None:
        self.store, self.rank, self.world, self.where = store, rank, world, where
        self.peer = (rank + 1) % world
        self.stall_s = float(stall_s)
        self._stop = threading.Event()
        now = time.monotonic()
        self._peer_value, self._peer_seen, self._round_trip = -1, now, now
        self._pending_since: float | None = None
        self._threads = [threading.Thread(target=self._beat, name="rlflow-heartbeat", daemon=True),
                         threading.Thread(target=self._watch, name="rlflow-watchdog", daemon=True)]

    @property
    def interval(self) -> float:
        return min(5.0, max(0.05, self.stall_s / 10))

    def start(self) -> "Heartbeat":
        for t in self._threads:
            t.start()
        return self

    def stop(self, *, done: bool = True) -> None:
        """Stop both threads; with ``done`` tell the watcher of this rank that its silence is no stall."""
        self._stop.set()
        if done and self._pending_since is None:
            t = threading.Thread(target=self._add, args=(self.rank, _DONE), daemon=True)
            t.start()
            t.join(1.0)  # never hold an exit up for a store whose host is gone or frozen

    def _add(self, rank: int, value: int) -> int:
        return int(self.store.add(f"beat{rank}", value))

    def _beat(self) -> None:
        while not self._stop.is_set():
            if not tdist.is_initialized():  # the process group was destroyed: the run is over
                self._stop.set()
                return
            self._pending_since = time.monotonic()
            try:
                self._add(self.rank, 1)
                value = self._add(self.peer, 0)
            except Exception:  # the store's host exited: a normal end, or a death the collectives report
                self._stop.set()
                return
            self._pending_since = None
            now = time.monotonic()
            if value != self._peer_value:
                self._peer_value, self._peer_seen = value, now
            self._round_trip = now
            self._stop.wait(self.interval)

    def _watch(self) -> None:
        tick = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - tick > self.stall_s / 2:  # this process was frozen itself: restart the clocks
                self._peer_seen = self._round_trip = now
                if self._pending_since is not None:
                    self._pending_since = now
            tick = now
            pending = self._pending_since
            if pending is not None and now - pending > self.stall_s:
                host = "torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
                self._fail(f"{host} is stalled: the process-group store it hosts{self.where} has not answered "
                           f"for {now - pending:.1f} s")
            elif (self._peer_value < _DONE and now - self._round_trip < 3 * self.interval + 1
                    and now - self._peer_seen > self.stall_s):
                self._fail(f"rank {self.peer} is stalled: its heartbeat has been silent for "
                           f"{now - self._peer_seen:.1f} s (stopped, frozen or killed)")

    def _fail(self, what: str) -> None:
        try:
            print(f"error: rank {self.rank}: {what} (more than half of distributed.timeout_s = "
                  f"{2 * self.stall_s:g} s); ending this rank so the launcher ends the run", file=sys.stderr,
                  flush=True)
            sys.stdout.flush()
        finally:
            os._exit(STALL_EXIT_CODE)


_HEARTBEAT: Heartbeat | None = None


def _start_heartbeat(rank: int, world: int, timeout_s: float) -> None:
    """One heartbeat per process (a process may train several configs in one group: the last timeout wins)."""
    global _HEARTBEAT
    if _HEARTBEAT is not None and not _HEARTBEAT._stop.is_set():
        _HEARTBEAT.stall_s = timeout_s / 2
        return
    store = tdist.PrefixStore("rlflow/heartbeat/", tdist.distributed_c10d._get_default_store())
    where = (f" at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
             if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ else "")
    first = _HEARTBEAT is None
    _HEARTBEAT = Heartbeat(store, rank, world, timeout_s / 2, where).start()
    if first:
        atexit.register(lambda: _HEARTBEAT is not None and _HEARTBEAT.stop())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> Dist:
    """Initialise (or join an existing) process group; returns this process's :class:`Dist`."""
    import deepspeed

    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    backend = cfg.deepspeed.backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not tdist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # plain `python engine/train.py`
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                   timeout=timedelta(seconds=cfg.distributed.timeout_s))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if world > 1:
        _start_heartbeat(rank, world, cfg.distributed.timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count() if use_cuda else 1)))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def deepspeed_config(cfg: Config, layout: BatchLayout) -> dict:
    """The DeepSpeed JSON config for this run (ZeRO stage, offload, precision, clipping, accumulation)."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
                  "allgather_bucket_size": ds.reduce_bucket_size, "overlap_comm": False,
                  "contiguous_gradients": True}
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=ds.param_persistence_threshold,
                    stage3_prefetch_bucket_size=ds.reduce_bucket_size,
                    stage3_gather_16bit_weights_on_model_save=False)
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.accumulation,
        "train_batch_size": layout.micro_batch_size * layout.accumulation * layout.world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        "fp16": {"enabled": False},
    }
    if ds.optimizer == "deepspeed":
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.train.lr, "betas": list(cfg.train.betas), "eps": cfg.train.adam_eps,
            "weight_decay": cfg.train.weight_decay}}
    return config


class VelocityModule(nn.Module):
    """The FlowModel as DeepSpeed's module: ``forward(x, sigma, cond, adapter)`` is ``model.velocity(...)``, so
    every network call (rollout, snapshots, anchor, policy) passes through the engine and its ZeRO-3 hooks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, sigma, cond, adapter: str = "policy", pair: bool = False):
        if pair:  # CFG anchor: conditional and unconditional rows in one batched forward
            return self.model.velocity_cfg_pair(x, sigma, cond, adapter=adapter)
        return self.model.velocity(x, sigma, cond, adapter=adapter)


def warmup_lambda(warmup_steps: int):
    def fn(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return fn


def initialize(model: nn.Module, cfg: Config, layout: BatchLayout):
    """``deepspeed.initialize`` on the FlowModel with only its trainable parameters -> the DeepSpeed engine."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (LoRA adapters missing?)")
    module = VelocityModule(model)
    config = deepspeed_config(cfg, layout)
    optimizer = None
    if cfg.deepspeed.optimizer == "torch":
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps,
                                      weight_decay=cfg.train.weight_decay)
    scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(cfg.train.warmup_steps)))
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config)
    return engine
