import pytest
import torch
from torch import nn

from dmd_lightning import L2Loss, LPIPSLoss, PseudoHuberLoss, VPSchedule, denoising_loss, distribution_matching_loss
from dmd_lightning.denoisers import Denoiser
from dmd_lightning.schedule import expand_like


class GaussianDenoiser(Denoiser):
    """Exact E[x0 | x_t] for x0 ~ N(mean, std^2 I)."""

    def __init__(self, schedule, mean, std):
        super().__init__()
        self.schedule, self.mean, self.std = schedule, mean, std

    def forward(self, x_t, t, cond=None):
        alpha, sigma = (expand_like(v, x_t) for v in self.schedule.alpha_sigma(t))
        var = alpha**2 * self.std**2 + sigma**2
        return self.mean + alpha * self.std**2 / var * (x_t - alpha * self.mean)


def gaussian_kl(m_g, s_g, m_r, s_r, alpha, sigma):
    """KL(p_fake,t || p_real,t) for isotropic Gaussians diffused to noise level t."""
    d = m_g.numel()
    v_g, v_r = alpha**2 * s_g**2 + sigma**2, alpha**2 * s_r**2 + sigma**2
    return 0.5 * d * (v_g / v_r - 1 - torch.log(v_g / v_r)) + alpha**2 * (m_g - m_r).pow(2).sum() / (2 * v_r)


@pytest.mark.parametrize("t_val", [100, 500, 900])
def test_dm_gradient_matches_the_analytic_kl_gradient(t_val):
    torch.manual_seed(t_val)
    s, d, n = VPSchedule(), 2, 200_000
    m_r, s_r = torch.tensor([1.0, -0.5]), 0.5
    m_g = torch.tensor([-0.3, 0.8], requires_grad=True)
    log_s_g = torch.tensor(0.4, requires_grad=True)
    real = GaussianDenoiser(s, m_r, s_r)
    fake = GaussianDenoiser(s, m_g.detach(), log_s_g.detach().exp())
    t = torch.full((n,), t_val)

    x = m_g + log_s_g.exp() * torch.randn(n, d)
    loss, _ = distribution_matching_loss(x, real, fake, t=t, normalize=False)
    g_dm = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [m_g, log_s_g])])

    alpha, sigma = (v[0] for v in s.alpha_sigma(t[:1]))
    kl = gaussian_kl(m_g, log_s_g.exp(), m_r, s_r, alpha, sigma)
    g_kl = torch.cat([g.flatten() for g in torch.autograd.grad(kl, [m_g, log_s_g])])

    cos = torch.nn.functional.cosine_similarity(g_dm, g_kl, dim=0)
    assert cos > 0.995, (g_dm, g_kl)
    # grad KL_t = alpha^2 / sigma^2 E[(mu_fake - mu_real) dx/dtheta]; the loss is mean-reduced over n * d.
    torch.testing.assert_close(g_kl.norm() / (g_dm.norm() * d), alpha**2 / sigma**2, rtol=0.05, atol=0)

    # With the paper's per-sample weighting the step is still a descent direction of the KL.
    x = m_g + log_s_g.exp() * torch.randn(n, d)
    loss, _ = distribution_matching_loss(x, real, fake, t=t, normalize=True)
    g_norm = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [m_g, log_s_g])])
    assert torch.dot(g_norm, g_kl) > 0


def test_dm_loss_gradient_is_the_normalized_score_difference():
    s = VPSchedule()
    real, fake = GaussianDenoiser(s, 0.0, 1.0), GaussianDenoiser(s, 2.0, 0.5)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    torch.manual_seed(1)
    t = torch.full((8,), 300)
    loss, stats = distribution_matching_loss(x, real, fake, t=t)
    (g,) = torch.autograd.grad(loss, x)
    torch.manual_seed(1)
    x_t = s.add_noise(x.detach(), torch.randn_like(x), t)
    mu_r, mu_f = real(x_t, t), fake(x_t, t)
    w = (x.detach() - mu_r).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g * x.numel(), (mu_f - mu_r) / w, rtol=1e-4, atol=1e-5)
    assert set(stats) >= {"dm/weight_mean", "dm/weight_min", "dm/weight_max", "dm/nonfinite"}
    torch.manual_seed(1)
    loss, stats = distribution_matching_loss(x, real, fake, t=t, normalize=False)  # unweighted, image-shaped x
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g * x.numel(), mu_f - mu_r, rtol=1e-4, atol=1e-5)
    assert stats["dm/weight_min"] == stats["dm/weight_max"] == 1


def test_dm_loss_zeroes_non_finite_gradients_and_counts_them():
    s = VPSchedule()
    real = GaussianDenoiser(s, 0.0, 1.0)
    x = torch.randn(4, 2, requires_grad=True)
    x_bad = x.detach().clone()
    x_bad[0] = float("nan")
    x_bad.requires_grad_(True)
    loss, stats = distribution_matching_loss(x_bad, real, real)
    (g,) = torch.autograd.grad(loss, x_bad)
    assert stats["dm/nonfinite"] > 0 and torch.isfinite(g[1:]).all()


def test_real_only_ablation_pulls_samples_to_the_real_denoiser():
    s = VPSchedule()
    real = GaussianDenoiser(s, 5.0, 0.1)
    x = torch.zeros(16, 2, requires_grad=True)
    loss, _ = distribution_matching_loss(x, real, None, t=torch.full((16,), 100))
    (g,) = torch.autograd.grad(loss, x)
    assert (g < 0).all()  # descending moves x up, towards the real mean


def test_denoising_loss_is_the_plain_mse_of_the_networks_parameterization():
    class EpsNet(Denoiser):
        def __init__(self, schedule):
            super().__init__()
            self.schedule, self.lin = schedule, nn.Linear(2, 2)

        def forward(self, x_t, t, cond=None):
            return self.schedule.to_x0(self.lin(x_t), x_t, t)

    s = VPSchedule()
    net = EpsNet(s)
    x = torch.randn(64, 2)
    torch.manual_seed(3)
    loss = denoising_loss(net, x)
    torch.manual_seed(3)
    t = torch.randint(0, s.T, (64,))
    eps = torch.randn_like(x)
    expected = (net.lin(s.add_noise(x, eps, t)) - eps).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-4)


def test_regression_losses():
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert L2Loss()(a, a) == 0 and L2Loss()(a, b) > 0
    torch.testing.assert_close(L2Loss()(a, b), ((a - b) ** 2).mean())
    huber = PseudoHuberLoss(c=0.1)
    assert huber(a, a) == 0
    d2 = ((a - b) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(huber(a, b), ((d2 + 0.01).sqrt() - 0.1).mean())


def test_lpips_needs_backbone_weights_and_loads_them(tmp_path):
    import torchvision

    with pytest.raises(ValueError, match="backbone_weights"):
        LPIPSLoss()
    feats = torchvision.models.vgg16().features
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "vgg16.pth")
    loss = LPIPSLoss(backbone_weights=str(tmp_path / "vgg16.pth"), resize=64)
    torch.testing.assert_close(loss.lpips.net.slice1[0].weight, feats[0].weight)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = x.clone().requires_grad_(True)
    assert loss(x, x) < 1e-6
    value = loss(torch.rand(2, 1, 16, 16) * 2 - 1, y)
    value.backward()
    assert value > 0 and y.grad is not None


def test_each_loss_backpropagates_into_its_own_network_only():
    """DMDModule steps without toggle_optimizer: the DM loss must not reach the denoisers, the denoising loss
    must not reach the generator."""
    schedule = VPSchedule()
    real, fake, generator = (nn.Conv2d(1, 1, 1) for _ in range(3))

    class ConvDenoiser(Denoiser):
        def __init__(self, net):
            super().__init__()
            self.net, self.schedule = net, schedule

        def forward(self, x_t, t, cond=None):
            return self.net(x_t)

    z = torch.randn(4, 1, 8, 8)
    x = generator(z)
    loss, _ = distribution_matching_loss(x, ConvDenoiser(real), ConvDenoiser(fake))
    loss.backward()
    assert generator.weight.grad is not None
    assert real.weight.grad is None and fake.weight.grad is None
    generator.zero_grad(set_to_none=True)
    denoising_loss(ConvDenoiser(fake), generator(z)).backward()
    assert fake.weight.grad is not None and generator.weight.grad is None
