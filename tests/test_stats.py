"""Pseudo-label statistics add up across images and shards, whatever the family adds."""

from engine.labeling import add_stats, empty_stats


def test_family_keys_start_at_zero_and_bookkeeping_is_not_summed():
    total = empty_stats(3)
    a = {"labels": 5, "class_counts": [1, 4, 0], "pixels": 64, "kept_share_hist": [0, 1], "key": "k", "shard": "s"}
    b = {"labels": 2, "class_counts": [0, 0, 2], "pixels": 36, "kept_share_hist": [2, 0, 1]}
    total = add_stats(add_stats(total, a), b)
    assert total["labels"] == 7 and total["class_counts"] == [1, 4, 2] and total["pixels"] == 100
    assert total["kept_share_hist"] == [2, 1, 1]
    assert "key" not in total and "shard" not in total
    assert total["images"] == 0  # counted by the labeling loop, not by label_stats
