"""Tests of deblend.models.centre_net: targets, loss, network shapes, peak finding, a tiny fit."""

import numpy as np
import pytest
import torch

from deblend.models.centre_net import (
    CentreNet,
    centre_focal_loss,
    centre_heatmap,
    centre_targets,
    find_centres,
)


def test_targets_peak_at_each_centre_and_fall_off():
    heat = centre_targets([(5.2, 6.9), (12.0, 3.0)], (16, 20), sigma=1.0)
    assert heat.shape == (16, 20) and heat.dtype == np.float32
    assert heat[7, 5] == 1.0 and heat[3, 12] == 1.0
    assert (heat == 1.0).sum() == 2
    assert heat[3, 14] == pytest.approx(np.exp(-2.0), rel=1e-6)  # 2 px from (12, 3)
    assert heat[0, 0] == 0.0 and heat.max() <= 1.0


def test_targets_skip_missing_and_outside_centres():
    heat = centre_targets([(np.nan, np.nan), (-5.0, 3.0), (3.0, 40.0)], (10, 10))
    assert not heat.any()
    assert not centre_targets(np.zeros((0, 2)), (4, 4)).any()


def test_close_centres_stay_two_maxima():
    heat = centre_targets([(10.0, 10.0), (13.0, 10.0)], (21, 24))
    xs, ys, values = find_centres(heat, threshold=0.5)
    assert sorted(zip(xs.tolist(), ys.tolist(), strict=True)) == [(10, 10), (13, 10)]
    assert np.all(values == 1.0)


def test_find_centres_threshold_and_order():
    heat = np.zeros((20, 20), np.float32)
    heat[5, 5], heat[10, 15], heat[15, 3] = 0.9, 0.6, 0.2
    xs, ys, values = find_centres(heat, threshold=0.3)
    assert xs.tolist() == [5, 15] and ys.tolist() == [5, 10]
    assert values.tolist() == pytest.approx([0.9, 0.6])
    with pytest.raises(ValueError, match="window"):
        find_centres(heat, window=2)


@pytest.mark.parametrize("shape", [(32, 32), (37, 50)])
def test_network_keeps_the_image_shape(shape):
    torch.manual_seed(0)
    net = CentreNet(channels=(4, 8, 8))
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 1, *shape)


def test_network_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels"):
        CentreNet(channels=(8,))


def test_focal_loss_prefers_the_right_heatmap():
    target = torch.from_numpy(centre_targets([(8.0, 8.0)], (16, 16)))[None, None]
    good = torch.where(target >= 1, 6.0, -6.0)
    bad = torch.where(target >= 1, -6.0, 6.0)
    assert centre_focal_loss(good, target) < 0.01 < centre_focal_loss(bad, target)
    empty = torch.zeros_like(target)
    assert torch.isfinite(centre_focal_loss(torch.zeros_like(target), empty))


def test_heatmap_is_zero_on_masked_pixels():
    net = CentreNet(channels=(4, 8))
    image = np.zeros((24, 24), np.float32)
    image[3:6, :] = np.nan
    heat = centre_heatmap(net, image)
    assert heat.shape == (24, 24) and np.all(heat[3:6] == 0) and np.all((heat >= 0) & (heat <= 1))
    with pytest.raises(ValueError, match="2-D"):
        centre_heatmap(net, np.zeros((2, 8, 8)))


def test_a_short_fit_finds_two_close_blobs():
    """Trained briefly on one image of two blobs 4 px apart, the heatmap has its maxima at both."""
    torch.manual_seed(0)
    yy, xx = np.mgrid[:32, :32]
    centres = [(14.0, 16.0), (18.0, 16.0)]
    image = sum(3 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.2**2)) for x, y in centres)
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    target = torch.from_numpy(centre_targets(centres, (32, 32)))[None, None]
    net = CentreNet(channels=(8, 16))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = centre_focal_loss(net(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.train()  # centre_heatmap switches to eval itself; BatchNorm then uses running stats
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average of the one image's statistics
    with torch.no_grad():
        net(x)
    xs, ys, _ = find_centres(centre_heatmap(net, image), threshold=0.3)
    assert sorted(zip(xs.tolist(), ys.tolist(), strict=True)) == [(14, 16), (18, 16)]


def test_save_and_load_keep_the_network_and_card(tmp_path):
    from deblend.models.centre_net import load_centre_net, save_centre_net

    torch.manual_seed(0)
    net = CentreNet(channels=(4, 8)).eval()
    save_centre_net(net, tmp_path / "c.pt", card={"name": "c"})
    back = load_centre_net(tmp_path / "c.pt")
    assert back.deblend_card["architecture"]["channels"] == [4, 8] and not back.training
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x), atol=2e-2, rtol=2e-2)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*save_centre_net"):
        load_centre_net(tmp_path / "other.pt")


def test_save_accepts_a_card_with_the_torch_version():
    import tempfile
    from pathlib import Path

    from deblend.models.centre_net import load_centre_net, save_centre_net

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        save_centre_net(CentreNet(channels=(4, 8)), path, card={"torch": torch.__version__})
        assert load_centre_net(path).deblend_card["torch"] == str(torch.__version__)


def test_shift_operating_point_maps_the_value_to_one_half_and_keeps_the_order():
    from deblend.models.centre_net import shift_operating_point

    torch.manual_seed(0)
    net = CentreNet(channels=(4, 8)).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        before = torch.sigmoid(net(x))
        shift_operating_point(net, 0.4)
        after = torch.sigmoid(net(x))
    expected = torch.sigmoid(torch.logit(before.double()) - np.log(0.4 / 0.6)).float()
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(before.flatten().argsort(), after.flatten().argsort())
    with pytest.raises(ValueError, match="value"):
        shift_operating_point(net, 1.0)


def test_heatmap_does_not_depend_on_the_number_of_threads():
    """Catalogs must be byte-identical whatever the thread count (tests/test_reliability.py)."""
    torch.manual_seed(0)
    model = CentreNet(channels=(16, 32)).eval()
    x = torch.randn(2, 1, 64, 64)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                outputs.append(model(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])
