"""Parameter snapshots of the policy: theta_old, theta_samp and the eval EMA (methods.md section 2).

After each epoch's optimizer steps every snapshot ``snap`` moves toward the policy
``snap <- lam(s) * snap + (1 - lam(s)) * theta`` where ``s`` is the optimizer-step counter and ``lam`` comes from a
schedule string ``"start_step-start_value-slope-end_value"``:
``lam(s) = start_value if s < start_step else min(start_value + (s - start_step) * slope, end_value)``.

Works for LoRA adapters and full fine-tuning alike (``model.adapters.params(name)`` gives aligned parameters), and
under ZeRO-3 it updates each rank's local partition (``param.ds_tensor``) only: no parameter is ever gathered.
Non-fp32 snapshot weights (bf16 training) keep an fp32 master copy here, so small EMA steps are not rounded away.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """``lam(s)`` of a schedule string ``"start_step-start_value-slope-end_value"``."""

    start_step: int
    start_value: float
    slope: float
    end_value: float

    @classmethod
    def parse(cls, text: str, key: str = "schedule") -> "Schedule":
        parts = re.split(r"(?<![eE])-", str(text).strip())
        try:
            if len(parts) != 4:
                raise ValueError
            step, start, slope, end = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
        except ValueError:
            raise ConfigError(f"config key {key!r} must be a schedule 'start_step-start_value-slope-end_value' "
                              f"such as '0-0.25-0.005-0.999', got {text!r}") from None
        if step < 0 or not (0 <= start <= 1 and 0 <= end <= 1) or slope < 0:
            raise ConfigError(f"config key {key!r}: schedule {text!r} needs start_step >= 0, slope >= 0 and "
                              f"values in [0, 1]")
        return cls(step, start, slope, end)

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return self.start_value
        return min(self.start_value + (step - self.start_step) * self.slope, self.end_value)


def _storages(p: torch.nn.Parameter) -> list[torch.Tensor]:
    """The tensors holding ``p``'s values on this rank: its ZeRO-3 partition, plus the full tensor when present."""
    if hasattr(p, "ds_tensor"):
        out = [p.ds_tensor]
        if p.data.numel() == p.ds_numel:  # persistent (small) params keep a full copy next to the partition
            out.append(p.data)
        return out
    return [p.data]


class Snapshots:
    """EMA snapshots ``{adapter name: Schedule}`` of the policy adapter of ``model.adapters``.

    Parameter pairs are kept, not tensors: DeepSpeed may swap a parameter's ``.data`` (ZeRO-3 gathers), so the
    storages are looked up at every use.
    """

    def __init__(self, adapters, schedules: dict[str, Schedule]) -> None:
        self.adapters = adapters
        self.schedules = dict(schedules)
        self._pairs: dict[str, list[tuple[torch.nn.Parameter, torch.nn.Parameter]]] = {}
        #: fp32 masters of non-fp32 storages, keyed (snapshot, parameter index, storage slot); made at first use
        self.masters: dict[tuple[str, int, int], torch.Tensor] = {}
        for name in self.schedules:
            adapters.check(name)
            dst, src = adapters.params(name), adapters.params("policy")
            self._pairs[name] = [(d, src[k]) for k, d in dst.items()]

    def _storage_pairs(self, name: str) -> list[tuple[tuple, torch.Tensor, torch.Tensor]]:
        out = []
        for i, (d, s) in enumerate(self._pairs[name]):
            ds, ss = _storages(d), _storages(s)
            if len(ds) != len(ss):
                raise RuntimeError(f"snapshot {name!r}: a parameter is partitioned differently from the policy's "
                                   "(ZeRO-3 persistence); set deepspeed.param_persistence_threshold=0")
            out.extend(((name, i, slot), a, b) for slot, (a, b) in enumerate(zip(ds, ss)))
        return out

    def local_tensors(self, name: str) -> list[torch.Tensor]:
        """This rank's storages of snapshot ``name`` (what a checkpoint saves)."""
        return [d for _, d, _ in self._storage_pairs(name)]

    @torch.no_grad()
    def update(self, step: int) -> dict[str, float]:
        """Move every snapshot toward the policy with its ``lam(step)``; returns ``{"decay/<name>": lam}``."""
        out = {}
        for name, sched in self.schedules.items():
            lam = float(sched(step))
            out[f"decay/{name}"] = lam
            done: set[int] = set()
            for key, d, s in self._storage_pairs(name):
                # on ONE rank DeepSpeed's whole copy of a persistent parameter IS its partition (deepspeed 0.19.8
                # runtime/zero/partition_parameters.py:1559 skips the gather, NoGatherHandle:74 sets
                # param.data = ds_tensor.data.to(same device).view): updating both would step it twice (lam**2)
                if d.data_ptr() in done:
                    continue
                done.add(d.data_ptr())
                if d.dtype == torch.float32:
                    d.mul_(lam).add_(s, alpha=1.0 - lam)
                else:
                    m = self.masters.setdefault(key, d.float())
                    m.mul_(lam).add_(s.float(), alpha=1.0 - lam)
                    d.copy_(m)
        return out

    def state_dict(self) -> dict:
        out = {name: {"tensors": [t.detach().clone() for t in self.local_tensors(name)]} for name in self.schedules}
        out["masters"] = {k: m.clone() for k, m in self.masters.items()}
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name in self.schedules:
            if name not in state:
                raise ValueError(f"checkpoint has no snapshot {name!r} (it has {sorted(state)})")
            saved = state[name]["tensors"]
            mine = self.local_tensors(name)
            if len(saved) != len(mine) or any(a.shape != b.shape for a, b in zip(saved, mine)):
                raise ValueError(f"checkpoint snapshot {name!r} does not match this model's layout (different "
                                 "model, LoRA rank or ZeRO-3 world size)")
            for d, s in zip(mine, saved):
                d.copy_(s)
        # each master goes where its storage lives (checkpoints are read onto the CPU)
        where = {key: d.device for name in self.schedules for key, d, _ in self._storage_pairs(name)}
        self.masters = {tuple(k): m.to(where.get(tuple(k), m.device), copy=True)
                        for k, m in state.get("masters", {}).items()}
