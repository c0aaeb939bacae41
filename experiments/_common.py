"""Shared plumbing of the experiment scripts: flags, CSV, Agg plots.

Each experiment is a script with a `main(argv)` (so tests can run it in
process) that writes CSV + PNG into --output_dir. `--quick` shrinks it to a
CPU smoke run of well under a minute; the full mode is what
experiments/README.md reports. Scripts import this module as `_common`: their
own directory is first on sys.path when run as `python experiments/<name>.py`.
"""

import argparse
import csv
import json
import os
import pathlib
from typing import Any, Dict, List, Sequence

import matplotlib

# No display on CI machines; select the file-only backend before pyplot loads.
matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402

pyplot.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "font.size": 9})


def parser(description: str, default_dir: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every experiment shares.

    Args:
      description: The script's one-line purpose.
      default_dir: Default --output_dir.

    Returns:
      An `argparse.ArgumentParser` with --quick and --output_dir.
    """
    result = argparse.ArgumentParser(description=description)
    result.add_argument(
        "--quick", action="store_true", help="A small CPU smoke run (seconds to a minute)."
    )
    result.add_argument("--output_dir", default=default_dir, help="Where CSV and PNG go.")
    return result


def output_dir(path: str) -> pathlib.Path:
    """Creates (if needed) and returns the output directory."""
    result = pathlib.Path(path)
    result.mkdir(parents=True, exist_ok=True)
    return result


def write_csv(path: os.PathLike, rows: Sequence[Dict[str, Any]]) -> None:
    """Writes dict rows (same keys) as CSV with a header."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: os.PathLike, value: Any) -> None:
    """Writes a JSON summary, indented for reading."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def save(figure, path: os.PathLike) -> None:
    """Saves a figure as a small PNG and frees it."""
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def ints(text: str) -> List[int]:
    """'1,2,4' -> [1, 2, 4] (argparse `type=`)."""
    return [int(v) for v in text.split(",") if v.strip()]
