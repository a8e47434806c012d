"""benchmarks/elementwise_layout.py (the measurement behind engine rule 5): its table, and bad flags as one sentence."""
import pytest

from script_runner import assert_one_sentence, run_main

SCRIPT = "benchmarks/elementwise_layout.py"


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--threads", "-1"], ["--rounds", "many"]])
def test_bad_flags_are_one_sentence(argv, capsys):
    code, _, err = run_main(SCRIPT, argv, capsys)
    assert_one_sentence(code, err)


def test_table_has_every_op_and_layout(capsys):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install -e '.[deploy]')")
    code, out, _ = run_main(SCRIPT, ["--rounds", "1"], capsys)
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| silu") or line.startswith("| x*2")]
    assert code == 0 and len(rows) == 10
    assert all(float(r[-1].strip(" |")) > 0 for r in rows)
    assert {r[1] for r in rows} == {"8x8 map", "8x8 as rows", "4x4 map", "4x4 as rows", "16x16 map"}
