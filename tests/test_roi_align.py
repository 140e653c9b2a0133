import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import LevelMapper

from deblend.models.roi_align import SeparableMultiScaleRoIAlign, roi_align


def _rois(n, seed, *, image=200.0, batch=3):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, batch, (n, 1), generator=g).float()
    corner = torch.rand(n, 2, generator=g) * (image + 20) - 10  # some hang over the edges
    size = torch.rand(n, 2, generator=g) ** 3 * 150 + 0.2  # mostly small, a few very large
    return torch.cat([index, corner, corner + size], dim=1)


@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 32])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_matches_torchvision(output_size, scale, memory_format):
    features = torch.randn(3, 16, 50, 37, generator=torch.Generator().manual_seed(1))
    features = features.contiguous(memory_format=memory_format)
    rois = _rois(300, seed=2)
    expected = tv_roi_align(features, rois, output_size, scale, 2, False)
    got = roi_align(features, rois, output_size, scale, 2)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-5)


def test_gradients_match_torchvision():
    features = torch.randn(2, 8, 20, 24, generator=torch.Generator().manual_seed(3))
    rois = _rois(40, seed=4, image=90.0, batch=2)
    weights = torch.randn(40, 8, 7, 7, generator=torch.Generator().manual_seed(5))
    grads = []
    for op in (lambda f: tv_roi_align(f, rois, 7, 0.25, 2, False), lambda f: roi_align(f, rois, 7, 0.25, 2)):
        f = features.clone().requires_grad_(True)
        (op(f) * weights).sum().backward()
        grads.append(f.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=5e-5)


def test_no_regions_and_adaptive_sampling():
    features = torch.randn(1, 4, 8, 8)
    assert roi_align(features, torch.zeros((0, 5)), 7, 1.0, 2).shape == (0, 4, 7, 7)
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]])
    torch.testing.assert_close(roi_align(features, rois, 3, 1.0, 0), tv_roi_align(features, rois, 3, 1.0, 0, False))


def test_multiscale_pool_matches_torchvision():
    names = ["0", "1", "2", "3"]
    strides = [4, 8, 16, 32]
    g = torch.Generator().manual_seed(6)
    features = {n: torch.randn(2, 8, 256 // s, 192 // s, generator=g) for n, s in zip(names, strides, strict=True)}
    boxes = []
    for seed in (7, 8):
        r = _rois(120, seed, image=170.0, batch=1)[:, 1:].clamp(min=0, max=180)
        boxes.append(torch.cat([r[:, :2], torch.maximum(r[:, 2:], r[:, :2] + 0.5)], dim=1))
    pools = []
    for cls in (MultiScaleRoIAlign, SeparableMultiScaleRoIAlign):
        pool = cls(featmap_names=names, output_size=14, sampling_ratio=2)
        pool.scales = [1.0 / s for s in strides]
        pool.map_levels = LevelMapper(k_min=2, k_max=5)
        pools.append(pool(features, boxes, [(256, 192)] * 2))
    assert len(torch.unique(LevelMapper(2, 5)(boxes))) > 1  # several levels used
    torch.testing.assert_close(pools[1], pools[0], rtol=1e-4, atol=5e-5)


def test_multiscale_pool_needs_fixed_scales():
    pool = SeparableMultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    with pytest.raises(RuntimeError, match="scales and map_levels"):
        pool({"0": torch.zeros(1, 1, 8, 8)}, [torch.zeros((1, 4))], [(32, 32)])
