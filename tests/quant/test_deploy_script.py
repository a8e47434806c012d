"""quant_scripts/07_deploy.py on the shipped digits model: bad inputs are one sentence with exit status 2; a naive
run deploys to an OpenVINO engine that samples like the fake-quant model."""
import importlib.util
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "quant_scripts")
DIGITS_CKPT = os.path.join(REPO, "models/ldm/digits-ldm-vq-4/model.ckpt")
pytestmark = pytest.mark.skipif(not os.path.isfile(DIGITS_CKPT), reason="the shipped digits checkpoint is missing")


def _script(name):
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), os.path.join(SCRIPTS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails_with_one_sentence(argv, capsys, needle):
    from ldm.util import cli_main
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_script("07_deploy.py").main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


def test_run_dir_without_artifact(tmp_path, capsys):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra")
    _fails_with_one_sentence(["--preset", "digits", "--run_dir", str(tmp_path), "--stage", "naive"], capsys,
                             "naive.pt")
    assert os.listdir(tmp_path) == []                      # nothing written


def test_unknown_engine(tmp_path, capsys):
    _fails_with_one_sentence(["--preset", "digits", "--run_dir", str(tmp_path), "--engine", "tensorflow"], capsys,
                             "tensorflow")


def test_corrupt_export(tmp_path, capsys):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra")
    bad = tmp_path / "export.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _fails_with_one_sentence(["--preset", "digits", "--run_dir", str(tmp_path), "--from_export", str(bad)], capsys,
                             str(bad))


@pytest.mark.slow
def test_naive_run_deploys_to_openvino(tmp_path, capsys):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra")
    from quant.api import load_quantized
    from quant.deploy.openvino import int8_summary, kernel_precisions, load_engine_unet

    run = ["--run_dir", str(tmp_path), "--no_progress", "--preset", "digits", "--device", "cpu"]
    _script("01_collect_input_4_calib.py").main(run + ["--calib_steps", "5", "--calib_batch", "2"])
    _script("02_quantize_ldm_naive.py").main(run + ["--method", "mpqdm", "--n_bits_w", "4", "--n_bits_a", "8",
                                                    "--n_calib", "8", "--train_steps", "4"])
    out = _script("07_deploy.py").main(run + ["--stage", "naive", "--threads", "1"])
    assert "check at t=" in capsys.readouterr().out
    engine = load_engine_unet(out, threads=1)
    low, high = int8_summary(kernel_precisions(engine.compiled))
    assert low >= 100 and low > high
    from ldm.presets import load_preset_model
    fp = load_preset_model("digits").model.diffusion_model
    qunet, meta = load_quantized(load_preset_model("digits").model.diffusion_model, str(tmp_path / "naive.pt"))
    assert engine.meta()["timesteps"] == meta["timesteps"]
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 1, 64, generator=g)
    with torch.no_grad():
        for t in meta["timesteps"]:
            ts = torch.full((5,), t)
            fake = qunet.eval()(x, ts, context=c)
            err = float((engine(x, ts, c) - fake).norm() / fake.norm())
            assert err <= 0.25 * float((fake - fp(x, ts, context=c)).norm() / fake.norm())   # see test_deploy_engines
