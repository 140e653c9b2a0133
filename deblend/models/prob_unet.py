"""Probabilistic U-Net (Kohl et al. 2018) for the masks of blended sources.

A U-Net computes features of the input once; a latent vector ``z`` is
broadcast over the image and concatenated to the U-Net's last features, and a
few 1x1 convolutions turn them into a mask. ``z`` comes from a *prior net*
that sees the input only (inference) or, during training, from a *posterior
net* that also sees the annotation; the loss is the reconstruction error plus
``beta * KL(posterior || prior)``. Different draws of ``z`` give different,
plausible masks, and because only the 1x1 head is re-run per draw, extra
samples are cheap.

With ``latent_dim=0`` the same network is an ordinary deterministic U-Net
(no prior or posterior net), the baseline the probabilistic model is measured
against.

Input channels used by `deblend.refine` (instance-conditioned design,
DESIGN.md): the normalised detection image, a heat map marking the source to
segment, and a heat map marking the other sources nearby. Output: one logit
per pixel, "this pixel belongs to the marked source".
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence
from torch.nn import functional as F

from deblend.models.weights import load_payload, save_model

__all__ = ["ProbUNet", "build_prob_unet", "save_prob_unet", "load_prob_unet", "LOG_SIGMA_RANGE"]

#: Clamp of the latent log standard deviations (unbounded log sigma makes training go NaN).
LOG_SIGMA_RANGE = (-6.0, 2.0)


def _block(c_in, c_out):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out // 4), c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out // 4), c_out), nn.ReLU(inplace=True),
    )


class _Encoder(nn.Module):
    """Convolution blocks with 2x average-pool downsampling; returns every level's features."""

    def __init__(self, in_channels, widths):
        super().__init__()
        chans = [in_channels, *widths]
        self.blocks = nn.ModuleList(_block(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))

    def forward(self, x):
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.avg_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats


class _Gaussian(nn.Module):
    """Encoder + global average pool → diagonal Gaussian over the latent space."""

    def __init__(self, in_channels, widths, latent_dim):
        super().__init__()
        self.encoder = _Encoder(in_channels, widths)
        self.head = nn.Conv2d(widths[-1], 2 * latent_dim, 1)
        self.latent_dim = latent_dim

    def forward(self, x):
        h = self.encoder(x)[-1].mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.head(h)[:, :, 0, 0].chunk(2, dim=1)
        log_sigma = log_sigma.clamp(*LOG_SIGMA_RANGE)
        return Independent(Normal(mu, log_sigma.exp()), 1)


class ProbUNet(nn.Module):
    """Probabilistic U-Net; build it with `build_prob_unet`.

    Attributes
    ----------
    config : dict
        The builder's arguments (stored with the weights).
    """

    def __init__(self, *, in_channels, latent_dim, beta, widths, head_width):
        super().__init__()
        self.config = {"in_channels": in_channels, "latent_dim": latent_dim, "beta": beta,
                       "widths": list(widths), "head_width": head_width}
        self.latent_dim = latent_dim
        self.beta = beta
        self.depth = len(widths)
        self.encoder = _Encoder(in_channels, widths)
        rev = list(widths)[::-1]
        self.up = nn.ModuleList(_block(a + b, b) for a, b in zip(rev[:-1], rev[1:], strict=True))
        self.head = nn.Sequential(
            nn.Conv2d(widths[0] + latent_dim, head_width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(head_width, head_width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(head_width, 1, 1),
        )
        if latent_dim:
            self.prior = _Gaussian(in_channels, widths, latent_dim)
            self.posterior = _Gaussian(in_channels + 1, widths, latent_dim)

    def _check(self, x):
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"input must have shape (batch, {self.config['in_channels']}, ny, nx), "
                             f"got {tuple(x.shape)}")
        m = 2 ** (self.depth - 1)
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"input height and width must be multiples of {m}, got {tuple(x.shape[2:])}; "
                             "pad the cutout")

    def features(self, x):
        """U-Net features at full resolution (computed once per input, shared by all samples)."""
        self._check(x)
        feats = self.encoder(x)
        h = feats[-1]
        for block, skip in zip(self.up, feats[-2::-1], strict=True):
            h = F.interpolate(h, size=skip.shape[2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return h

    def decode(self, features, z=None):
        """Mask logits ``(batch, 1, ny, nx)`` from U-Net features and latent vectors ``(batch, latent_dim)``."""
        if self.latent_dim:
            zmap = z[:, :, None, None].expand(-1, -1, *features.shape[2:])
            features = torch.cat([features, zmap], dim=1)
        return self.head(features)

    def forward(self, x, y=None):
        """Training pass.

        Parameters
        ----------
        x : Tensor, shape (batch, in_channels, ny, nx)
        y : Tensor, shape (batch, 1, ny, nx), optional
            Annotation in {0, 1}; needed for the posterior of a probabilistic model.

        Returns
        -------
        logits : Tensor, shape (batch, 1, ny, nx)
            From a posterior draw (probabilistic model) or deterministic.
        kl : Tensor, shape (batch,)
            KL(posterior || prior) per example (zeros for a deterministic model).
        """
        feats = self.features(x)
        if not self.latent_dim:
            return self.decode(feats), feats.new_zeros(x.shape[0])
        if y is None:
            raise ValueError("y (the annotation) is required to train a probabilistic model")
        posterior = self.posterior(torch.cat([x, y], dim=1))
        prior = self.prior(x)
        z = posterior.rsample()
        return self.decode(feats, z), kl_divergence(posterior, prior)

    def loss(self, x, y):
        """Per-batch loss: summed pixel cross-entropy + beta * KL, averaged over the batch.

        Returns
        -------
        loss, reconstruction, kl : Tensor (scalars)
        """
        logits, kl = self(x, y)
        rec = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(dim=(1, 2, 3)).mean()
        kl = kl.mean()
        return rec + self.beta * kl, rec, kl

    @torch.inference_mode()
    def sample(self, x, *, n_samples=16, seed=0, noise=None, where=None):
        """Draw mask probabilities from the prior.

        Parameters
        ----------
        x : Tensor, shape (batch, in_channels, ny, nx)
        n_samples : int, optional
            Samples per input. A deterministic model returns its one answer
            ``n_samples`` times.
        seed : int, optional
            Seed of the latent draws (a private generator; global RNG untouched).
        noise : Tensor, shape (n_samples, batch, latent_dim), optional
            Standard normal draws to use instead of seeding a generator (lets a
            caller keep each input's draws independent of how inputs are batched).
        where : Tensor of bool, shape (batch, ny, nx), optional
            Pixels whose probabilities are wanted; the others are returned as 0
            and cost nothing per sample. Default: all.

        Returns
        -------
        Tensor, shape (batch, n_samples, ny, nx)
            Probability that each pixel belongs to the marked source.
        """
        if int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        feats = self.features(x)
        if not self.latent_dim:
            probs = torch.sigmoid(self.decode(feats))[:, 0, None]
            if where is not None:
                probs = probs * where[:, None]
            return probs.expand(-1, n_samples, -1, -1).contiguous()
        prior = self.prior(x)
        shape = (n_samples, *prior.mean.shape)
        if noise is None:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            noise = torch.randn(shape, generator=gen)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (n_samples, batch, latent_dim), got {tuple(noise.shape)}")
        eps = noise.to(x.device)
        z = prior.mean[None] + prior.stddev[None] * eps  # (n_samples, batch, latent)
        # The head is 1x1 convolutions, i.e. the same small MLP at every pixel: run it only on the
        # wanted pixels, as matrix products. Its first layer is linear in [features, z], so the
        # feature part is applied once and the latent part added per sample as a shift.
        if where is None:
            where = torch.ones((x.shape[0], *x.shape[2:]), dtype=torch.bool, device=x.device)
        b, yy, xx = where.nonzero(as_tuple=True)
        layers = [(m.weight[:, :, 0, 0], m.bias) if isinstance(m, nn.Conv2d) else m for m in self.head]
        (w_first, b_first), rest = layers[0], layers[1:]
        n_feat = feats.shape[1]
        base = F.linear(feats.permute(0, 2, 3, 1)[b, yy, xx], w_first[:, :n_feat], b_first)  # (pixels, head)
        shift = torch.einsum("oc,sbc->sbo", w_first[:, n_feat:], z)[:, b]  # (n_samples, pixels, head)
        out = torch.zeros((x.shape[0], n_samples, *x.shape[2:]), dtype=feats.dtype, device=x.device)
        for s in range(n_samples):  # one sample at a time keeps the tensors cache-sized
            h = base + shift[s]
            for layer in rest:
                h = F.linear(h, *layer) if isinstance(layer, tuple) else layer(h)
            out[b, s, yy, xx] = torch.sigmoid(h[:, 0]).to(out.dtype)  # float16 under autocast
        return out


def build_prob_unet(*, in_channels=3, latent_dim=6, beta=1.0, widths=(16, 32, 64, 128), head_width=32):
    """Build a probabilistic U-Net.

    Parameters
    ----------
    in_channels : int, optional
        Input channels (3 for `deblend.refine`: image, target heat map, others' heat map).
    latent_dim : int, optional
        Dimension of the latent space; 0 gives a deterministic U-Net.
    beta : float, optional
        Weight of the KL term.
    widths : sequence of int, optional
        Channels per U-Net level (also used by the prior and posterior nets);
        inputs must be multiples of ``2 ** (len(widths) - 1)`` pixels.
    head_width : int, optional
        Channels of the 1x1 convolutions that combine features and latent.

    Returns
    -------
    ProbUNet
    """
    if int(in_channels) != in_channels or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if int(latent_dim) != latent_dim or latent_dim < 0:
        raise ValueError(f"latent_dim must be a non-negative integer (0 = deterministic), got {latent_dim!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or min(widths) < 4:
        raise ValueError(f"widths must list at least 2 levels of >= 4 channels, got {widths!r}")
    return ProbUNet(in_channels=int(in_channels), latent_dim=int(latent_dim), beta=float(beta),
                    widths=widths, head_width=int(head_width))


def save_prob_unet(model, path, *, metadata):
    """Write a `ProbUNet`'s configuration and weights (see `deblend.models.weights.save_model`).

    Returns
    -------
    str
        The sha256 of the written file.
    """
    return save_model(model, path, kind="prob_unet", config=model.config, metadata=metadata)


def load_prob_unet(path, *, device="cpu", expected_sha256=None):
    """Rebuild a `ProbUNet` written by `save_prob_unet`.

    Returns
    -------
    ProbUNet
        In eval mode on ``device``, with ``deblend_metadata`` and ``deblend_sha256`` set.

    Raises
    ------
    FileNotFoundError, ValueError
        As `deblend.models.weights.load_payload`, or if the file does not fit the network.
    """
    payload, digest, device = load_payload(path, kind="prob_unet", device=device, expected_sha256=expected_sha256)
    try:
        model = build_prob_unet(**payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} does not match the probabilistic U-Net this deblend builds: {error}") from error
    model.deblend_metadata = payload.get("metadata", {})
    model.deblend_sha256 = digest
    return model.to(device).eval()
