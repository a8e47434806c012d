"""Prompt sets: COCO / text readers, their one-sentence errors, the seeded selection rule, calibration disjoint
from evaluation, and the digits phrasings."""
import json

import numpy as np
import pytest

from ldm.data import prompts as P
from ldm.util import UserError


def _coco(path, captions):
    ann = [{"image_id": 100 + i, "id": i, "caption": c} for i, c in enumerate(captions)]
    path.write_text(json.dumps({"info": {}, "images": [], "annotations": ann}))
    return str(path)


def test_coco_reader_returns_captions_in_file_order(tmp_path):
    path = _coco(tmp_path / "captions_val2014.json", ["A dog on a couch. ", "two cats", "a red bus\n"])
    assert P.load_prompts(path) == ["A dog on a couch.", "two cats", "a red bus"]


def test_text_reader_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n   \n  a dog  \nlast line without newline")
    assert P.load_prompts(str(path)) == ["a cat", "a dog", "last line without newline"]


@pytest.mark.parametrize("content,name,fragment", [
    (None, "missing.txt", "does not exist"),
    ("\n  \n", "empty.txt", "holds no prompts"),
    (json.dumps({"images": []}), "captions.json", "no `annotations`"),
    (json.dumps({"annotations": []}), "captions_empty.json", "holds no prompts"),
    (json.dumps({"annotations": [{"id": 1}]}), "bad.json", "no string `caption`"),
    ("{not json", "broken.json", "not valid JSON"),
])
def test_bad_prompt_files_raise_one_sentence(tmp_path, content, name, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as err:
        P.load_prompts(str(path))
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_selection_follows_the_documented_rule_and_is_stable():
    prompts = [f"caption {i}" for i in range(50)]
    sel = P.select_prompts(prompts, 7, seed=3)
    expected = np.random.default_rng(3).permutation(50)[:7]  # SELECTION_RULE, computed here
    assert sel.indices == expected.tolist()
    assert sel.prompts == [prompts[i] for i in expected]
    assert P.select_prompts(prompts, 7, seed=3) == sel
    assert P.select_prompts(prompts, 7, seed=4).indices != sel.indices
    meta = sel.meta()
    assert meta["indices"] == sel.indices and meta["seed"] == 3 and meta["rule"] == P.SELECTION_RULE
    json.dumps(meta)
    with pytest.raises(UserError):
        P.select_prompts(prompts, 51)


def test_calibration_is_disjoint_from_evaluation_by_default():
    # duplicates of the same text at other indices must not leak either
    prompts = [f"caption {i % 30}" for i in range(60)]
    cal, ev = P.calibration_and_evaluation(prompts, n_calibration=20, n_evaluation=10, seed=1)
    assert ev == P.select_prompts(prompts, 10, seed=1)  # evaluation set independent of the calibration draw
    assert not set(cal.prompts) & set(ev.prompts)
    assert len(set(cal.indices)) == 20 and cal.meta()["allow_overlap"] is False
    left = sum(p not in set(ev.prompts) for p in prompts)  # rows whose text is not an evaluation prompt
    assert left < 50  # the duplicates of evaluation texts are excluded, not just the evaluation rows
    cal_all, _ = P.calibration_and_evaluation(prompts, n_calibration=left, n_evaluation=10, seed=1)
    assert sorted(cal_all.indices) == [i for i, p in enumerate(prompts) if p not in set(ev.prompts)]
    with pytest.raises(UserError):
        P.calibration_and_evaluation(prompts, n_calibration=left + 1, n_evaluation=10, seed=1)


def test_overlap_is_an_explicit_option():
    prompts = [f"caption {i}" for i in range(20)]
    cal, ev = P.calibration_and_evaluation(prompts, n_calibration=15, n_evaluation=15, seed=0, allow_overlap=True)
    assert set(cal.indices) & set(ev.indices)  # 15 + 15 of 20 must overlap
    assert cal.meta()["allow_overlap"] is True and "pitfall" in cal.rule


def test_digits_phrasings_map_back_to_their_digit():
    for d in range(10):
        train, held = P.digit_prompts(d), P.digit_prompts(d, heldout=True)
        assert len(train) == len(P.TRAIN_PHRASINGS) and len(held) == len(P.HELDOUT_PHRASINGS)
        assert not set(train) & set(held)
        assert all(P.digit_of_prompt(p) == d for p in train + held)
    assert P.digit_of_prompt("  A Handwritten   SEVEN ") == 7
    assert P.digit_of_prompt("a handwritten seventy") is None
    assert P.digit_of_prompt("two dogs on a couch") is None
    assert P.load_prompts("digits-heldout") == [p for d in range(10) for p in P.digit_prompts(d, heldout=True)]
    assert P.digit_labels(["7", "the digit 3"]).tolist() == [7, 3]
    with pytest.raises(UserError):
        P.digit_labels(["a cat"])
