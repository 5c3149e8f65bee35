"""The demo's judge and fidelity metrics on inputs whose answers are known."""

import math

import numpy as np
import pytest

from edit_jax.eval import real_data
from edit_jax.eval.judge import Judge, frechet_distance
from edit_jax.eval.metrics import psnr, ssim


@pytest.fixture(scope="module")
def digits():
    images, labels = real_data.load_images("digits")
    return real_data.split(images, labels, 0.2, seed=0)


@pytest.fixture(scope="module")
def judge(digits):
    return Judge(seed=0).fit(*digits[0])


def test_the_split_is_stratified_disjoint_and_seeded(digits):
    (train_x, train_y), (test_x, test_y) = digits
    assert len(train_y) + len(test_y) == 1797
    assert np.all(np.abs(np.bincount(test_y) / len(test_y) - np.bincount(train_y) / len(train_y)) < 0.01)
    again = real_data.split(*real_data.load_images("digits"), 0.2, seed=0)
    np.testing.assert_array_equal(again[1][0], test_x)
    flat = {x.tobytes() for x in train_x}
    assert sum(x.tobytes() in flat for x in test_x) <= 5  # the digits set holds a few exact duplicates


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_images_to_latents_and_back_is_exact_and_latents_fit_2x2_tokens(digits, patch):
    images = digits[1][0][:5]
    latents = real_data.to_latents(images, patch)
    assert latents.shape[1] == patch * patch and latents.shape[2] % 2 == 0 and latents.min() >= -1
    np.testing.assert_allclose(real_data.to_images(latents, patch, images.shape[1:]), images, atol=1e-6)


def test_the_judge_classifies_real_test_digits_well(digits, judge):
    assert judge.accuracy(*digits[1]) > 0.9


def test_a_shuffled_label_set_gives_chance_accuracy(digits, judge):
    images, labels = digits[1]
    shuffled = np.random.default_rng(0).permutation(labels)
    assert abs(judge.accuracy(images, shuffled) - 0.1) < 0.06


def test_identical_sets_have_frechet_distance_zero_and_different_ones_do_not(digits, judge):
    (train_x, _), (test_x, _) = digits
    assert judge.frechet_distance(test_x, test_x) < 1e-6
    noise = np.random.default_rng(0).uniform(size=test_x.shape)
    assert judge.frechet_distance(test_x, noise) > 10 * max(judge.frechet_distance(train_x[: len(test_x)], test_x), 1e-3)


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = 2.0 * rng.standard_normal((20000, 3)) + 1.0  # mean 1, std 2 per axis
    expected = 3 * 1.0 + 3 * (1 + 4 - 2 * 2)  # |mu|^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)


def test_identical_sets_give_psnr_inf_and_ssim_one():
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8))
    assert math.isinf(psnr(x, x)) and ssim(x, x) == pytest.approx(1.0)


def test_psnr_is_ten_log10_of_range_squared_over_mse():
    ref = np.zeros((2, 8, 8))
    ref[0, 0, 0] = 1.0  # data range 1
    test = ref + 0.1
    assert psnr(ref, test) == pytest.approx(20.0)


def test_sets_of_different_shapes_are_one_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        ssim(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))
