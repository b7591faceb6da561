"""monkeytrain.data.mixing: per-sample MixUp and CutMix drawn from the run's generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monkeytrain.data import mixing
from monkeytrain.data.mixing import MixSettings, batch_mixer, cutmix_box, mix, sample_beta, sample_log_gamma

CPU = torch.device("cpu")
BATCH, HEIGHT, WIDTH = 8, 12, 20  # not square, so swapped sides would show
MIXUP = MixSettings(mixup_alpha=1.0)
CUTMIX = MixSettings(cutmix_alpha=1.0)
BOTH = MixSettings(mixup_alpha=0.8, cutmix_alpha=1.0)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant_batch(batch: int = BATCH, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """Sample k filled with the value k: every output pixel says where it came from."""
    return torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1).expand(batch, 3, height, width).clone()


def mix_constant(settings: MixSettings, batch: int = BATCH, seed: int = 0, **sides):
    """mix() of constant_batch with labels 0..B-1: (images, outputs, targets)."""
    images = constant_batch(batch, **sides)
    out, targets = mix(images, torch.arange(batch), batch, settings, generator(seed))
    return images, out, targets


def own_share(targets: torch.Tensor) -> torch.Tensor:
    """lam_i = target[i, y_i], with labels 0..B-1."""
    return targets.diagonal()


def assert_targets_pair_each_sample_with_its_mirror(targets: torch.Tensor):
    batch = targets.shape[0]
    np.testing.assert_allclose(targets.sum(dim=1).numpy(), np.ones(batch), atol=1e-6)
    allowed = torch.eye(batch, dtype=torch.bool) | torch.eye(batch, dtype=torch.bool).flip(1)
    assert (targets[~allowed] == 0).all()
    np.testing.assert_allclose(targets.diagonal().numpy(), 1 - targets.flip(1).diagonal().numpy(), atol=1e-6)


def assert_mixup(out: torch.Tensor, targets: torch.Tensor):
    """Every pixel of sample i is lam_i * i + (1 - lam_i) * (B-1-i)."""
    batch = out.shape[0]
    lam = own_share(targets).view(-1, 1, 1, 1)
    own, partner = torch.arange(batch).view(-1, 1, 1, 1), torch.arange(batch).flip(0).view(-1, 1, 1, 1)
    np.testing.assert_allclose(out.numpy(), (lam * own + (1 - lam) * partner).expand_as(out).numpy(), atol=1e-5)
    assert_targets_pair_each_sample_with_its_mirror(targets)


def assert_cutmix(out: torch.Tensor, targets: torch.Tensor):
    """Each pixel comes whole from sample i or B-1-i; the partner's pixels are one rectangle, the
    same in every channel, whose area fraction is exactly 1 - lam_i."""
    batch, _, height, width = out.shape
    own = torch.arange(batch, dtype=out.dtype).view(-1, 1, 1, 1)
    from_partner = out == own.flip(0)
    assert (from_partner | (out == own)).all()
    assert (from_partner == from_partner[:, :1]).all()
    for i in range(batch):
        rows, cols = from_partner[i, 0].nonzero(as_tuple=True)
        area = len(rows)
        assert abs((1 - own_share(targets)[i].item()) * height * width - area) < 1e-3
        if area:
            rectangle = torch.zeros(height, width, dtype=torch.bool)
            rectangle[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(from_partner[i, 0], rectangle)
    assert_targets_pair_each_sample_with_its_mirror(targets)


# --- sample_beta ------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_sample_beta_has_the_mean_and_variance_of_beta_alpha_alpha(alpha):
    count = 200_000
    draws = sample_beta(alpha, count, generator(1), CPU)
    assert draws.shape == (count,) and draws.dtype == torch.float32
    assert draws.min() >= 0 and draws.max() <= 1
    variance = 1 / (4 * (2 * alpha + 1))
    fourth_moment = variance ** 2 * (3 - 6 / (2 * alpha + 3))  # symmetric Beta: excess kurtosis -6/(2a+3)
    x = draws.double()
    # within five standard errors of the exact moments
    assert abs(x.mean().item() - 0.5) < 5 * math.sqrt(variance / count)
    assert abs(x.var().item() - variance) < 5 * math.sqrt((fourth_moment - variance ** 2) / count)


def test_sample_beta_keeps_tiny_alphas_finite():
    # Gamma(0.02) draws underflow float32 as plain numbers; Beta must not become 0 / 0.
    draws = sample_beta(0.02, 10_000, generator(2), CPU)
    assert torch.isfinite(draws).all() and draws.min() >= 0 and draws.max() <= 1
    assert ((draws < 0.01) | (draws > 0.99)).double().mean() > 0.9  # nearly all mass at the ends


def test_sample_beta_is_reproducible_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    first = sample_beta(0.5, 1000, generator(3), CPU)
    assert torch.equal(first, sample_beta(0.5, 1000, generator(3), CPU))
    assert not torch.equal(first, sample_beta(0.5, 1000, generator(4), CPU))
    assert torch.equal(torch.get_rng_state(), before)


def test_sample_beta_refuses_a_non_positive_alpha():
    with pytest.raises(ValueError, match="alpha"):
        sample_beta(0.0, 4, generator(), CPU)


def scripted_normals(rows: list[float]):
    """A torch.randn whose candidate k is rows[k] for every sample."""
    def fake_randn(*size, generator=None, device=None, **kwargs):
        shape = size[0] if len(size) == 1 else size
        return torch.tensor(rows).view(-1, *[1] * (len(shape) - 1)).expand(shape).clone()
    return fake_randn


def test_gamma_takes_the_first_accepted_candidate_and_falls_back_to_the_mean():
    shape, d = 2.0, 2.0 - 1 / 3
    huge_negative = -1e3  # 1 + c x < 0: always rejected
    first_accepted = [huge_negative] * 3 + [0.0, 0.7] + [0.3] * (mixing.CANDIDATES - 5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mixing.torch, "randn", scripted_normals(first_accepted))
        # x = 0 gives v = 1, accepted whenever u < 1, and Gamma = d * v = d
        np.testing.assert_allclose(sample_log_gamma(shape, (5,), generator(), CPU).exp().numpy(), d, rtol=1e-6)
        patch.setattr(mixing.torch, "randn", scripted_normals([huge_negative] * mixing.CANDIDATES))
        np.testing.assert_allclose(sample_log_gamma(shape, (5,), generator(), CPU).exp().numpy(), shape, rtol=1e-6)


# --- MixUp and CutMix on known inputs ---------------------------------------------------------

def test_mixup_blends_each_sample_with_its_mirror_by_its_target_share():
    _, out, targets = mix_constant(MIXUP)
    assert_mixup(out, targets)
    lam = own_share(targets)
    assert (lam < 1).all() and len(lam.unique()) == BATCH  # all mixed, each with its own ratio


def test_cutmix_pastes_one_rectangle_whose_area_matches_the_target():
    _, out, targets = mix_constant(CUTMIX, batch=32)
    assert_cutmix(out, targets)
    lam = own_share(targets)
    assert (lam < 1).sum() > 20 and len(lam.unique()) > 10


def timm_box(lam: float, centre_y: int, centre_x: int, height: int, width: int):
    """timm.data.mixup.rand_bbox and cutmix_bbox_and_lam (timm 1.0), given the centre it would draw.

    Written out rather than imported: importing timm costs seconds, more than this whole file.
    """
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top, bottom = np.clip(centre_y - cut_h // 2, 0, height), np.clip(centre_y + (cut_h + 1) // 2, 0, height)
    left, right = np.clip(centre_x - cut_w // 2, 0, width), np.clip(centre_x + (cut_w + 1) // 2, 0, width)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / float(height * width)


def test_cutmix_box_matches_timm_rand_bbox_and_its_lam_correction():
    cases = [(lam, y, x) for lam in (0.0, 0.1, 0.37, 0.5, 0.75, 0.9, 0.99, 1.0)
             for y, x in ((0, 0), (5, 9), (11, 19), (2, 17), (9, 1))]
    lam = torch.tensor([case[0] for case in cases])
    centre_y = torch.tensor([float(case[1]) for case in cases])
    centre_x = torch.tensor([float(case[2]) for case in cases])
    box, corrected = cutmix_box(lam, centre_y, centre_x, HEIGHT, WIDTH)
    assert box.shape == (len(cases), 1, HEIGHT, WIDTH)
    for i, (_, y, x) in enumerate(cases):
        # the same float32 number for both
        (top, bottom, left, right), timm_lam = timm_box(lam[i].item(), y, x, HEIGHT, WIDTH)
        expected = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
        expected[top:bottom, left:right] = True
        assert torch.equal(box[i, 0], expected), cases[i]
        assert abs(corrected[i].item() - timm_lam) < 1e-6


def test_box_centres_cover_the_whole_image():
    centre_y, centre_x = mixing.random_centres(4000, HEIGHT, WIDTH, generator(5), CPU)
    assert set(centre_y.tolist()) == set(range(HEIGHT)) and set(centre_x.tolist()) == set(range(WIDTH))


def test_probability_zero_leaves_images_and_one_hot_targets():
    settings = MixSettings(mixup_alpha=1.0, cutmix_alpha=1.0, probability=0.0)
    images, out, targets = mix_constant(settings)
    assert torch.equal(out, images)
    assert torch.equal(targets, torch.eye(BATCH))


def mix_many(settings: MixSettings, batch: int = 4000, side: int = 2):
    """A large batch of tiny constant images, two classes: (images, outputs), for shares of samples."""
    images = constant_batch(batch, side, side)
    return images, mix(images, torch.arange(batch) % 2, 2, settings, generator(12))[0]


def test_probability_is_the_share_of_samples_mixed():
    images, out = mix_many(MixSettings(mixup_alpha=1.0, probability=0.3))
    assert abs((out != images).flatten(1).any(dim=1).double().mean().item() - 0.3) < 0.03


def test_with_both_on_switch_probability_zero_is_mixup_and_one_is_cutmix():
    _, out, targets = mix_constant(MixSettings(mixup_alpha=1.0, cutmix_alpha=1.0, switch_probability=0.0))
    assert_mixup(out, targets)
    assert (own_share(targets) < 1).all()
    _, out, targets = mix_constant(MixSettings(mixup_alpha=1.0, cutmix_alpha=1.0, switch_probability=1.0),
                                   batch=32)
    assert_cutmix(out, targets)
    assert (own_share(targets) < 1).sum() > 20


def test_with_both_on_switch_probability_is_the_share_of_cutmix_samples():
    images, out = mix_many(MixSettings(mixup_alpha=1.0, cutmix_alpha=1.0, switch_probability=0.3), side=4)
    own = images[:, :1, :1, :1]
    whole_pixels = ((out == own) | (out == own.flip(0))).flatten(1).all(dim=1)  # CutMix (or lam 1)
    assert abs(whole_pixels.double().mean().item() - 0.3) < 0.03


def test_an_odd_batch_leaves_its_middle_sample_as_it_is():
    images, out, targets = mix_constant(BOTH, batch=5)
    assert torch.allclose(out[2], images[2]) and torch.allclose(targets[2], torch.eye(5)[2])
    assert not torch.allclose(out[[0, 1, 3, 4]], images[[0, 1, 3, 4]])


# --- disabled settings ------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [MixSettings(), MixSettings(mixup_alpha=1.0, cutmix_alpha=1.0, probability=0.0)])
def test_enabled_needs_an_alpha_and_a_probability(settings):
    assert not settings.enabled
    assert MIXUP.enabled and CUTMIX.enabled and BOTH.enabled


def test_disabled_settings_return_the_images_and_one_hot_targets_and_draw_nothing():
    images, source = constant_batch(), generator(6)
    state = source.get_state()
    out, targets = mix(images, torch.tensor([3, 0, 1, 1, 2, 0, 3, 2]), 4, MixSettings(), source)
    assert out is images
    assert torch.equal(targets, torch.eye(4)[[3, 0, 1, 1, 2, 0, 3, 2]]) and targets.dtype == torch.float32
    assert torch.equal(source.get_state(), state)


# --- tensors out ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_output_keeps_dtype_shape_and_memory_format(dtype, channels_last):
    images = torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=generator(7)).to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=memory_format)
    out, targets = mix(images, torch.arange(BATCH) % 3, 3, BOTH, generator(8))
    assert out.shape == images.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=memory_format) and out.is_contiguous() != channels_last
    assert targets.shape == (BATCH, 3) and targets.dtype == torch.float32
    assert not torch.equal(out, images)


def test_the_same_seed_gives_the_same_mix_and_the_global_rng_is_untouched():
    images, labels = torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=generator(9)), torch.arange(BATCH) % 5
    before = torch.get_rng_state()
    first = mix(images, labels, 5, BOTH, generator(10))
    again = mix(images, labels, 5, BOTH, generator(10))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = mix(images, labels, 5, BOTH, generator(11))
    assert not torch.equal(first[1], other[1])
    source = generator(10)
    mix(images, labels, 5, BOTH, source)
    assert not torch.equal(first[1], mix(images, labels, 5, BOTH, source)[1])  # fresh draws each batch
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mix_on_cuda_never_synchronises_with_the_host():
    device = torch.device("cuda")
    images = torch.randn(BATCH, 3, HEIGHT, WIDTH, device=device).contiguous(memory_format=torch.channels_last)
    labels, source = torch.arange(BATCH, device=device) % 3, torch.Generator(device=device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, targets = mix(images, labels, 3, BOTH, source)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(targets.sum(dim=1), torch.ones(BATCH, device=device))


# --- the training loop's mixer ----------------------------------------------------------------

def test_the_mixer_with_mixing_off_keeps_the_batch_and_its_integer_labels():
    images, labels, source = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1]), generator(8)
    state = source.get_state()
    out, targets = batch_mixer(MixSettings(), 3, source)(images, labels)
    assert out is images and targets is labels
    assert torch.equal(source.get_state(), state)


def test_the_mixer_with_mixing_on_is_mix_with_the_run_generator():
    images, labels = torch.randn(4, 3, 2, 2, generator=generator(9)), torch.tensor([0, 1, 2, 1])
    out, targets = batch_mixer(MIXUP, 3, generator(10))(images, labels)
    expected_images, expected_targets = mix(images, labels, 3, MIXUP, generator(10))
    assert torch.equal(out, expected_images) and torch.equal(targets, expected_targets)
    assert targets.shape == (4, 3)
