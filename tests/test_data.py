"""Specification of the replay copies that calibrate the gate (``pnc_surgery.data.with_shifted_copies``)."""

import torch

from pnc_surgery.data import Examples, with_shifted_copies


def test_images_come_back_with_four_shifted_copies_that_name_their_original() -> None:
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    labels = torch.tensor([3, 4])
    copies, sources = with_shifted_copies(Examples(images, labels))
    assert copies.inputs.shape == (10, 1, 16, 16)
    assert torch.equal(copies.inputs[:2], images)
    assert sources.tolist() == [0, 1] * 5 and copies.labels.tolist() == [3, 4] * 5
    shifted_right = copies.inputs[2]  # a 16 px image moves by one pixel, the edge column repeated
    assert torch.equal(shifted_right[..., 1:], images[0][..., :-1])
    assert torch.equal(shifted_right[..., 0], images[0][..., 0])
    assert all(not torch.equal(copies.inputs[2 + 2 * k], images[0]) for k in range(4))


def test_the_shift_scales_with_the_image_size() -> None:
    images = torch.rand(1, 3, 64, 64)
    copies, _ = with_shifted_copies(Examples(images, None))
    assert torch.equal(copies.inputs[1][..., 4:], images[0][..., :-4])


def test_text_inputs_are_not_copied() -> None:
    tokens = {"input_ids": torch.ones(3, 8, dtype=torch.long), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    copies, sources = with_shifted_copies(Examples(tokens, None))
    assert copies.inputs is tokens and sources.tolist() == [0, 1, 2]
