"""The ``fxsdc`` command line.

User mistakes (a bad name, bit, index, config file) end with one line ``fxsdc: <message>`` on
stderr and exit status 2, before any forward pass and without writing a partial result.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserError
from .experiment_cli import add_experiment_commands

log = logging.getLogger("fxsdc")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        # main() prefixes "fxsdc: "; a subcommand's parser names the subcommand.
        command = self.prog.partition(" ")[2]
        raise UserError(f"{command}: {message}" if command else message)


def _csv(text: str) -> list[str]:
    return [part for part in text.replace(" ", "").split(",") if part]


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in _csv(text)]
    except ValueError:
        raise UserError(f"{what} {text!r} is not a comma-separated list of integers") from None


def _add_instrument(sub: Any) -> None:
    p = sub.add_parser("instrument", help="trace a model, insert injection (and check) nodes, "
                       "verify, and list the sites")
    p.add_argument("model", help="Hugging Face id or alias (gpt2, distilbert, minilm, ...)")
    p.add_argument("--locations", default="q,k,v,scores,weights,out",
                   help="comma-separated sites per layer (default: all six)")
    p.add_argument("--layers", default=None, help="comma-separated layer numbers (default: all)")
    p.add_argument("--checks", default="", help="comma-separated online checks to insert: "
                   "bounds, softmax, abft (default: none)")
    p.add_argument("--tiny", action="store_true", help="2-layer small model of the same "
                   "architecture, random weights")
    p.add_argument("--pretrained", action="store_true",
                   help="fail if pretrained weights are not available")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--show", choices=["sites", "code", "graph"], default="sites",
                   help="what to print besides the summary (default: the sites table)")
    p.add_argument("--save", metavar="DIR", help="write graph code, sites JSON, GraphML and DOT")
    p.add_argument("--compile", action="store_true",
                   help="also run through torch.compile and compare with eager")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--fault", metavar="LOCATION@LAYER",
                   help="also run one injected forward pass with this fault, e.g. scores@0")
    p.add_argument("--index", help="element of the fault, b,h,i,j (default: random, seeded)")
    p.add_argument("--bit", help="bit(s) to flip, comma-separated (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fault element")
    p.set_defaults(func=_run_instrument)


def _parse_fault(text: str) -> tuple[str, int]:
    location, _, layer = text.partition("@")
    try:
        return location, int(layer or 0)
    except ValueError:
        raise UserError(f"--fault {text!r}: expected LOCATION@LAYER, e.g. scores@0") from None


def _run_instrument(args: argparse.Namespace) -> int:
    # Validate everything that needs no model first.
    import torch

    from . import bits, models
    from .faults import Fault, InjectionLocation, parse_index
    locations = [InjectionLocation.parse(loc).value for loc in _csv(args.locations)]
    if not locations:
        raise UserError("--locations is empty")
    layers = None if args.layers is None else _int_list(args.layers, "--layers")
    from passes.insert_checks import CHECKS
    checks = _csv(args.checks)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise UserError(f"unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    dtype = bits.parse_dtype(args.dtype)
    spec = models.resolve(args.model)
    fault = None
    if not args.fault and (args.bit is not None or args.index is not None):
        raise UserError("--bit and --index describe the fault of --fault; "
                        "add --fault LOCATION@LAYER, e.g. scores@0")
    if args.fault:
        location, layer = _parse_fault(args.fault)
        location = InjectionLocation.parse(location).value
        flip = bits.check_bits(_int_list("30" if args.bit is None else args.bit, "--bit"), dtype)
        index = parse_index(args.index) if args.index else None
        fault = (layer, location, index, flip)
    if args.save and Path(args.save).exists() and not Path(args.save).is_dir():
        raise UserError(f"--save {args.save}: exists and is not a directory")

    from .pipeline import compare_outputs, instrument
    result = instrument(spec.hf_id, locations=locations, layers=layers, checks=checks,
                        tiny=args.tiny,
                        pretrained=True if args.pretrained else None, dtype=dtype)
    gm, sites = result
    x = result.example
    batch, seq_len = x["input_ids"].shape
    armed = None
    if fault is not None:
        layer, location, index, flip = fault
        if index is None:
            gen = torch.Generator().manual_seed(args.seed)
            armed = result.faults.random_fault(layer, location, flip, 0, seq_len, gen)
        else:
            armed = Fault(layer, location, index, flip)
        result.faults.validate(armed, batch, seq_len)  # before any forward pass

    result.detector.reset(batch)
    with torch.no_grad():
        reference = result.original(**x)
        eager = gm(**x)
    equal, max_diff = compare_outputs(reference, eager)
    clean_flags = result.detector.total_flagged()
    report: dict[str, Any] = {
        "model": spec.hf_id, "source": result.loaded.source if result.loaded else "",
        "dtype": args.dtype, "example_shape": [batch, seq_len],
        "sites": [{"layer": s.layer, "location": s.location, "node": s.node,
                   "inject_node": s.inject_node, "shape": [batch, *s.sample_shape],
                   "dtype": s.dtype} for s in sites],
        "checks": [c.to_dict() for c in result.checks],
        "bitwise_equal": equal, "max_abs_diff": max_diff,
        "clean_flagged_rows": clean_flags,
    }
    if args.compile:
        report["compiled"] = _compare_compiled(result, reference, eager)
    if armed is not None:
        result.faults.set_faults([armed], batch, seq_len)
        result.detector.reset(batch)
        with torch.no_grad():
            injected = gm(**x)
        applied = result.faults.applied()[0]
        detected = {name: flags[armed.index[0]]
                    for name, flags in result.detector.flagged_samples().items()}
        result.faults.clear()
        _, change = compare_outputs(eager, injected)
        report["fault"] = {**applied, "output_max_abs_change": change, "detected_by": detected}
    if args.save:
        report["saved"] = _save(result, args.save, report)

    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_instrument(report, result, args.show)
    return 0 if equal and report.get("compiled", {}).get("bitwise_equal", True) else 1


def _compare_compiled(result: Any, reference: dict, eager: dict) -> dict[str, Any]:
    """The compiled instrumented model against the compiled original. The original is compiled
    with inductor's pattern matcher off: on, it replaces some models' attention (BERT's matmul,
    scale, additive mask, softmax, matmul) by a fused scaled-dot-product kernel that rounds
    differently, which an instrumented graph, whose nodes read the attention's intermediates,
    cannot use. The difference from the original compiled with it on is reported too."""
    import torch
    import torch._inductor.config as inductor_config

    from .pipeline import compare_outputs
    x = result.example
    with torch.no_grad():
        with inductor_config.patch({"pattern_matcher": False}):
            torch._dynamo.reset()
            compiled_original = torch.compile(result.original)(**x)
        torch._dynamo.reset()
        fused_original = torch.compile(result.original)(**x)
        compiled = result.compile()(**x)
    equal, diff = compare_outputs(compiled_original, compiled)
    _, vs_eager = compare_outputs(eager, compiled)
    _, vs_fused = compare_outputs(fused_original, compiled)
    return {"bitwise_equal": equal, "max_abs_diff": diff, "max_abs_diff_vs_eager": vs_eager,
            "max_abs_diff_vs_pattern_matched_original": vs_fused}


def _save(result: Any, directory: str, report: dict[str, Any]) -> str:
    """Write the exports into a temporary folder beside DIR, then move it into place: a failure
    never leaves a half-written result."""
    from passes.graph_view import normalized_text, to_networkx, write_dot
    import networkx as nx
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fxsdc-", dir=target.parent))
    try:
        (staging / "graph.py").write_text(result.gm.code)
        (staging / "graph.txt").write_text(normalized_text(result.gm))
        (staging / "sites.json").write_text(json.dumps(report["sites"], indent=2) + "\n")
        graph = to_networkx(result.gm)
        nx.write_graphml(graph, staging / "graph.graphml")
        write_dot(graph, staging / "graph.dot",
                  highlight=[n for n, d in graph.nodes(data=True) if d["fxsdc"] != "null"])
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return str(target)


def _print_instrument(report: dict[str, Any], result: Any, show: str) -> None:
    from tabulate import tabulate
    if show == "code":
        print(result.gm.code)
    elif show == "graph":
        print(result.gm.graph)
    rows = [[s["layer"], s["location"], s["node"], s["inject_node"], tuple(s["shape"]), s["dtype"]]
            for s in report["sites"]]
    if show == "sites":
        print(tabulate(rows, headers=["layer", "location", "fx node", "inserted node", "shape",
                                      "dtype"]))
        if report["checks"]:
            print()
            print(tabulate([[c["layer"], c["check"], c["op"], c["node"]] for c in report["checks"]],
                           headers=["layer", "check", "on op", "inserted node"]))
    print(f"\n{report['model']}: {report['source']}")
    print(f"{len(rows)} injection sites; faults off vs original on input "
          f"{tuple(report['example_shape'])}: "
          + ("bitwise identical" if report["bitwise_equal"]
             else f"DIFFERENT (max |diff| {report['max_abs_diff']:.3g})"))
    if report["checks"]:
        print(f"{len(report['checks'])} check nodes; rows flagged on the clean run: "
              f"{report['clean_flagged_rows']}")
    if "compiled" in report:
        c = report["compiled"]
        print("torch.compile: " + ("bitwise identical to the compiled original"
                                   if c["bitwise_equal"] else
                                   f"differs from the compiled original by {c['max_abs_diff']:.3g}")
              + " (inductor's pattern matcher off for the original)"
              + f"; max |compiled - eager| {c['max_abs_diff_vs_eager']:.3g}"
              + f"; vs the original compiled with it on "
              f"{c['max_abs_diff_vs_pattern_matched_original']:.3g}")
    if "fault" in report:
        f = report["fault"]
        print(f"fault {f['location']}@{f['layer']} index {tuple(f['index'])} bits {f['bits']}: "
              f"{f['before']:.6g} -> {f['after']:.6g}; output max |change| "
              f"{f['output_max_abs_change']:.3g}"
              + (f"; detected by: {', '.join(k for k, v in f['detected_by'].items() if v) or 'none'}"
                 if f["detected_by"] else ""))
    if "saved" in report:
        print(f"saved graph.py, graph.txt, sites.json, graph.graphml, graph.dot in {report['saved']}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxsdc", description="Simulate and detect silent data corruption in "
                     "transformer attention with torch.fx graph passes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_instrument(sub)
    from .report import add_report_command
    add_report_command(sub)
    add_experiment_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="fxsdc: %(message)s", stream=sys.stderr)
        return args.func(args)
    except UserError as exc:
        print(f"fxsdc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxsdc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
