"""benchmarks/engine_speed.py's report: ratios against the right baselines, the CPU named, re-runs merged."""
import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
    spec = importlib.util.spec_from_file_location("engine_speed", os.path.join(REPO, "benchmarks", "engine_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(variant, ms, streams=None, cpu="Test CPU (avx2; int8 dot products: none)"):
    row = {"model": "digits", "variant": variant, "threads": 2, "batch": 200, "cpu": cpu, "call_ms": ms,
           "call_min_ms": ms, "call_max_ms": ms, "rounds": 3, "batch20_s": 20 * ms / 1e3, "batch20_measured": False,
           "file_bytes": 1e6}
    if streams is not None:
        row.update(streams=streams, int8_kernels=10, f32_kernels=2)
    return row


def test_report_ratios_and_merge(tmp_path):
    es = _module()
    assert es.variant_name("fp", 1) == "openvino-fp" and es.variant_name("edm-w8a8", 2) == "openvino-edm-w8a8-2streams"
    rows = [_row("pytorch-fp", 80.0), _row("openvino-fp", 100.0, 1), _row("openvino-edm-w8a8", 50.0, 1),
            _row("openvino-fp-2streams", 60.0, 2), _row("openvino-edm-w8a8-2streams", 40.0, 2)]
    es.write_results(str(tmp_path), "cmd A", rows, [], [], 0.5)
    md = (tmp_path / "engine_speed.md").read_text()
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines()
             if line.startswith("| openvino") or line.startswith("| pytorch")}
    # vs PyTorch FP: 80 / ms; vs OpenVINO FP: against the FP graph with the same stream count
    assert table["openvino-edm-w8a8"][3:5] == ["1.60x", "2.00x"]
    assert table["openvino-edm-w8a8-2streams"][3:5] == ["2.00x", "1.50x"]
    assert table["pytorch-fp"][3:5] == ["1.00x", "1.25x"]
    assert "CPU: Test CPU (avx2; int8 dot products: none)" in md and "`cmd A`" in md and "-<n>streams" in md
    # a re-run replaces its own rows and keeps the others and both commands
    es.write_results(str(tmp_path), "cmd B", [_row("openvino-edm-w8a8", 40.0, 1)], [], [], 0.7)
    data = json.loads((tmp_path / "engine_speed.json").read_text())
    assert [r["call_ms"] for r in data["speed"] if r["variant"] == "openvino-edm-w8a8"] == [40.0]
    assert len(data["speed"]) == 5 and data["commands"] == ["cmd A", "cmd B"]
    assert "| openvino-edm-w8a8 | 40.0 (40.0–40.0) | 0.80 (20×call) | 2.00x | 2.50x |" in \
        (tmp_path / "engine_speed.md").read_text()
    # a command whose rows have all been re-measured by another is no longer listed
    es.write_results(str(tmp_path), "cmd C", [_row("openvino-edm-w8a8", 45.0, 1)], [], [], 0.7)
    assert json.loads((tmp_path / "engine_speed.json").read_text())["commands"] == ["cmd A", "cmd C"]
    md = (tmp_path / "engine_speed.md").read_text()
    assert "`cmd B`" not in md and "`cmd A`" in md and "`cmd C`" in md
