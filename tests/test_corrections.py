"""The corrections folder as training data: what the review station writes, read back."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from digitwatch.errors import DataError
from digitwatch.training import corrections


def _card(folder, sha, label, crops, **extra):
    np.save(folder / f"{sha[:32]}.npy", crops.astype(np.float32), allow_pickle=False)
    (folder / f"{sha[:32]}.json").write_text(json.dumps(
        {"sha256": sha, "label": label, "inputs": f"{sha[:32]}.npy", **extra}))


class TestLoad:
    """One labelled input per digit where the cut matches the answer; the rest counted, not used."""

    def test_matching_cuts_become_examples_and_a_share_is_held_out(self, tmp_path):
        rng = np.random.default_rng(0)
        shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
        for sha in shas:
            _card(tmp_path, sha, "47", rng.random((2, 28, 28)))
        _card(tmp_path, "ff" * 32, "123", rng.random((2, 28, 28)))  # cut into 2, answered with 3 digits
        _card(tmp_path, "fe" * 32, None, rng.random((1, 28, 28)), unreadable=True)
        c = corrections.load(tmp_path)
        assert c.decisions == 42 and c.unusable == 2
        assert len(c.x_train) + len(c.x_held) == 80
        assert 0 < len(c.x_held) < len(c.x_train)
        assert set(c.y_train.tolist()) == {4, 7} and c.x_train.shape[1:] == (28, 28)
        again = corrections.load(tmp_path)  # the split is by sha256: the same every time
        assert np.array_equal(again.x_held, c.x_held)

    def test_a_broken_or_linked_card_is_skipped(self, tmp_path):
        _card(tmp_path, "aa" * 32, "5", np.zeros((1, 28, 28)))
        (tmp_path / "torn.json").write_text('{"sha256": ')
        (tmp_path / "link.json").symlink_to(tmp_path / "torn.json")
        c = corrections.load(tmp_path)
        assert c.decisions == 1 and c.unusable == 2

    def test_an_empty_folder_is_a_data_error(self, tmp_path):
        with pytest.raises(DataError):
            corrections.load(tmp_path)
