"""Multi-node, end to end on one CPU machine: 2 "nodes" x 1 process.

Two torchrun launchers (``--nnodes 2 --nproc-per-node 1``) meet through a c10d rendezvous on 127.0.0.1, each one a
node, and run the engine's training entry point (``engine.train.main``, what ``engine/train.py`` runs) on gloo for
2 epochs of a tiny CRD config. Checked: both launchers exit 0, both ranks see world size 2, they agree on every
logged loss and hold bit-identical policy weights afterwards (data parallelism really averaged the gradients), and
rank 0 wrote the run's metrics. ``docs/scale.md`` describes the same launch on real nodes (DeepSpeed hostfile).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["model.size={num_layers: 1, attention_head_dim: 8, num_attention_heads: 2, text_width: 16, "
        "text_intermediate: 32, text_layers: 1, text_heads: 2, sample_size: 8}",
        "model.random_init=true", "model.resolution=8", "model.lora_rank=4",
        f"data.train_prompts={os.path.join(ROOT, 'data/testbed/train.jsonl')}",
        "data.prompts_per_epoch=2", "data.group_size=4", "rollout.num_steps=3", "rollout.batch_size=4",
        "train.micro_batch_size=4", "train.num_timesteps=1", "train.gradient_steps_per_epoch=1", "train.epochs=2",
        "log.tensorboard=false", "log.progress=false", "log.grid_every=0", "eval.num_prompts=0",
        "checkpoint.every=0", "checkpoint.at_end=false", "rewards=[{name: multinode_toy}]"]

# The worker is the engine's entry point; around it, it records what this rank saw (the returned epoch metrics,
# every step's loss from the logger, a checksum of the policy weights) so the two ranks can be compared.
WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    sys.path.insert(0, {root!r})
    import torch
    from engine.rewards import register
    register("multinode_toy", "benchmarks.common:ToyReward")
    import engine.loop as loop
    import engine.runlog as elog
    seen = {{"losses": []}}
    _build, _train, _log = loop.build, loop.train, elog.RunLogger.log
    def build(cfg):
        ctx, start = _build(cfg)
        seen["ctx"] = ctx
        return ctx, start
    def train(cfg):
        out = _train(cfg)
        seen["last"] = out
        return out
    def log(self, step, metrics, kind="step"):
        if kind == "step":
            seen["losses"].append(metrics["loss/mean"])
        return _log(self, step, metrics, kind)
    loop.build, loop.train, elog.RunLogger.log = build, train, log
    from engine.train import main
    code = main(sys.argv[1:])
    ctx = seen["ctx"]
    h = hashlib.sha256()
    for k, p in sorted(ctx.model.adapters.params("policy").items()):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    rank = ctx.dist.rank
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"code": code, "rank": rank, "world": ctx.dist.world_size, "losses": seen["losses"],
                   "policy_sha256": h.hexdigest(), "last_loss": seen["last"].get("loss/mean")}}, f)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(code)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_nodes_one_process_each_train_crd(tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT, out=str(out)))
    single_out = tmp_path / "single"
    single_out.mkdir()
    single_worker = tmp_path / "single_worker.py"
    single_worker.write_text(WORKER.format(root=ROOT, out=str(single_out)))
    port = _free_port()
    # in-process engine tests earlier in the session leave RANK/WORLD_SIZE/MASTER_PORT in os.environ while this
    # process still serves that port: the subprocesses must pick their own
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env = {**inherited, "DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    run_dir = tmp_path / "run"
    launchers = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "rlflow-multinode-test", "--local-addr", "127.0.0.1", "--max-restarts", "0",
               str(worker), "--method", "crd", "--config", os.path.join(ROOT, "configs/testbed_crd.yaml"),
               *TINY, f"output_dir={run_dir}"]
        launchers.append(subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in launchers:
            logs.append(p.communicate(timeout=220)[0])
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    for node, (p, log) in enumerate(zip(launchers, logs)):
        assert p.returncode == 0, f"node {node} launcher exited {p.returncode}:\n{log[-4000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["code"] for r in ranks] == [0, 0]
    assert len(ranks[0]["losses"]) == 2  # 2 epochs x 1 optimizer step
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the step metrics every rank hands to the logger
    assert ranks[0]["last_loss"] == ranks[1]["last_loss"] == ranks[0]["losses"][-1]
    assert all(v == v and abs(v) < 1e6 for v in ranks[0]["losses"])  # finite
    assert ranks[0]["policy_sha256"] == ranks[1]["policy_sha256"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]

    # the same global batch on ONE process (plain `python`, 2 micro-batches accumulated) gives the same losses
    single = subprocess.run([sys.executable, str(single_worker), "--method", "crd", "--config",
                             os.path.join(ROOT, "configs/testbed_crd.yaml"), *TINY,
                             f"output_dir={tmp_path / 'run_single'}"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=200)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]
    one = json.loads((single_out / "rank0.json").read_text())
    assert one["world"] == 1
    assert one["losses"] == pytest.approx(ranks[0]["losses"], rel=1e-5, abs=1e-7)
