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
    shifted_right = copies.inputs[2]  # a 16 px image moves by two pixels, the edge column repeated
    assert torch.equal(shifted_right[..., 2:], images[0][..., :-2])
    assert torch.equal(shifted_right[..., 1], images[0][..., 0])
    assert all(not torch.equal(copies.inputs[2 + 2 * k], images[0]) for k in range(4))


def test_the_shift_scales_with_the_image_size() -> None:
    images = torch.rand(1, 3, 64, 64)
    copies, _ = with_shifted_copies(Examples(images, None))
    assert torch.equal(copies.inputs[1][..., 8:], images[0][..., :-8])


def test_token_inputs_come_back_with_four_copies_each_missing_one_inner_token() -> None:
    ids = torch.tensor([[101, 11, 12, 13, 14, 15, 16, 102, 0, 0], [101, 21, 22, 102, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    copies, sources = with_shifted_copies(Examples({"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 1])))
    assert sources.tolist() == [0, 1] * 5 and copies.labels.tolist() == [0, 1] * 5
    assert torch.equal(copies.inputs["input_ids"][:2], ids)
    long_copies = copies.inputs["input_ids"][2::2]
    dropped = [sorted(set(ids[0].tolist()) - set(row.tolist())) for row in long_copies]
    assert all(len(d) == 1 and d[0] not in (101, 102) for d in dropped), "one inner token each, never a special one"
    assert len({d[0] for d in dropped}) == 4, "at four different places"
    assert (copies.inputs["attention_mask"][2::2].sum(1) == mask[0].sum() - 1).all()
    assert torch.equal(long_copies[0][:2], ids[0][:2]) and long_copies[0][-1] == 0, "the rest moves up one place"
    short_copies = copies.inputs["input_ids"][3::2]
    assert all(row[0] == 101 and 102 in row.tolist() for row in short_copies)


def test_token_ids_without_a_mask_repeat_their_last_token_in_the_freed_place() -> None:
    ids = torch.tensor([[5, 11, 12, 13, 14, 15, 16, 7]])
    copies, sources = with_shifted_copies(Examples(ids, None))
    assert sources.tolist() == [0] * 5
    assert all(row.tolist()[-2:] == [7, 7] and row[0] == 5 and len(set(row.tolist())) == 7 for row in copies.inputs[1:])


def test_other_inputs_are_not_copied() -> None:
    tokens = {"input_ids": torch.ones(3, 8, dtype=torch.long)}
    copies, sources = with_shifted_copies(Examples(tokens, None))
    assert copies.inputs is tokens and sources.tolist() == [0, 1, 2]
    flat = torch.rand(3, 5)
    assert with_shifted_copies(Examples(flat, None))[0].inputs is flat
