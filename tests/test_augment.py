"""monkeytrain.data.augment: batched augmentation of uint8 stored views, and the evaluation framing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from graph_emulator import EmulatedGraphs
from monkeytrain.data import augment
from monkeytrain.data.augment import (Augmenter, AugmentSettings, EvalViews, color_jitter, normalize,
                                      random_affine, warp)
from monkeytrain.errors import UserError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
IMAGE = 24
SIDE = 27  # floor(24 / 0.875), as timm frames it
CPU = torch.device("cpu")
STILL = AugmentSettings(min_crop_scale=1.0, rotation=0.0, color_jitter=0.0, hflip=0.0)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_views(batch: int = 4, side: int = SIDE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator(seed))


def augmenter(seed: int = 0, mean=MEAN, std=STD, **settings) -> Augmenter:
    return Augmenter(AugmentSettings(**settings), IMAGE, mean, std, generator(seed))


def angle_and_crop(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Undo theta = R(angle) @ [[f*w, 0, cx], [0, h, cy]] (the documented composition)."""
    linear = theta[:, :, :2]
    angle = torch.atan2(-theta[:, 0, 1], theta[:, 1, 1])  # second column is h * (-sin, cos)
    cos, sin = angle.cos(), angle.sin()
    unrotated_x = cos * theta[:, 0, 2] + sin * theta[:, 1, 2]  # R^T @ translation
    unrotated_y = -sin * theta[:, 0, 2] + cos * theta[:, 1, 2]
    return {
        "degrees": torch.rad2deg(angle),
        "signed_area": torch.linalg.det(linear),  # rotation keeps area; a flip makes it negative
        "width": linear[:, :, 0].norm(dim=1),
        "height": linear[:, :, 1].norm(dim=1),
        "centre_x": unrotated_x,
        "centre_y": unrotated_y,
    }


def scripted_affine(settings: AugmentSettings, draws: list[float]) -> torch.Tensor:
    """random_affine for one sample whose uniform draws are these constants, in its order:
    area, aspect, centre x, centre y, flip (when enabled), angle."""
    queue = list(draws)

    def fake_rand(*size, generator=None, device=None, **kwargs):
        assert queue, "random_affine drew more numbers than scripted"
        return torch.full(size, queue.pop(0), device=device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(augment.torch, "rand", fake_rand)
        theta = random_affine(1, settings, generator(), CPU)
    assert not queue, "random_affine drew fewer numbers than scripted"
    return theta


# --- shapes, dtypes, ranges -------------------------------------------------------------------

def test_train_output_is_a_normalised_float_channels_last_batch_of_the_image_size():
    out = augmenter().train(noise_views(batch=5))
    assert out.shape == (5, 3, IMAGE, IMAGE) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not out.is_contiguous()  # really channels_last, not a contiguous NCHW tensor
    assert torch.isfinite(out).all()


def test_eval_output_is_a_float_channels_last_batch_of_the_image_size():
    out = augmenter().eval(noise_views(batch=3))
    assert out.shape == (3, 3, IMAGE, IMAGE) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fill", [None, 255, 0])
def test_warp_and_jitter_keep_pixels_in_the_unit_range(fill):
    # mean 0, std 1: the output is the pre-normalisation image. Strong jitter and rotation.
    views = noise_views(batch=16, seed=1) if fill is None else torch.full((16, 3, SIDE, SIDE), fill, dtype=torch.uint8)
    out = augmenter(seed=2, mean=[0, 0, 0], std=[1, 1, 1], color_jitter=0.9, rotation=45.0).train(views)
    assert out.min() >= 0.0 and out.max() <= 1.0
    if fill == 255:  # brightening white must clip at 1, not overflow
        assert out.max() == 1.0


# --- the affine warp --------------------------------------------------------------------------

def test_an_identity_map_reproduces_the_input():
    images = noise_views(batch=3).float() / 255
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3)
    np.testing.assert_allclose(warp(images, theta, SIDE).numpy(), images.numpy(), atol=1e-5)


def test_a_mirrored_map_is_a_horizontal_flip():
    images = noise_views(batch=2).float() / 255
    theta = torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    np.testing.assert_allclose(warp(images, theta, SIDE).numpy(), torch.flip(images, dims=[3]).numpy(), atol=1e-5)


def test_full_crop_without_rotation_flip_or_jitter_reproduces_the_input():
    views = noise_views(batch=32, side=IMAGE)  # views of the output size: the map is the identity
    out = Augmenter(STILL, IMAGE, [0, 0, 0], [1, 1, 1], generator(0)).train(views)
    np.testing.assert_allclose(out.numpy(), views.float().numpy() / 255, atol=1e-5)


def test_sampled_flip_mirrors_the_image():
    # full crop, square aspect (draw 0.5), flip drawn (< 0.5), no rotation (draw 0.5)
    settings = AugmentSettings(min_crop_scale=1.0, rotation=15.0, color_jitter=0.0, hflip=0.5)
    theta = scripted_affine(settings, [1.0, 0.5, 0.5, 0.5, 0.2, 0.5])
    image = noise_views(batch=1, side=IMAGE).float() / 255
    np.testing.assert_allclose(warp(image, theta, IMAGE).numpy(), torch.flip(image, dims=[3]).numpy(), atol=1e-4)


def test_a_sampled_90_degree_rotation_matches_torchvision_rotate():
    # full crop, square aspect, angle draw 1.0 -> +rotation = +90 degrees (anticlockwise)
    settings = AugmentSettings(min_crop_scale=1.0, rotation=90.0, color_jitter=0.0, hflip=0.0)
    theta = scripted_affine(settings, [1.0, 0.5, 0.5, 0.5, 1.0])
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, 1, 5] = 1.0  # a red dot up and to the right
    image[0, 1, :2, :] = 1.0  # a green band along the top
    image[0, 2] = torch.rand(8, 8, generator=generator(3))
    expected = TF.rotate(image, 90)
    assert not torch.allclose(expected, image)
    np.testing.assert_allclose(warp(image, theta, 8).numpy(), expected.numpy(), atol=1e-4)
    # and by hand: anticlockwise moves the top band to the left edge
    assert torch.allclose(warp(image, theta, 8)[0, 1, :, :2], torch.ones(8, 2), atol=1e-4)


def test_rotation_crop_and_flip_are_sampled_within_the_configured_ranges():
    settings = AugmentSettings(min_crop_scale=0.35, rotation=15.0, color_jitter=0.0, hflip=0.5)
    parts = angle_and_crop(random_affine(4000, settings, generator(5), CPU))
    area = parts["signed_area"].abs()
    assert area.min() >= 0.35 - 1e-5 and area.max() <= 1 + 1e-5
    assert area.min() < 0.37 and area.max() > 0.95  # the whole range is used
    degrees = parts["degrees"]
    assert degrees.abs().max() <= 15 + 1e-3
    assert degrees.min() < -14 and degrees.max() > 14
    flipped = (parts["signed_area"] < 0).double().mean()
    assert 0.45 < flipped < 0.55
    aspect = parts["width"] / parts["height"]
    assert aspect.min() >= 3 / 4 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    # before rotation the crop lies inside the view
    assert (parts["centre_x"].abs() <= 1 - parts["width"] + 1e-5).all()
    assert (parts["centre_y"].abs() <= 1 - parts["height"] + 1e-5).all()


def test_no_flip_and_no_rotation_when_disabled():
    settings = AugmentSettings(min_crop_scale=0.5, rotation=0.0, color_jitter=0.0, hflip=0.0)
    theta = random_affine(500, settings, generator(1), CPU)
    parts = angle_and_crop(theta)
    assert (parts["signed_area"] > 0).all()
    assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()


def test_crop_area_never_falls_below_a_large_min_crop_scale():
    settings = AugmentSettings(min_crop_scale=0.9, rotation=0.0, color_jitter=0.0, hflip=0.0)
    area = angle_and_crop(random_affine(2000, settings, generator(2), CPU))["signed_area"]
    assert area.min() >= 0.9 - 1e-5


# --- horizontal flip (--hflip) ----------------------------------------------------------------

def random_affine_before_hflip(batch: int, settings: AugmentSettings, generator: torch.Generator,
                               device: torch.device) -> torch.Tensor:
    """random_affine as it was before --hflip, flipping with chance 1/2 (copied as it was): the default
    --hflip 0.5 must give a run the same crops, bit for bit, and leave its generator where it did."""
    def uniform(low, high):
        return torch.rand(batch, generator=generator, device=device) * (high - low) + low

    area = uniform(settings.min_crop_scale, 1.0)
    aspect = torch.exp(uniform(math.log(augment.ASPECT_RANGE[0]), math.log(augment.ASPECT_RANGE[1])))
    aspect = torch.minimum(torch.maximum(aspect, area), 1 / area)
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()
    centre_x, centre_y = uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    angle = uniform(-1, 1) * math.radians(settings.rotation)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([
        torch.stack([cos * flip * width, -sin * height, cos * centre_x - sin * centre_y], dim=1),
        torch.stack([sin * flip * width, cos * height, sin * centre_x + cos * centre_y], dim=1),
    ], dim=1)


@pytest.mark.parametrize("seed", [0, 7])
def test_the_default_flip_chance_draws_exactly_what_the_flip_drew_before(seed):
    now, before = generator(seed), generator(seed)
    assert AugmentSettings().hflip == 0.5
    assert torch.equal(random_affine(257, AugmentSettings(), now, CPU),
                       random_affine_before_hflip(257, AugmentSettings(), before, CPU))
    assert torch.equal(now.get_state(), before.get_state())


@pytest.mark.parametrize("chance, low, high", [(0.0, 0.0, 0.0), (0.2, 0.17, 0.23), (1.0, 1.0, 1.0)])
def test_the_flip_chance_is_the_share_of_mirrored_crops(chance, low, high):
    settings = AugmentSettings(hflip=chance)
    mirrored = (angle_and_crop(random_affine(4000, settings, generator(4), CPU))["signed_area"] < 0).double().mean()
    assert low <= mirrored <= high


def test_hflip_0_warps_unmirrored_and_hflip_1_mirrors_even_at_the_highest_draw():
    crop, angle = [0.8, 0.3, 0.7, 0.2], 0.6  # area, aspect, centre x, centre y; a 3-degree rotation
    image = noise_views(batch=1).float() / 255
    unflipped = warp(image, scripted_affine(AugmentSettings(hflip=0.0), [*crop, angle]), IMAGE)  # draws no flip
    mirrored = warp(image, scripted_affine(AugmentSettings(hflip=1.0), [*crop, 0.9999, angle]), IMAGE)
    np.testing.assert_allclose(mirrored.numpy(), unflipped.flip(dims=[3]).numpy(), atol=1e-5)
    assert not torch.allclose(mirrored, unflipped, atol=1e-2)
    half = AugmentSettings(hflip=0.5)  # the comparison as before: a draw below 0.5 flips
    assert torch.equal(warp(image, scripted_affine(half, [*crop, 0.4999, angle]), IMAGE), mirrored)
    assert torch.equal(warp(image, scripted_affine(half, [*crop, 0.5, angle]), IMAGE), unflipped)


@pytest.mark.parametrize("settings", [{"hflip": 0.3}, {"random_erasing": 0.5}])
def test_a_chance_replayed_from_a_graph_draws_anew_as_the_eager_step_does(settings):
    """As --cuda-graphs captures it: the chance is a number on the host, the draws tensor ops; no host sync,
    nothing frozen at capture: each replay is the next eager batch (a flip or an erased rectangle alike)."""
    views = noise_views(batch=16)
    eager, graphed = augmenter(seed=3, **settings), augmenter(seed=3, **settings)
    expected = [eager.train(views) for _ in range(3)]
    outputs: list[torch.Tensor] = []
    replay = EmulatedGraphs().capture(lambda: outputs.append(graphed.train(views)))
    for eager_batch in expected:
        replay()
        assert torch.equal(outputs[0], eager_batch)
    assert not torch.equal(expected[0], expected[1])
    assert torch.equal(graphed.generator.get_state(), eager.generator.get_state())


# --- randomness -------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    views = noise_views(batch=6)
    first = augmenter(seed=11).train(views)
    assert torch.equal(first, augmenter(seed=11).train(views))
    assert not torch.allclose(first, augmenter(seed=12).train(views))
    # one augmenter draws afresh for each batch
    repeated = augmenter(seed=11)
    repeated.train(views)
    assert not torch.allclose(first, repeated.train(views))


def test_each_sample_of_a_batch_gets_its_own_augmentation():
    views = noise_views(batch=1).expand(4, -1, -1, -1)  # four copies of one view
    out = augmenter(seed=0).train(views)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])


# --- evaluation framing -----------------------------------------------------------------------

def test_eval_is_deterministic_and_is_the_normalised_centre_crop():
    views = noise_views(batch=3, seed=4)
    first = augmenter(seed=0).eval(views)
    assert torch.equal(first, augmenter(seed=99).eval(views))
    # 27 - 24 = 3: round(1.5) = 2 rows and columns cut at the top and left, 1 at the bottom and right
    crop = views[:, :, 2:26, 2:26].double() / 255
    expected = (crop - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    np.testing.assert_allclose(first.double().numpy(), expected.numpy(), atol=1e-6)


def test_normalize_uses_the_given_statistics():
    images = torch.full((2, 3, 4, 4), 0.7)
    out = normalize(images, MEAN, STD)
    expected = [(0.7 - m) / s for m, s in zip(MEAN, STD)]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), expected, rtol=1e-6)


# --- colour jitter ----------------------------------------------------------------------------

def test_color_jitter_of_strength_zero_is_the_identity():
    images = noise_views(batch=4).float() / 255
    np.testing.assert_allclose(color_jitter(images, 0.0, generator(0)).numpy(), images.numpy(), atol=1e-6)


def test_color_jitter_scales_a_grey_image_by_a_brightness_factor_within_range():
    # Contrast and saturation leave a uniform grey image alone; brightness multiplies it.
    images = torch.full((64, 3, 5, 5), 0.4)
    out = color_jitter(images, 0.3, generator(1))
    per_sample = out[:, 0, 0, 0]
    assert torch.allclose(out, per_sample.view(-1, 1, 1, 1).expand_as(out), atol=1e-6)  # still uniform grey
    assert per_sample.min() >= 0.4 * 0.7 - 1e-6 and per_sample.max() <= 0.4 * 1.3 + 1e-6
    assert per_sample.min() < 0.4 * 0.8 and per_sample.max() > 0.4 * 1.2


def test_color_jitter_matches_torchvision_brightness_contrast_saturation():
    # Force the factors: draws u give 1 + (2u - 1) * strength for brightness, contrast, saturation.
    strength = 0.4
    draws = torch.tensor([[0.9, 0.2], [0.1, 0.95], [0.75, 0.0]]).view(3, 2, 1, 1, 1)
    factors = 1 + (draws.view(3, 2) * 2 - 1) * strength
    images = noise_views(batch=2, side=8, seed=6).float() / 255

    def fake_rand(*size, generator=None, device=None, **kwargs):
        assert tuple(size) == (3, 2, 1, 1, 1)
        return draws.clone()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(augment.torch, "rand", fake_rand)
        out = color_jitter(images, strength, generator(0))
    for i in range(2):
        expected = TF.adjust_brightness(images[i], float(factors[0, i]))
        expected = TF.adjust_contrast(expected, float(factors[1, i]))
        expected = TF.adjust_saturation(expected, float(factors[2, i]))
        # torchvision's grey weights are 0.2989/0.587/0.114, ours 0.299/0.587/0.114
        np.testing.assert_allclose(out[i].numpy(), expected.numpy(), atol=1e-3)


def test_color_jitter_changes_a_colourful_image():
    images = noise_views(batch=4).float() / 255
    assert (color_jitter(images, 0.5, generator(0)) - images).abs().max() > 0.05


# --- test-time views --------------------------------------------------------------------------

def edge_sums(images: torch.Tensor) -> torch.Tensor:
    """Logits that see orientation: left column, right column and top row sums (per image)."""
    return torch.stack([images[..., :, 0].sum(dim=(1, 2)), images[..., :, -1].sum(dim=(1, 2)),
                        images[..., 0, :].sum(dim=(1, 2))], dim=1)


def test_flip_views_average_an_image_and_its_horizontal_mirror():
    views = EvalViews(2, [0.0] * 3, [1.0] * 3, flip=True)
    stored = torch.tensor([[[1, 2], [3, 4]]], dtype=torch.uint8).expand(1, 3, 2, 2) * 51  # 1/255 steps
    image = views.prepare(stored)
    assert image.shape == (2, 3, 2, 2)  # the view and its mirror, stacked
    one_channel = edge_sums(image[:1, :1] * 5).tolist()
    assert one_channel == [pytest.approx([4.0, 6.0, 3.0])]  # not flip-invariant
    # the mirror swaps the left and right columns and keeps the top row; a vertical flip would give [4, 6, 5]
    averaged = views.averaged(lambda batch: edge_sums(batch[:, :1] * 5))(image)
    assert averaged.tolist() == [pytest.approx([5.0, 5.0, 3.0])]


def test_without_views_evaluation_is_the_centre_crop_alone():
    views = noise_views(batch=3, seed=4)
    plain = EvalViews(IMAGE, MEAN, STD, flip=False)
    assert plain.count == 1
    assert torch.equal(plain.prepare(views), augmenter().eval(views))
    assert torch.equal(plain.averaged(lambda batch: batch)(plain.prepare(views)), augmenter().eval(views))


def test_shifted_views_are_crops_moved_by_the_shift_in_four_directions():
    side, size, shift = 55, 48, 2  # views of 55, not stored_size(48) = 54: a margin of at least 3 on every side
    views = noise_views(batch=2, side=side, seed=5)
    tta = EvalViews(size, [0.0] * 3, [1.0] * 3, flip=True, shift=shift)
    assert tta.count == 10  # 5 crops, each also mirrored
    crops = (tta.prepare(views) * 255).round().to(torch.uint8).unflatten(0, (10, 2))
    centre = 4  # (55 - 48) / 2 = 3.5 rounds to 4, as torchvision's CenterCrop rounds: 4 above, 3 below
    expected = [(centre, centre), (centre, centre - shift), (centre, centre + shift),
                (centre - shift, centre), (centre + shift, centre)]
    for index, (top, left) in enumerate(expected):
        window = views[..., top:top + size, left:left + size]
        assert torch.equal(crops[index], window)
        assert torch.equal(crops[5 + index], window.flip(dims=[3]))


def test_shifted_views_average_the_logits_of_every_view_per_image():
    views = noise_views(batch=3, side=55, seed=6)
    tta = EvalViews(48, MEAN, STD, flip=True, shift=3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 4))
    prepared = tta.prepare(views)
    averaged = tta.averaged(model)(prepared)
    by_view = model(prepared).unflatten(0, (10, 3))
    assert averaged.shape == (3, 4)
    torch.testing.assert_close(averaged, sum(by_view[v] for v in range(10)) / 10)


def test_a_shift_beyond_the_stored_margin_is_one_clear_error():
    assert EvalViews(24, MEAN, STD, flip=True, shift=1).count == 10  # 27 px views: margin 1
    with pytest.raises(UserError, match="--tta-shift 2 reaches beyond the 1-pixel margin"):
        EvalViews(24, MEAN, STD, flip=True, shift=2)


def test_views_follow_the_run_config_and_old_checkpoints_have_no_shift():
    assert EvalViews.of_config({"tta_flip": True}, IMAGE, MEAN, STD).count == 2
    assert EvalViews.of_config({"tta_flip": False, "tta_shift": 1}, IMAGE, MEAN, STD).count == 5


# --- progressive resizing ---------------------------------------------------------------------

def test_training_crops_grow_in_steps_to_the_image_size_for_the_last_quarter():
    sizes = [augment.train_resolution(epoch, 20, 128, 224, 0.25) for epoch in range(1, 21)]
    assert sizes[0] == 128 and sizes[-5:] == [224] * 5 and sizes[-6] < 224  # the last 5 of 20 at full size
    assert sizes == sorted(sizes) and all(size % augment.SIZE_STEP == 0 for size in sizes)
    assert set(sizes) == {128, 144, 160, 176, 192, 208, 224}


def test_without_a_smaller_start_training_crops_are_the_image_size_throughout():
    assert {augment.train_resolution(epoch, 10, 0, 64, 0.25) for epoch in range(1, 11)} == {64}
    assert {augment.train_resolution(epoch, 10, 64, 64, 0.25) for epoch in range(1, 11)} == {64}
    assert {augment.train_resolution(epoch, 10, 32, 64, 1.0) for epoch in range(1, 11)} == {64}


def test_train_crops_take_the_train_size_and_evaluation_the_image_size():
    resizing = augmenter()
    resizing.train_size = 16
    assert resizing.train(noise_views()).shape == (4, 3, 16, 16)
    assert resizing.eval(noise_views()).shape == (4, 3, IMAGE, IMAGE)


def test_a_checkpoint_with_the_largest_shift_of_the_views_before_timms_framing_gets_todays_margin(capsys):
    """Stored views were once rounded to the nearest pixel (110 at 96 px, a 7-pixel margin), now down as timm
    rounds them (109, 6 pixels): a checkpoint saved with --tta-shift 7 has no flag to lower it, so it moves its
    views 6 pixels, with a warning; a shift that was beyond the margin then too is still refused."""
    views = EvalViews.of_config({"tta_shift": 7}, 96, [0.5] * 3, [0.25] * 3)
    assert max(abs(offset) for pair in views.offsets for offset in pair) == 6
    assert "--tta-shift 7, the largest for 96-pixel crops when this run began" in capsys.readouterr().err
    with pytest.raises(UserError, match="use at most 6"):
        EvalViews.of_config({"tta_shift": 8}, 96, [0.5] * 3, [0.25] * 3)


def test_the_shift_of_an_old_checkpoint_is_said_by_the_first_process_of_a_run_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert augment.shift_within_todays_margin(7, 96) == 6
    assert capsys.readouterr().err == ""
