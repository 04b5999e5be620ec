"""The command line: the main job works, and each user mistake is one line and exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import networkx as nx
import pytest

from fxsdc import cli


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["instrument", "gpt3"], "unknown model 'gpt3'; known models: gpt2, gpt2-medium"),
    (["instrument", "EleutherAI/pythia-70m"], "GPT-NeoX"),
    (["instrument", "gpt2", "--tiny", "--locations", "scores,keys"], "unknown location 'keys'"),
    (["instrument", "gpt2", "--tiny", "--layers", "0,2"], "layer 2 is out of range"),
    (["instrument", "gpt2", "--tiny", "--layers", "one"], "not a comma-separated list"),
    (["instrument", "gpt2", "--tiny", "--fault", "scores@0", "--bit", "32"],
     "bit 32 is out of range for float32"),
    (["instrument", "gpt2", "--tiny", "--dtype", "bfloat16", "--fault", "v@1", "--bit", "16"],
     "bit 16 is out of range for bfloat16"),
    (["instrument", "gpt2", "--tiny", "--fault", "scores@0", "--index", "0,0,13,0"],
     "outside the scores tensor"),
    (["instrument", "gpt2", "--tiny", "--fault", "scores@0", "--index", "0,a,1,2"],
     "is not a comma-separated list of integers"),
    (["instrument", "gpt2", "--tiny", "--fault", "scores@5"], "no instrumented site at layer 5"),
    (["instrument", "gpt2", "--tiny", "--bit", "99"], "--bit and --index describe the fault"),
    (["instrument", "gpt2", "--tiny", "--index", "0,0,1,1"], "add --fault LOCATION@LAYER"),
    (["instrument", "gpt2", "--tiny", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["instrument"], "instrument: the following arguments are required: model"),
    (["frobnicate"], "fxsdc: argument command: invalid choice: 'frobnicate'"),
    (["instrument", "gpt2", "--tiny", "--checks", "bounds,parity"], "unknown check 'parity'"),
    (["instrument", "gpt2", "--pretrained"], "no pretrained weights for gpt2"),
    (["instrument", "gpt2", "--tiny", "--checks", "comb"], "need K = V"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fxsdc: ") and message in err
    assert not err.startswith("fxsdc: fxsdc")  # the program's name once
    assert out == ""


def test_instrument_json_lists_sites_and_verifies(capsys):
    code, out, _ = run_cli(capsys, "instrument", "gpt2", "--tiny", "--json", "--layers", "1",
                           "--fault", "out@1", "--index", "2,3,4,5", "--bit", "30")
    report = json.loads(out)
    assert code == 0 and report["model"] == "gpt2"
    assert [(s["layer"], s["location"]) for s in report["sites"]] == \
        [(1, loc) for loc in ("q", "k", "v", "scores", "weights", "out")]
    assert report["sites"][3]["shape"] == [3, 4, 13, 13]
    assert report["bitwise_equal"] is True and report["max_abs_diff"] == 0.0
    assert report["fault"]["index"] == [2, 3, 4, 5] and abs(report["fault"]["after"]) > 1e30


def test_checks_are_listed_and_the_clean_run_flags_nothing(capsys):
    code, out, _ = run_cli(capsys, "instrument", "bert", "--tiny", "--json", "--layers", "0",
                           "--checks", "bounds,softmax,abft", "--fault", "weights@0",
                           "--index", "1,2,3,4")
    report = json.loads(out)
    assert code == 0 and report["clean_flagged_rows"] == 0
    assert {(c["check"], c["op"]) for c in report["checks"]} == {
        ("bounds", "softmax"), ("softmax", "softmax"), ("abft", "qk"), ("abft", "pv"),
        ("abft", "q_proj"), ("abft", "k_proj"), ("abft", "v_proj"), ("abft", "out_proj")}
    assert report["fault"]["detected_by"]["softmax"] is True


@pytest.mark.slow
def test_compile_verifies_a_bert_model_against_its_compiled_original(capsys):
    """``--compile`` compares with the original compiled with inductor's pattern matcher off:
    on, inductor replaces BERT's attention in the original by a fused scaled-dot-product kernel,
    which rounds differently and which the instrumented graph cannot use (before, ``--compile``
    exited 1 on every BERT-architecture model)."""
    code, out, _ = run_cli(capsys, "instrument", "minilm", "--tiny", "--json", "--compile",
                           "--checks", "bounds,softmax,abft")
    compiled = json.loads(out)["compiled"]
    assert code == 0 and compiled["bitwise_equal"] is True and compiled["max_abs_diff"] == 0.0
    assert compiled["max_abs_diff_vs_pattern_matched_original"] >= 0.0


def test_save_writes_every_export(capsys, tmp_path):
    target = tmp_path / "out"
    code, out, _ = run_cli(capsys, "instrument", "distilbert", "--tiny", "--save", str(target),
                           "--locations", "weights")
    assert code == 0 and "saved" in out
    assert sorted(p.name for p in target.iterdir()) == [
        "graph.dot", "graph.graphml", "graph.py", "graph.txt", "sites.json"]
    graph = nx.read_graphml(target / "graph.graphml")
    assert "fxsdc_inject_weights_0" in graph and graph.has_edge("softmax", "fxsdc_inject_weights_0")
    assert len(json.loads((target / "sites.json").read_text())) == 2
    assert "fxsdc_inject_weights_1" in (target / "graph.dot").read_text()


def test_show_code_prints_the_transformed_graph(capsys):
    code, out, _ = run_cli(capsys, "instrument", "gpt2", "--tiny", "--show", "code",
                           "--locations", "q")
    assert code == 0 and "fxsdc_runtime_inject_bitflips" in out.replace(".", "_")


def test_console_script_end_to_end():
    """The installed entry point, in a fresh process: no traceback on a user error."""
    bad = subprocess.run([sys.executable, "-m", "fxsdc.cli", "instrument", "gpt2", "--tiny",
                          "--fault", "weights@0", "--bit", "40"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["fxsdc: bit 40 is out of range for float32: "
                                               "valid bits are 0-31"]
