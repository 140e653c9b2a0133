"""Tests of deblend.models.prob_unet: shapes, KL, sampling, determinism, save/load."""

import numpy as np
import pytest
import torch

from deblend.models.prob_unet import LOG_SIGMA_RANGE, build_prob_unet, load_prob_unet, save_prob_unet

TINY = {"widths": (4, 8, 8), "head_width": 8, "latent_dim": 3}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_prob_unet(**TINY)


def test_forward_shapes_and_kl(model):
    x = torch.randn(2, 3, 16, 16)
    y = (torch.rand(2, 1, 16, 16) > 0.5).float()
    logits, kl = model(x, y)
    assert logits.shape == (2, 1, 16, 16)
    assert kl.shape == (2,) and bool((kl >= 0).all())
    loss, rec, kl_mean = model.loss(x, y)
    assert torch.isclose(loss, rec + model.beta * kl_mean)


def test_training_step_reduces_loss(model):
    x = torch.randn(4, 3, 16, 16)
    y = torch.zeros(4, 1, 16, 16)
    y[:, :, 6:10, 6:10] = 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(model.loss(x, y)[0].detach())
    for _ in range(30):
        loss = model.loss(x, y)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_log_sigma_is_clamped(model):
    with torch.no_grad():
        model.prior.head.bias.fill_(1e6)
    dist = model.prior(torch.randn(1, 3, 16, 16))
    assert float(dist.stddev.log().max().detach()) <= LOG_SIGMA_RANGE[1] + 1e-5


def test_sample_shapes_seed_and_diversity(model):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # make the latent matter
        model.prior.head.bias[TINY["latent_dim"]:].fill_(1.0)
    a = model.sample(x, n_samples=5, seed=1)
    b = model.sample(x, n_samples=5, seed=1)
    c = model.sample(x, n_samples=5, seed=2)
    assert a.shape == (2, 5, 16, 16)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float((a[:, 0] - a[:, 1]).abs().max()) > 0


def test_deterministic_model_repeats_its_answer():
    torch.manual_seed(0)
    det = build_prob_unet(**{**TINY, "latent_dim": 0})
    assert not hasattr(det, "prior")
    x = torch.randn(1, 3, 16, 16)
    s = det.sample(x, n_samples=4)
    assert s.shape == (1, 4, 16, 16) and torch.equal(s[:, 0], s[:, 3])
    logits, kl = det(x)
    assert float(kl.abs().sum()) == 0


@pytest.mark.parametrize("bad", [{"latent_dim": -1}, {"in_channels": 0}, {"widths": (4,)}, {"beta": -1.0}])
def test_builder_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_prob_unet(**{**TINY, **bad})


def test_input_checks(model):
    with pytest.raises(ValueError, match="multiples of 4"):
        model.features(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match="shape"):
        model.features(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="annotation"):
        model(torch.randn(1, 3, 16, 16))


def test_save_load_roundtrip(tmp_path, model):
    path = tmp_path / "p.pt"
    digest = save_prob_unet(model, path, metadata={"note": "test"})
    loaded = load_prob_unet(path, expected_sha256=digest)
    assert loaded.config == model.config and loaded.deblend_metadata == {"note": "test"}
    x = torch.randn(1, 3, 16, 16)
    np.testing.assert_allclose(loaded.sample(x, n_samples=2, seed=3).numpy(),
                               model.half().float().sample(x, n_samples=2, seed=3).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_prob_unet(path, expected_sha256="0" * 64)


def test_load_refuses_mask_rcnn_weights():
    from deblend.models.registry import weights_path

    with pytest.raises(ValueError, match="holds Mask R-CNN weights"):
        load_prob_unet(weights_path("mask_rcnn_small"))


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_prob_unet.py"):
        load_prob_unet(tmp_path / "nope.pt")


def test_fast_sampling_equals_decoding_each_draw(model):
    """`sample` folds the latent into the head's first layer; it must equal decode() per draw."""
    with torch.no_grad():
        model.prior.head.bias[TINY["latent_dim"]:].fill_(0.5)
    x = torch.randn(3, 3, 16, 16)
    fast = model.sample(x, n_samples=4, seed=7)
    with torch.no_grad():
        feats, prior = model.features(x), model.prior(x)
        gen = torch.Generator().manual_seed(7)
        eps = torch.randn((4, *prior.mean.shape), generator=gen)
        slow = torch.stack([torch.sigmoid(model.decode(feats, prior.mean + prior.stddev * eps[s]))[:, 0]
                            for s in range(4)], dim=1)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_sample_on_chosen_pixels_with_given_noise(model):
    x = torch.randn(2, 3, 16, 16)
    full = model.sample(x, n_samples=3, seed=4)
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn((3, 2, TINY["latent_dim"]), generator=gen)
    where = torch.zeros((2, 16, 16), dtype=torch.bool)
    where[0, 2:9, 3:7] = True
    where[1, 10:, :5] = True
    part = model.sample(x, n_samples=3, noise=noise, where=where)
    torch.testing.assert_close(part[where[:, None].expand_as(part)], full[where[:, None].expand_as(full)])
    assert not part[~where[:, None].expand_as(part)].any()
    with pytest.raises(ValueError, match="noise must have shape"):
        model.sample(x, n_samples=2, noise=noise)


def test_sample_in_float16_matches_float32(model):
    """Under float16 autocast (as --half on a GPU) the samples equal float32's up to rounding."""
    x = torch.randn(2, 3, 16, 16)
    full = model.sample(x, n_samples=4, seed=2)
    with torch.autocast("cpu", dtype=torch.float16):
        half = model.sample(x, n_samples=4, seed=2)
    torch.testing.assert_close(half.float(), full, atol=0.02, rtol=0)
