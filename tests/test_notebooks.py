"""Execute every notebook under notebooks/ top to bottom, and check the committed copies are stripped.

Each notebook runs in a fresh ``python3`` kernel (nbclient) with ``notebooks/`` as its working directory,
as a user would run it from Jupyter; any cell error fails its test.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: Where 03_real_data.ipynb looks for real images by default (../shared/realdata beside the repository).
REALDATA = ROOT.parent / "shared" / "realdata"


def execute(path):
    """Run a notebook top to bottom; return it with its outputs."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(out.output_type == "error" for out in cell.outputs)
    return nb


def printed(nb):
    """Everything the notebook's cells printed."""
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")


def files_under(*directories):
    return {p for d in directories for p in d.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts}


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    listed = (NOTEBOOK_DIR / "README.md").read_text()
    for path in NOTEBOOKS:
        assert path.name in listed, f"{path.name} is not listed in notebooks/README.md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells and nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), \
        f"{path.name} should open with a markdown title"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs; strip them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution_count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("DEBLEND_REALDATA", raising=False)
    before = files_under(NOTEBOOK_DIR, ROOT / "data")
    nb = execute(path)
    assert files_under(NOTEBOOK_DIR, ROOT / "data") == before, f"{path.name} wrote into the repository"
    if path.name.startswith("03_"):  # says which image it used
        expected = "Using the REAL image" if (REALDATA / "eso_ntt_emmi_sep" / "image.fits").exists() else "SIMULATED"
        assert expected in printed(nb)


def test_real_data_notebook_falls_back_to_bundled_data(tmp_path, monkeypatch):
    path = NOTEBOOK_DIR / "03_real_data.ipynb"
    if not path.exists():
        pytest.skip("no 03_real_data.ipynb")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("DEBLEND_REALDATA", str(tmp_path / "absent"))
    text = printed(execute(path))
    assert "using the bundled SIMULATED tile ../data/sample_0001.fits" in text
    assert "no reference catalog" in text
