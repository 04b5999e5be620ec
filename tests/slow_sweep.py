"""A real sweep, slowed down, for the kill-and-resume test.

``python tests/slow_sweep.py SWEEP_FILE STORE SECONDS`` runs the sweep file into STORE with the
runner and, after each stored pass, prints ``stored N`` and sleeps SECONDS, so that a test can
SIGKILL it between passes of a sweep that is still running.
"""
from __future__ import annotations

import sys
import time

from fxsdc.experiment_cli import load_sweep
from fxsdc.runner import SweepProgress, run_parameter_sweep
from fxsdc.store import ResultsLogger


def main() -> None:
    sweep_file, store_path, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def slow(progress: SweepProgress) -> None:
        print(f"stored {progress.done}", flush=True)
        time.sleep(pause)

    with ResultsLogger(store_path) as store:
        run_parameter_sweep(load_sweep(sweep_file), logger=store, progress=slow)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
