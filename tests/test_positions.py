"""Token positions read off a left-padded batch, on hand-made ids (image token 9)."""

import pytest
import torch

from vlmstates.extraction.positions import find_positions

IMAGE = 9


def test_positions_discount_each_rows_left_padding():
    input_ids = torch.tensor([[0, 0, 5, 9, 9, 7, 8], [5, 9, 9, 9, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    positions = find_positions(input_ids, mask, IMAGE)
    assert positions.vision_padded.tolist() == [4, 3] and positions.query_padded.tolist() == [6, 6]
    assert positions.vision == [2, 3] and positions.query == [4, 6]
    assert positions.num_prompt_tokens == [5, 7] and positions.num_image_tokens == [2, 3]


def test_a_padding_id_equal_to_the_image_token_is_not_an_image_token():
    positions = find_positions(torch.tensor([[9, 5, 9, 8]]), torch.tensor([[0, 1, 1, 1]]), IMAGE)
    assert positions.vision == [1] and positions.num_image_tokens == [1]


@pytest.mark.parametrize(
    "input_ids, mask, message",
    [
        ([[5, 9, 8, 0]], [[1, 1, 1, 0]], "not left-padded"),
        (
            [[5, 6, 8], [5, 9, 8]],
            [[1, 1, 1], [1, 1, 1]],
            r"no image token \(id 9\) in the prompt of batch row\(s\) \[0\]",
        ),
    ],
)
def test_bad_batches_are_refused(input_ids, mask, message):
    with pytest.raises(ValueError, match=message):
        find_positions(torch.tensor(input_ids), torch.tensor(mask), IMAGE)
