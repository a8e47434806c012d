"""Real low-bit models end to end on the shipped digits model: 02 -> 06 (packed export) -> 04 --from_export.

Samples from the packed file must equal those of the fake-quantized model they came from: bitwise for the naive
MPQ-DM W2A4 model (integer zero points), with the file at its theoretical size."""
import os

import numpy as np
import pytest
import torch

from test_quant_pipeline import DIGITS_CKPT, _script

pytestmark = pytest.mark.skipif(not os.path.isfile(DIGITS_CKPT), reason="the shipped digits checkpoint is missing")




def test_export_samples_equal_fake_quant_samples(tmp_path):
    from quant.export import read_header, theoretical_bytes

    run = ["--run_dir", str(tmp_path), "--no_progress", "--preset", "digits", "--device", "cpu"]
    _script("01_collect_input_4_calib.py").main(run + ["--calib_steps", "5", "--calib_batch", "2"])
    _script("02_quantize_ldm_naive.py").main(run + ["--method", "mpqdm", "--n_bits_w", "2", "--n_bits_a", "4",
                                                    "--n_calib", "8", "--train_steps", "4"])
    export = tmp_path / "export.safetensors"
    _script("06_export_packed.py").main(run + ["--stage", "naive"])
    header = read_header(export)
    assert (header["method"], header["w_bits"], header["a_bits"]) == ("mpqdm", 2, 4)
    assert os.path.getsize(export) <= 1.03 * theoretical_bytes(export) + 600_000  # fixed index/header overhead

    sample = ["--n_samples", "20", "--batch_size", "10", "--seed", "3"]
    fake = _script("04_sample_lora_model.py").main(run + sample + ["--stage", "naive", "--out",
                                                                   str(tmp_path / "fake.npz")])
    packed = _script("04_sample_lora_model.py").main(run + sample + ["--from_export", str(export), "--out",
                                                                     str(tmp_path / "packed.npz")])
    a, b = np.load(fake), np.load(packed)
    assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.array_equal(a["arr_0"], b["arr_0"])


def test_export_of_other_model_is_refused(tmp_path, capsys):
    from quant.export import export_quantized  # noqa: F401  (module import must work without a run)

    bogus = tmp_path / "export.safetensors"
    bogus.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(SystemExit) as exit_info:
        from ldm.util import cli_main
        cli_main(_script("04_sample_lora_model.py").main,
                 ["--run_dir", str(tmp_path), "--preset", "digits", "--from_export", str(bogus), "--n_samples", "10"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export" in err[0]
