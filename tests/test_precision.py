"""Tests of deblend.models.precision: the half option's checks, and half precision on a GPU."""

import numpy as np
import pytest
import torch

from deblend.models.precision import autocast, check_half


def test_check_half_accepts_float32_anywhere_and_float16_on_cuda_only():
    assert check_half(False, "cpu") is False
    assert check_half(True, "cuda") is True  # the device need not exist to be named
    with pytest.raises(ValueError, match="half=True needs a CUDA device, got device='cpu'"):
        check_half(True, "cpu")
    with pytest.raises(ValueError, match="half must be True or False, got 'yes'"):
        check_half("yes", "cuda")


def test_autocast_is_float16_when_half():
    with autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", True):  # the context itself works on any device; check_half guards the option
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipeline_in_half_precision_on_gpu_matches_float32():
    from deblend.io import read_image
    from deblend.pipeline import Deblender

    image = read_image("data/sample_0000.fits")
    full = Deblender(device="cuda").run(image)
    half = Deblender(device="cuda", half=True).run(image)
    n_full, n_half = len(full.catalog), len(half.catalog)
    assert abs(n_full - n_half) <= max(2, 0.02 * n_full)
    assert np.mean((full.labels > 0) == (half.labels > 0)) > 0.99
