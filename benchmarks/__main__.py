"""``python -m benchmarks JSON [JSON ...]``: pytest-benchmark's JSON into ``benchmarks/stages.md``.

The JSON files are those the suites write with ``--benchmark-json`` (see
``benchmarks/conftest.py``); the table, the per-case ratios and the notes are
``ggrad_gpu.cli.bench``'s, as ``ggrad bench`` prints them.
"""

import argparse
import json
import sys
from pathlib import Path

from ggrad_gpu.cli import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("stages.md"),
                        help="Markdown file to write (default: benchmarks/stages.md)")
    args = parser.parse_args(argv)
    rows, machines, sources = [], {}, []
    for path in args.json:
        document = json.loads(path.read_text())
        found, seen = bench.rows_from_pytest_benchmark(document)
        rows += found
        for device, limits in seen.items():
            machines.setdefault(device, limits)
        commit = document.get("commit_info", {})
        commit = f"commit {str(commit.get('id'))[:7]}{' + changes' if commit.get('dirty') else ''}" \
            if commit.get("time") else "no commit"
        sources.append(f"`{path.name}` ({document.get('datetime', '?')[:19]}, {commit}, {len(found)} benchmarks)")
    if not rows:
        parser.error("the files hold no ggrad_gpu benchmark (run the suites with --benchmark-json)")
    lines = ["# ggrad_gpu stage benchmarks", "", f"`python -m benchmarks` from {', '.join(sources)}.", ""]
    lines += [f"- {line}" for line in bench.machine_lines(machines)]
    cases = bench.case_lines(rows)
    lines += ["", bench.markdown_table(rows), ""] + (cases + [""] if cases else []) + [bench.NOTES]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
