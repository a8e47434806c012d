"""Prompt sets for text-to-image runs: COCO captions, plain text files, seeded selections, digits phrasings.

Sources (`load_prompts`):
- a COCO captions JSON (captions_val2014.json / captions_train2014.json): `annotations[*].caption`, in file order;
- any other file: one prompt per line, blank lines skipped;
- the names `digits-train` / `digits-heldout`: the embedded digits model's phrasings, digit-major.

Selections are recorded by index into the source list so that an artifact can name exactly what it used. The
rule (`select_prompts`): `numpy.random.default_rng(seed).permutation(len(prompts))[:n]`, in that order.
Calibration prompts are drawn disjoint from the evaluation prompts by default (`calibration_and_evaluation`);
EDA-DM calibrates on a subset of its evaluation prompts, a leak offered only as the named pitfall
`allow_overlap=True` (TXT2IMG_CIFAR.md A.2 / C).
"""
import json
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ldm.util import UserError

SELECTION_RULE = "numpy.random.default_rng(seed).permutation(len(prompts))[:n]"
CALIBRATION_RULE = ("disjoint: numpy.random.default_rng([seed, 1]).permutation over the prompts whose text is not "
                    "an evaluation prompt, first n")
OVERLAP_RULE = ("allow_overlap (EDA-DM pitfall): numpy.random.default_rng([seed, 1]).permutation over all prompts, "
                "first n; calibration may share prompts with the evaluation set")

# ------------------------------------------------------------------------------------------------ digits
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit's name, {n}: its numeral. Training phrasings; the held-out ones are never seen in training and
# combine known words in a new frame ("picture" is new) to measure how far the text conditioning generalises.
TRAIN_PHRASINGS = (
    "a handwritten {w}",
    "the digit {n}",
    "a photo of the number {w}",
    "{n}",
    "the number {n}, handwritten",
    "a drawing of the digit {w}",
    "{w}",
    "an image of a {n}",
)
HELDOUT_PHRASINGS = (
    "a picture of the digit {n}",
    "a handwritten number {w}",
)
DIGITS_PROMPT_SETS = ("digits-train", "digits-heldout")


def _fill(phrasing, digit):
    return phrasing.format(w=DIGIT_WORDS[digit], n=str(digit))


def digit_prompts(digit, heldout=False):
    """The phrasings of `digit` (0-9): the training ones, or with heldout=True the held-out ones."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return [_fill(p, int(digit)) for p in (HELDOUT_PHRASINGS if heldout else TRAIN_PHRASINGS)]


def digits_prompt_list(heldout=False):
    """All phrasings of all digits, digit-major: [digit 0's phrasings, digit 1's, ...]."""
    return [p for d in range(10) for p in digit_prompts(d, heldout)]


def _normalise(text):
    return re.sub(r"\s+", " ", text.strip().lower())


_PROMPT_TO_DIGIT = {_normalise(_fill(p, d)): d for d in range(10) for p in TRAIN_PHRASINGS + HELDOUT_PHRASINGS}


def digit_of_prompt(prompt) -> Optional[int]:
    """The digit a digits phrasing names (case and spacing ignored), or None for any other text."""
    return _PROMPT_TO_DIGIT.get(_normalise(prompt))


def digit_labels(prompts):
    """int64 array of the digit of each prompt; a prompt that is no digits phrasing is a UserError."""
    labels = [digit_of_prompt(p) for p in prompts]
    bad = [p for p, d in zip(prompts, labels) if d is None]
    if bad:
        raise UserError(f"{len(bad)} prompts are not digits phrasings (first: {bad[0]!r}); prompt accuracy needs "
                        "prompts from ldm.data.prompts (digits-train or digits-heldout)")
    return np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ readers
def read_coco_captions(path):
    """Captions of a COCO captions JSON in file order (`annotations[*].caption`, whitespace stripped)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; pass a COCO captions JSON such as captions_val2014.json") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); pass a COCO captions file "
                        "such as captions_val2014.json or a text file with one prompt per line") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{path} has no `annotations` list; pass a COCO captions file such as "
                        "captions_val2014.json (annotations[*].caption) or a text file with one prompt per line")
    captions = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise UserError(f"{path}: annotation {i} has no string `caption`; the file is not a COCO captions file")
        captions.append(ann["caption"].strip())
    return captions


def read_prompt_lines(path):
    """One prompt per line (surrounding whitespace stripped), blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; pass a text file with one prompt per line or a COCO captions "
                        "JSON") from None


def load_prompts(source):
    """The prompt list of a COCO captions JSON, a text file, or `digits-train` / `digits-heldout`."""
    source = os.fspath(source)
    if source in DIGITS_PROMPT_SETS:
        return digits_prompt_list(heldout=source == "digits-heldout")
    if not os.path.isfile(source):
        raise UserError(f"prompt file {source} does not exist; pass a COCO captions JSON, a text file with one "
                        f"prompt per line, or one of {', '.join(DIGITS_PROMPT_SETS)}")
    prompts = read_coco_captions(source) if source.lower().endswith(".json") else read_prompt_lines(source)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompt file {source} holds no prompts; write one prompt per line or pass a COCO "
                        "captions JSON")
    return prompts


# ---------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class PromptSelection:
    """Selected prompts with their indices into the source list and the rule that chose them."""
    prompts: List[str]
    indices: List[int]
    rule: str
    seed: Optional[int] = None
    source: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def meta(self):
        """JSON-ready record for an artifact's meta."""
        return {"source": self.source, "rule": self.rule, "seed": self.seed, "n": len(self.prompts),
                "indices": list(self.indices), **self.extra}


def select_prompts(prompts, n=None, seed=0, source=None):
    """n prompts by SELECTION_RULE (all of them, in order, when n is None)."""
    if n is None:
        return PromptSelection(list(prompts), list(range(len(prompts))), "all, in file order", None, source)
    if not 1 <= n <= len(prompts):
        raise UserError(f"asked for {n} prompts but the source holds {len(prompts)}; pass at most that many")
    idx = np.random.default_rng(seed).permutation(len(prompts))[:n]
    return PromptSelection([prompts[i] for i in idx], [int(i) for i in idx], SELECTION_RULE, int(seed), source)


def calibration_and_evaluation(prompts, n_calibration, n_evaluation, seed=0, allow_overlap=False, source=None):
    """(calibration, evaluation) selections from one prompt list.

    The evaluation set is select_prompts(prompts, n_evaluation, seed), whatever the calibration set is. The
    calibration set is drawn from the prompts whose text is not in the evaluation set (CALIBRATION_RULE) unless
    allow_overlap=True, EDA-DM's pitfall: calibrating on evaluation prompts flatters the evaluation.
    """
    evaluation = select_prompts(prompts, n_evaluation, seed, source)
    if allow_overlap:
        pool, rule = np.arange(len(prompts)), OVERLAP_RULE
    else:
        taken = {_normalise(p) for p in evaluation.prompts}
        pool = np.array([i for i, p in enumerate(prompts) if _normalise(p) not in taken], dtype=np.int64)
        rule = CALIBRATION_RULE
    if not 1 <= n_calibration <= len(pool):
        raise UserError(f"asked for {n_calibration} calibration prompts but only {len(pool)} prompts are "
                        f"available{'' if allow_overlap else ' outside the evaluation set'}; ask for fewer")
    idx = pool[np.random.default_rng([int(seed), 1]).permutation(len(pool))[:n_calibration]]
    calibration = PromptSelection([prompts[i] for i in idx], [int(i) for i in idx], rule, int(seed), source,
                                  {"allow_overlap": bool(allow_overlap)})
    return calibration, evaluation
