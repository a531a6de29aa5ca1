"""notebooks/quickstart.ipynb runs top to bottom without an error."""

import json
import os
import sys

from ipykernel import kernelspec as ipykernel_kernelspec
from jupyter_client import kernelspec
from jupyter_client import manager
import nbclient
import nbformat
import pytest

# Integration: runs the notebook in a kernel subprocess.
pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
KERNEL_NAME = "quickstart-python"


def kernel_manager(kernels_dir):
  """A kernel running this interpreter (the test's venv), whatever kernels are installed.

  A "python3" kernel spec installed for the user or system may point at another Python;
  writing our own spec for sys.executable avoids running the notebook there.
  """
  ipykernel_kernelspec.write_kernel_spec(os.path.join(kernels_dir, KERNEL_NAME))
  with open(os.path.join(kernels_dir, KERNEL_NAME, "kernel.json")) as f:
    assert json.load(f)["argv"][0] == sys.executable
  spec_manager = kernelspec.KernelSpecManager(kernel_dirs=[kernels_dir],
                                              ensure_native_kernel=False)
  return manager.KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=spec_manager)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  # The experiments run from a checkout (they are not installed): the kernel, like
  # `PYTHONPATH=. jupyter notebook` in the README, finds them on PYTHONPATH.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      notebook, km=kernel_manager(str(tmp_path)), timeout=300,
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  text = "\n".join(output.get("text", "") for cell in notebook.cells
                   if cell.cell_type == "code" for output in cell.outputs)
  # Every INQ weight ends in the power-of-two codebook; all five methods are compared.
  assert "weights in the 5-bit power-of-two codebook: 1.0" in text
  for name in ("INQ (power-of-two, retrained)", "RTN power-of-two", "COMQ",
               "RTN asymmetric"):
    assert name in text
