"""DIDR math on toys with closed forms (spec/methods.md section 5): the Diffused Reward Proxy, the generator
gradient, the TA's learning, the DI++ ablation, and the clear errors."""
import math

import pytest
import torch
from torch import nn

from engine.errors import ConfigError
from engine.distributed import Dist
from engine.methods.didr import DIDR, DIDRConfig, denoise_k, diffused_reward_proxy, dmd_weight, score_from_velocity
from engine.stepper import TorchStepper
from models.base import Cond

LOCAL = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
D = 12  # latent = [3, 2, 2]
SHAPE = (3, 2, 2)


class ToyOneStep(nn.Module):
    """A linear one-step generator ``g(z) = W z + b`` with a linear teacher and a linear fake score.

    Teacher velocity: ``v = A x + sigma a + cond_proj(c)`` for the conditional pass, without the cond term for the
    unconditional one, so CFG is a real combine. Fake: the same form with its own trainable parameters.
    """

    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
        self.W = nn.Parameter(torch.eye(D, dtype=dtype) + 0.1 * r(D, D))
        self.b = nn.Parameter(0.1 * r(D))
        self.register_buffer("A_ref", 0.3 * r(D, D))
        self.register_buffer("a_ref", 0.2 * r(D))
        self.register_buffer("C_ref", 0.2 * r(D, 4))
        self.A_fake = nn.Parameter(self.A_ref + 0.05 * r(D, D))
        self.a_fake = nn.Parameter(self.a_ref.clone())

    def generate(self, z, cond):
        return (z.flatten(1) @ self.W.T + self.b).view_as(z)

    def velocity(self, x, sigma, cond, *, adapter="policy"):
        xf = x.flatten(1)
        s = sigma.to(x.dtype)[:, None]
        if adapter == "fake":
            v = xf @ self.A_fake.T + s * self.a_fake
        else:
            v = xf @ self.A_ref.T + s * self.a_ref + cond.embeds[:, 0, :].to(x.dtype) @ self.C_ref.T
        return v.view_as(x)

    def guided_velocity(self, x, sigma, cond, scale, *, adapter="pretrained"):
        v_c = self.velocity(x, sigma, cond, adapter=adapter)
        v_u = self.velocity(x, sigma, Cond(torch.zeros_like(cond.embeds)), adapter=adapter)
        return v_u + scale * (v_c - v_u)

    def decode(self, x):
        return x


class ToyReward:
    """Differentiable, nonlinear: ``r(img) = sum(c * tanh(img))``, gradient ``c * (1 - tanh^2)``."""

    name = "toy"
    differentiable = True

    def __init__(self, dtype=torch.float64):
        self.c = torch.linspace(-1, 1, D, dtype=dtype).view(SHAPE)

    def score(self, images, prompts, metadata):
        return {"toy": self.score_differentiable(images, prompts, metadata).detach()}

    def score_differentiable(self, images, prompts, metadata):
        return (self.c * torch.tanh(images)).flatten(1).sum(1)

    def grad(self, images):
        return self.c * (1 - torch.tanh(images) ** 2)


def _cond(b, dtype=torch.float64, seed=1):
    return Cond(torch.randn(b, 1, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype))


def _euler_jacobian(A, sigma, k):
    """d Phi_K / d x_t for the toy linear teacher: product of (I + Delta_k A) over the K Euler steps."""
    m = torch.eye(D, dtype=A.dtype)
    for j in range(k):
        delta = sigma * (1 - (j + 1) / k) - sigma * (1 - j / k)
        m = (torch.eye(D, dtype=A.dtype) + delta * A) @ m
    return m


@pytest.mark.parametrize("k", [1, 3])
def test_drp_equals_closed_form_gradient(k):
    """s_r_hat == (1/beta) (dPhi_K/dx_t)^T grad r(Phi_K(x_t)), computed in closed form for a linear teacher."""
    torch.manual_seed(0)
    model, reward, beta = ToyOneStep(), ToyReward(), 0.5
    b = 5
    cond = _cond(b)
    x_t = torch.randn(b, *SHAPE, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float32)
    vel = lambda x, s: model.velocity(x, s, cond, adapter="pretrained")  # noqa: E731
    s_r, r = diffused_reward_proxy(x_t, sigma, lambda x0: reward.score_differentiable(x0, None, None), vel,
                                   steps=k, beta=beta)
    assert not s_r.requires_grad and s_r.shape == x_t.shape
    phi = denoise_k(vel, x_t, sigma, k)
    for i in range(b):
        jac = _euler_jacobian(model.A_ref, float(sigma[i]), k)
        expected = jac.T @ reward.grad(phi[i]).flatten() / beta
        torch.testing.assert_close(s_r[i].flatten(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r, reward.score_differentiable(phi, None, None))
    # K = 1 is the Tweedie jump x0_hat = x_t - sigma v
    if k == 1:
        torch.testing.assert_close(phi, x_t - sigma.double().view(-1, 1, 1, 1) * vel(x_t, sigma))


def test_drp_accumulates_no_parameter_gradient():
    model, reward = ToyOneStep(), ToyReward()
    model.A_ref.requires_grad_(False)
    cond = _cond(2)
    diffused_reward_proxy(torch.randn(2, *SHAPE, dtype=torch.float64), torch.full((2,), 0.5),
                          lambda x0: reward.score_differentiable(x0, None, None),
                          lambda x, s: model.velocity(x, s, cond, adapter="fake"), steps=2, beta=1.0)
    assert model.A_fake.grad is None and model.W.grad is None


@pytest.mark.parametrize("cfg_scale,weighting,k", [(1.0, "dmd", 1), (3.0, "dmd", 2), (2.0, "none", 1),
                                                   (3.0, "dmd_x0", 1)])
def test_generator_gradient_equals_weighted_score_difference(cfg_scale, weighting, k):
    """grad_W loss_G == mean_i w_i (d_i - s_r_i) dx_t_i/dW, with d, s_r, w computed independently in closed form."""
    torch.manual_seed(1)
    model, reward = ToyOneStep(), ToyReward()
    cfg = DIDRConfig(cfg_scale=cfg_scale, weighting=weighting, drp_steps=k, beta=0.7, drp_cfg=True)
    method = DIDR(cfg, model, reward)
    b = 6
    cond = _cond(b)
    z = torch.randn(b, *SHAPE, dtype=torch.float64)
    sigma = torch.linspace(0.1, 0.9, b)
    eps = torch.randn(b, *SHAPE, dtype=torch.float64)
    x0 = model.generate(z, cond)
    loss, stats = method.generator_loss_at(x0, sigma, eps, cond, [""] * b, [{}] * b)
    loss.backward()

    # closed form, sample by sample
    grad_W = torch.zeros_like(model.W)
    grad_b = torch.zeros_like(model.b)
    null = torch.zeros(4, dtype=torch.float64)
    for i in range(b):
        s = float(sigma[i])
        zi, x0i = z[i].flatten(), x0[i].detach().flatten()
        xt = (1 - s) * x0i + s * eps[i].flatten()
        v_c = model.A_ref @ xt + s * model.a_ref + model.C_ref @ cond.embeds[i, 0]
        v_u = model.A_ref @ xt + s * model.a_ref + model.C_ref @ null
        v_ref = v_u + cfg_scale * (v_c - v_u)
        v_fake = model.A_fake.detach() @ xt + s * model.a_fake.detach()
        d = -(xt + (1 - s) * v_fake) / s + (xt + (1 - s) * v_ref) / s
        # DRP: Phi_K with the (guided) linear teacher; its Jacobian is the same product as without CFG
        x = xt.clone()
        for j in range(k):
            s_now, s_next = s * (1 - j / k), s * (1 - (j + 1) / k)
            vc = model.A_ref @ x + s_now * model.a_ref + model.C_ref @ cond.embeds[i, 0]
            vu = model.A_ref @ x + s_now * model.a_ref
            x = x + (s_next - s_now) * (vu + cfg_scale * (vc - vu))
        s_r = _euler_jacobian(model.A_ref, s, k).T @ reward.grad(x.view(SHAPE)).flatten() / 0.7
        w = 1.0 / (x0i - (xt - s * v_ref)).abs().mean() if weighting in ("dmd", "dmd_x0") else 1.0
        if weighting == "dmd_x0":  # the score difference in x0 units: sigma^2 / (1 - sigma) d = x0_fake - x0_ref
            w = w * s * s / (1 - s)
            x0_fake, x0_ref = xt - s * v_fake, xt - s * v_ref
            torch.testing.assert_close(s * s / (1 - s) * d, x0_fake - x0_ref, rtol=1e-9, atol=1e-11)
        g = w * (d - s_r)  # dL/dx_t for sample i (times 1/b from the mean)
        grad_W += (1 - s) * torch.outer(g, zi) / b
        grad_b += (1 - s) * g / b
    torch.testing.assert_close(model.W.grad, grad_W, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(model.b.grad, grad_b, rtol=1e-9, atol=1e-11)
    assert model.A_fake.grad is None, "the generator loss must not train the fake score"
    assert set(stats) >= {"generator_loss", "reward", "w", "d_rms", "drp_rms"}


def test_terminal_mode_is_ikl_minus_alpha_reward():
    """DI++ ablation: grad = grad(IKL surrogate with sg(d)) - alpha * grad mean r(g(z))."""
    model, reward = ToyOneStep(), ToyReward()
    b = 4
    cond, z = _cond(b), torch.randn(b, *SHAPE, dtype=torch.float64)
    sigma, eps = torch.full((b,), 0.4), torch.randn(b, *SHAPE, dtype=torch.float64)
    grads = {}
    for mode, alpha in (("terminal", 0.0), ("terminal", 2.0)):
        model.zero_grad()
        method = DIDR(DIDRConfig(reward_mode=mode, alpha=alpha, cfg_scale=1.0), model, reward)
        loss, _ = method.generator_loss_at(model.generate(z, cond), sigma, eps, cond, [""] * b, [{}] * b)
        loss.backward()
        grads[alpha] = model.W.grad.clone()
    model.zero_grad()
    (-2.0 * reward.score_differentiable(model.generate(z, cond), None, None).mean()).backward()
    torch.testing.assert_close(grads[2.0] - grads[0.0], model.W.grad, rtol=1e-9, atol=1e-11)


def test_regression_initialisation_fits_the_reference_sampler():
    """The generator initialisation (didr.init_*): ``reference_sample`` is the Euler ODE of the CFG reference on its
    schedule, and steps of ``regression_loss`` move the linear generator onto that (linear) map from z."""
    torch.manual_seed(0)
    model = ToyOneStep()
    model.sigmas = lambda n: torch.linspace(1, 0, n + 1)
    method = DIDR(DIDRConfig(cfg_scale=2.0, weighting="dmd_x0"), model, ToyReward())
    b = 64
    cond = Cond(torch.zeros(b, 1, 4, dtype=torch.float64))
    z = torch.randn(b, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = method.reference_sample(z, cond, 3)
    x = z.clone()
    for s_now, s_next in ((1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)):
        sig = torch.full((b,), s_now)
        x = x + (s_next - s_now) * model.guided_velocity(x, sig, cond, 2.0)
    torch.testing.assert_close(target, x, rtol=1e-6, atol=1e-6)  # the schedule is float32
    opt = TorchStepper([model.W, model.b], lr=3e-2, weight_decay=0.0)
    first = float(method.regression_loss(z, cond, target)[0])
    for _ in range(200):
        loss, stats = method.regression_loss(z, cond, target)
        opt.backward(loss, last=True)
    assert float(stats["reg_loss"]) < 0.05 * first and model.A_fake.grad is None


def test_score_and_weight_helpers():
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    eps_hat = x + (1 - sigma[:, None]) * v
    torch.testing.assert_close(score_from_velocity(x, v, sigma), -eps_hat / sigma[:, None])
    w = dmd_weight(torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), floor=1e-3)
    torch.testing.assert_close(w, torch.tensor([1.0, 1e3]))


class HyperFake(nn.Module):
    """A fake score whose function class holds the exact optimum for a Gaussian generator: v = M(sigma) x + c(sigma),
    with M, c from a small MLP on sigma (zero-initialised output: v = 0 at the start)."""

    def __init__(self, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, D * D + D))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def velocity(self, x, sigma, cond, *, adapter="fake"):
        p = self.net(sigma[:, None].to(x.dtype))
        m, c = p[:, :D * D].view(-1, D, D), p[:, D * D:]
        return (torch.einsum("bij,bj->bi", m, x.flatten(1)) + c).view_as(x)


def _gaussian_fm_optimum(W, b, sigma):
    """Minimal flow-matching loss E_sigma tr Cov(eps - x0 | x_t) / D for x0 = W z + b, z ~ N(0, I) (closed form)."""
    S = W @ W.T
    eye = torch.eye(D, dtype=S.dtype)
    total = 0.0
    for s in sigma.tolist():
        c_uu, c_ux = eye + S, s * eye - (1 - s) * S
        c_xx = (1 - s) ** 2 * S + s ** 2 * eye
        total += torch.trace(c_uu - c_ux @ torch.linalg.solve(c_xx, c_ux.T)) / D
    return total / len(sigma)


def test_ta_loss_falls_on_a_fixed_generator():
    """Stage I alone on a fixed generator: the fake score's held-out flow-matching loss closes most (> 75%) of its gap
    to the exact optimum (the generator is Gaussian, so the optimal loss is known in closed form)."""
    torch.manual_seed(0)
    gen = ToyOneStep(dtype=torch.float32)
    for p in gen.parameters():
        p.requires_grad_(False)
    fake = HyperFake()
    method = DIDR(DIDRConfig(cfg_scale=1.0), gen, ToyReward(torch.float32), fake=fake)
    ta_opt = TorchStepper(fake.parameters(), lr=1e-2)

    n_ev = 1024
    z_ev = torch.randn(n_ev, *SHAPE, generator=torch.Generator().manual_seed(123))
    cond_ev = Cond(torch.zeros(n_ev, 1, 4))

    def eval_loss():
        with torch.no_grad():
            return float(method.ta_loss(z_ev, cond_ev, torch.Generator().manual_seed(7))[0])

    sig_ev, _ = method.draw(n_ev, z_ev, torch.Generator().manual_seed(7))
    optimum = float(_gaussian_fm_optimum(gen.W.double(), gen.b.double(), sig_ev.double()))
    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        z = torch.randn(64, *SHAPE, generator=g)
        loss, _ = method.ta_loss(z, Cond(torch.zeros(64, 1, 4)), g)
        ta_opt.backward(loss, last=True)
    after = eval_loss()
    assert after - optimum < 0.25 * (before - optimum), (before, after, optimum)
    assert all(p.grad is None for p in gen.parameters())


def test_train_step_updates_each_network_with_its_own_optimizer():
    model, reward = ToyOneStep(dtype=torch.float32), ToyReward(torch.float32)
    method = DIDR(DIDRConfig(cfg_scale=2.0, ta_steps=2), model, reward)
    gen_opt = TorchStepper([model.W, model.b], lr=1e-2)
    ta_opt = TorchStepper([model.A_fake, model.a_fake], lr=1e-2)
    w0, a0 = model.W.detach().clone(), model.A_fake.detach().clone()
    b = 7
    stats, norms = method.train_step(torch.randn(b, *SHAPE), Cond(torch.randn(b, 1, 4)), [""] * b, [{}] * b,
                                     generator_opt=gen_opt, ta_opt=ta_opt, generator=torch.Generator().manual_seed(0),
                                     micro_batch_size=3)
    assert not torch.equal(model.W, w0) and not torch.equal(model.A_fake, a0)
    metrics = stats.reduce(LOCAL)
    for key in ("ta_loss/mean", "generator_loss/mean", "reward/mean", "w/mean", "drp_rms/mean"):
        assert metrics[key] == metrics[key], key
    assert float(norms["grad_norm"]) > 0 and float(norms["ta_grad_norm"]) > 0


def test_nan_gradients_are_zeroed():
    p = nn.Parameter(torch.ones(3))
    opt = TorchStepper([p], lr=0.1, weight_decay=0.0)
    opt.backward((p * torch.tensor([float("nan"), 1.0, float("inf")])).sum(), last=True)
    assert torch.isfinite(p).all()


class NotDifferentiable:
    name = "ocr"
    differentiable = False

    def score(self, images, prompts, metadata):
        return {"ocr": torch.zeros(len(images))}


def test_clear_errors():
    with pytest.raises(ConfigError, match=r"differentiable reward.*\['ocr'\] is not differentiable"):
        DIDR(DIDRConfig(), ToyOneStep(), NotDifferentiable())
    with pytest.raises(ConfigError, match="one-step generator"):
        DIDR(DIDRConfig(), nn.Linear(2, 2), ToyReward())
    with pytest.raises(ConfigError, match="didr.reward_mode"):
        DIDRConfig(reward_mode="final").validate()
    with pytest.raises(ConfigError, match="sigma_min"):
        DIDRConfig(sigma_min=0.0).validate()


class _GaussianWorld(nn.Module):
    """Data x0 ~ N(M, S^2 I): the teacher's velocity is exact; generator ``exp(log_a) z + b``; the fake score is the
    exact velocity of N(m_f, s_f^2 I) with learnable (m_f, s_f), so the TA loss can fit the generator exactly."""

    M, S = 2.0, 0.5

    def __init__(self, dim: int):
        super().__init__()
        self.log_a, self.b = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))  # starts at N(0, 1)
        self.m_f = nn.Parameter(torch.full((dim,), self.M))  # the fake starts as the teacher, as in DIDR
        self.log_s_f = nn.Parameter(torch.full((dim,), math.log(self.S)))

    @staticmethod
    def gaussian_velocity(x, sigma, m, s):
        """E[eps - x0 | x_sigma] for x0 ~ N(m, s^2), x_sigma = (1 - sigma) x0 + sigma eps."""
        sg = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        var = (1 - sg) ** 2 * s ** 2 + sg ** 2
        c = x - (1 - sg) * m
        return sg * c / var - (m + (1 - sg) * s ** 2 * c / var)

    def generate(self, z, cond, adapter="policy"):
        return self.log_a.exp() * z + self.b

    def velocity(self, x, sigma, cond, adapter="policy"):
        if adapter == "pretrained":
            return self.gaussian_velocity(x, sigma, torch.tensor(self.M), torch.tensor(self.S))
        assert adapter == "fake", adapter
        return self.gaussian_velocity(x, sigma, self.m_f, self.log_s_f.exp())

    def decode(self, x):
        return x


class _ZeroReward:
    """A reward with zero gradient that still depends on the images (the DRP differentiates it w.r.t. x_t)."""

    differentiable = True

    def score_differentiable(self, images, prompts, metadata):
        return images.sum(dim=tuple(range(1, images.ndim))) * 0.0


@pytest.mark.parametrize("weighting", ["dmd_x0", "dmd", "none"])
def test_distribution_matching_alone_reaches_the_teacher_distribution(weighting):
    """The whole DI loop (TA updates + generator step + weighting), with no reward, moves a N(0, 1) generator to the
    teacher's N(2, 0.25) (the unit tests above check the surrogate's gradient; this checks that it converges)."""
    dim, batch = 8, 256
    world = _GaussianWorld(dim)
    cfg = DIDRConfig(reward_mode="diffused", beta=1.0, cfg_scale=1.0, ta_steps=5, weighting=weighting)
    core = DIDR(cfg, world, _ZeroReward())
    gen_opt = TorchStepper([world.log_a, world.b], lr=1e-2, weight_decay=0.0)
    ta_opt = TorchStepper([world.m_f, world.log_s_f], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    cond = Cond(embeds=torch.zeros(batch, 1, 1))
    for _ in range(300):
        core.train_step(torch.randn(batch, dim, generator=g), cond, [""] * batch, [{}] * batch,
                        generator_opt=gen_opt, ta_opt=ta_opt, generator=g, micro_batch_size=batch)
    mean, std = world.b.detach(), world.log_a.detach().exp()
    assert (mean - world.M).abs().max() < 0.1, mean
    assert (std - world.S).abs().max() < 0.1, std
