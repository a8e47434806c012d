"""quant.artifacts: content checksum, stage and payload checks, parent identity, I/O errors as one sentence."""
import errno
import hashlib
import json

import pytest
import torch

import quant.artifacts as artifacts
from ldm.util import UserError
from quant.artifacts import (ARTIFACT_FORMAT, check_parents, content_checksum, load_artifact,
                             load_state_dict_checked, read_artifact_checksum, save_artifact)


def _payload():
    return {"state_dict": {"b.weight": torch.arange(6.0).view(2, 3), "a.bits": torch.tensor([2, 3], dtype=torch.int32),
                           "flag": torch.tensor(True)}, "x": torch.ones(2, dtype=torch.bfloat16)}


def test_checksum_is_canonical_and_independent_of_insertion_order():
    meta = {"stage": "naive", "n_bits_w": 2}
    a = content_checksum(meta, _payload())
    shuffled = {"x": _payload()["x"], "state_dict": dict(reversed(list(_payload()["state_dict"].items())))}
    assert content_checksum({"n_bits_w": 2, "stage": "naive"}, shuffled) == a
    # a second computation of the same definition: sha256 of canonical meta JSON, then name/dtype/shape/bytes
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name, t in sorted({"state_dict.b.weight": _payload()["state_dict"]["b.weight"],
                           "state_dict.a.bits": _payload()["state_dict"]["a.bits"],
                           "state_dict.flag": _payload()["state_dict"]["flag"], "x": _payload()["x"]}.items()):
        h.update(f"\n{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert a == h.hexdigest()
    changed = _payload()
    changed["state_dict"]["b.weight"][1, 2] += 1e-6
    assert content_checksum(meta, changed) != a
    assert content_checksum({**meta, "n_bits_w": 3}, _payload()) != a
    assert content_checksum({**meta, "checksum": "ignored"}, _payload()) == a


def test_roundtrip_records_format_parent_and_checksum(tmp_path):
    path = save_artifact(tmp_path / "n.pt", {"stage": "naive", "timesteps": (1, 501)}, parent={"calib": "abc"},
                         **_payload())
    art = load_artifact(path, stage="naive", required=("state_dict",))
    meta = art["meta"]
    assert meta["format"] == ARTIFACT_FORMAT and meta["parent"] == {"calib": "abc"} and meta["timesteps"] == [1, 501]
    assert meta["checksum"] == content_checksum(meta, {k: v for k, v in art.items() if k != "meta"})
    assert read_artifact_checksum(path) == meta["checksum"]
    assert read_artifact_checksum(tmp_path / "absent.pt") is None


@pytest.mark.parametrize("defect, fragment", [
    ("stage", "is a 'naive' artifact, not the 'calib' one expected here"),
    ("payload", "holds no 'x'"),
    ("old", "made by an older toolkit"),
    ("meta_edit", "is corrupt (checksum mismatch); re-run quant_scripts/02"),
    ("tensor_edit", "is corrupt (checksum mismatch)"),
    ("junk", "could not be read"),
    ("no_meta", "has no meta record"),
])
def test_defects_are_one_sentence(tmp_path, defect, fragment):
    path = tmp_path / "a.pt"
    save_artifact(path, {"stage": "naive"}, **_payload())
    stage, required = "naive", ()
    if defect == "stage":
        stage = "calib"
    elif defect == "payload":
        required = ("state_dict", "x")
        obj = torch.load(path, weights_only=True)
        del obj["x"]
        meta = obj.pop("meta")
        save_artifact(path, meta, **obj)
    elif defect in ("old", "meta_edit", "tensor_edit", "no_meta"):
        obj = torch.load(path, weights_only=True)
        if defect == "old":
            obj["meta"]["format"] = 1
            del obj["meta"]["checksum"]
        elif defect == "meta_edit":
            obj["meta"]["n_bits_w"] = 4
        elif defect == "tensor_edit":
            obj["state_dict"]["b.weight"][0, 0] = 7.0
        else:
            del obj["meta"]
        torch.save(obj, path)
    else:
        path.write_bytes(b"junk")
    with pytest.raises(UserError) as err:
        load_artifact(path, what="naive artifact", made_by="quant_scripts/02_quantize_ldm_naive.py", stage=stage,
                      required=required)
    text = str(err.value)
    assert fragment in text and "\n" not in text


def test_stale_parent(tmp_path):
    calib = save_artifact(tmp_path / "calib.pt", {"stage": "calib"}, x=torch.zeros(2))
    sha = load_artifact(calib)["meta"]["checksum"]
    naive = save_artifact(tmp_path / "naive.pt", {"stage": "naive"}, parent={"calib": sha}, state_dict={})
    meta = load_artifact(naive)["meta"]
    check_parents(meta, {"calib": str(calib)}, "naive artifact")          # current: accepted
    check_parents(meta, {"calib": str(tmp_path / "gone.pt")}, "naive")   # upstream deleted: nothing to compare
    save_artifact(calib, {"stage": "calib"}, x=torch.ones(2))             # re-made since
    with pytest.raises(UserError, match="stale; re-run quant_scripts/02"):
        check_parents(meta, {"calib": str(calib)}, "naive artifact", "quant_scripts/02_quantize_ldm_naive.py")


def test_state_dict_mismatches_are_one_sentence():
    module = torch.nn.Linear(3, 2)
    good = {k: v.clone() for k, v in module.state_dict().items()}
    load_state_dict_checked(module, good, "x")
    for sd, fragment in (({**good, "weight": torch.zeros(3, 3)}, "weight has shape (3, 3), the model needs (2, 3)"),
                         ({"weight": good["weight"]}, "1 tensors are missing, e.g. bias"),
                         ({**good, "extra": torch.zeros(1)}, "not in the model, e.g. extra"),
                         ([1, 2], "holds a list where a state dict is expected")):
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_state_dict_checked(module, sd, "naive artifact", "quant_scripts/02_quantize_ldm_naive.py")


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")])
def test_write_errors_name_the_path_and_keep_the_old_file(tmp_path, monkeypatch, code, reason):
    path = tmp_path / "naive.pt"
    save_artifact(path, {"stage": "naive"}, x=torch.zeros(1))
    old = path.read_bytes()

    def fail(obj, target):
        raise OSError(code, reason)
    monkeypatch.setattr(artifacts, "atomic_save", fail)
    with pytest.raises(UserError) as err:
        save_artifact(path, {"stage": "naive"}, x=torch.ones(1))
    assert str(path) in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == old
