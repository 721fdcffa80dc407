"""Executes every notebook at full size; executed copies (with outputs) go to runs/notebooks/.

    python experiments/run_notebooks.py [names...]      (make notebooks)
"""

import pathlib
import sys

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(names: list[str]) -> None:
    out_dir = ROOT / "runs" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb")):
        if names and path.stem not in names and path.name not in names:
            continue
        print(f"running {path.name} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=3600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, out_dir / path.name)
        print(f"  wrote {out_dir / path.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
