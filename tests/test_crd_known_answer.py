"""CRD on the known-answer world (``model.family: gmm``, world ``several``): what its fixed point is, measured against
the closed-form optimum ``p* = p_ref exp(R / beta) / Z`` of every prompt.

The theory's exact case (``engine.known_answer.compare``'s ``crd_exact``: theta_old frozen at the pretrained weights,
KL off, ``crd.reward_scale: raw`` so the target is ``p_ref exp(R / beta)`` at ``beta = crd.beta``), 100 epochs of
48 reward calls, one torch thread (~10 s). Measured 2026-12-03 over seeds 0-2 (2-core AMD EPYC; docs/results/
known_answer.md): CRD moves every rewarded prompt the right way, leaves the flat prompt (``p* = p_ref``) at the
network's own floor, but lands PAST the optimum: the author's adaptive log-ratio estimator (squared errors divided by
the per-sample mean |v - u|) is not the log-likelihood ratio, so the tilt it matches is too strong (bowl +0.16-0.22
over E_p*[R] on every seed and every timestep option; tilt +0.1 +- 0.17). The issue's |Delta E[R]| <= 0.03 is
therefore a strict xfail here (it fails today; it will report XPASS, and fail, the day an estimator lands on p*).
"""
from __future__ import annotations

import statistics

import pytest
import torch

pytestmark = pytest.mark.slow


def crd_run(tmp_path, method="crd_exact", extra=(), epochs=100, seed=0):
    from engine.known_answer import compare
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 35k-parameter MLP runs ~100x faster on one thread than on two busy ones
    try:
        cfg = compare.method_config(method, world="several", epochs=epochs, run_dir=str(tmp_path / method),
                                    pretrain_steps=None, seed=seed, extra=list(extra))
        rec = compare.run_method(method, cfg, eval_every=10, samples=1024, seed=seed, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    rec["beta"], _ = compare.target_beta(method, rec, True)
    compare.measure({method: rec}, seed=seed)
    return rec


def late(rec, prompt, key, points=3):
    """The mean of ``key`` over the last ``points`` kept epochs (the training noise of one epoch is large)."""
    return statistics.mean(c[prompt][key] for c in rec["curve"][-points:])


@pytest.fixture(scope="module")
def exact_case(tmp_path_factory):
    return crd_run(tmp_path_factory.mktemp("crd_exact"))


def test_exact_case_moves_every_rewarded_prompt_toward_its_own_optimum(exact_case):
    start = exact_case["curve"][0]
    for prompt in ("tilt", "bowl"):
        gained = late(exact_case, prompt, "reward") - start[prompt]["reward"]
        wanted = start[prompt]["exact_reward"] - start[prompt]["ref_reward"]  # E_p*[R] - E_p_ref[R] > 0
        assert wanted > 0.15
        # at least 60% of the way from the pretrained model to p*, and at most 3x past it (NFT, with no fixed point,
        # runs to 2.5-5x on this budget: docs/results/known_answer.md)
        assert 0.6 * wanted < gained < 3.0 * wanted, (prompt, gained, wanted)


def test_exact_case_leaves_the_prompt_without_reward_at_the_networks_floor(exact_case):
    """Within-prompt centering: the flat prompt's centered reward is 0, so its p* is p_ref and CRD must not move it
    (its SW2 to exact p_ref samples stays within 1.5x the pretrained network's own floor, 0.12-0.15 measured).
    NFT (no per-prompt fixed point) and FDFO move it to 0.42 / 0.55 on the same budget."""
    from engine.known_answer.metrics import model_floor
    from models.gmm import GMMFlow, GMMSettings
    floor = model_floor(GMMFlow.pretrained(GMMSettings(world="several")), steps=10, n=1024, seed=0)["flat"]["floor"]
    assert late(exact_case, "flat", "sw2") < 1.5 * floor


@pytest.mark.xfail(strict=True, reason="issue 17: CRD's adaptive log-ratio over-tilts (bowl lands +0.16-0.22 past "
                                       "E_p*[R] on 3 seeds and every timestep option); no estimator lands yet")
def test_exact_case_lands_on_p_star(exact_case):
    for prompt in ("tilt", "bowl"):
        assert abs(late(exact_case, prompt, "overshoot")) <= 0.03, prompt
