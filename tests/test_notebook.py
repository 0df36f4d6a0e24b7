"""The exploration notebook: committed without outputs, public API only, and it runs top to bottom.

The run executes ``notebooks/explore.ipynb`` with nbclient on a small sample dataset (VGG16 at
32 px with random weights, 20 frames, 3/1/2 clips per class, 10 epochs) in a temporary folder. The kernel
is pinned to the interpreter running pytest: a kernel spec written to a temporary folder whose
argv starts with ``sys.executable`` is the only one the kernel manager can see, and an extra cell
appended to the in-memory copy checks the kernel's ``sys.executable`` / ``sys.prefix``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "explore.ipynb"
CELL_TIMEOUT = 300  # seconds per cell

# What a notebook may use from featpipe: the names the package exports, plus two modules.
PUBLIC_MODULES = {"featpipe", "featpipe.video.decode", "featpipe.video.sample_data"}
PUBLIC_SUBMODULE_NAMES = {"featpipe.video.decode": {"read_clip"}, "featpipe.video.sample_data": {"write_sample_data"}}


def _public_featpipe_names() -> set[str]:
    import featpipe

    return set(featpipe.__all__) | {"__version__", "video", "sample_data"}


def _code_sources(nb) -> list[str]:
    """Code cells as Python: IPython magics / shell lines are dropped so ``ast`` can parse them."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines = [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            out.append("\n".join(lines))
    return out


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} has outputs committed: clear them before saving"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count committed"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 8, "each step should be explained in markdown"


def test_notebook_uses_only_the_public_api():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    public = _public_featpipe_names()
    problems = []
    for src in _code_sources(nb):
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("featpipe") and alias.name not in PUBLIC_MODULES:
                        problems.append(f"import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featpipe"):
                allowed = public if node.module == "featpipe" else PUBLIC_SUBMODULE_NAMES.get(node.module, set())
                for alias in node.names:
                    if alias.name not in allowed:
                        problems.append(f"from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "featpipe":
                if node.attr not in public:
                    problems.append(f"featpipe.{node.attr}")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "featpipe"
            ):
                module = f"featpipe.{node.value.attr}"
                if node.attr not in PUBLIC_SUBMODULE_NAMES.get(module, set()):
                    problems.append(f"{module}.{node.attr}")
    # belt and braces: no private name of featpipe anywhere in the code, even in strings
    for src in _code_sources(nb):
        for m in re.finditer(r"featpipe(?:\.\w+)+", src):
            if any(part.startswith("_") and part != "__version__" for part in m.group(0).split(".")):
                problems.append(m.group(0))
    assert not problems, f"the notebook reaches past featpipe's public API: {sorted(set(problems))}"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run the notebook once on small settings; returns (executed notebook, work dir, seconds)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("notebook")
    kernels = tmp / "kernels"
    (kernels / "python3").mkdir(parents=True)
    (kernels / "python3" / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "featpipe test kernel",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    assert ksm.get_kernel_spec("python3").argv[0] == sys.executable

    work = tmp / "work"
    # the test's settings only: no inherited FEATPIPE_NB_* override, and the inline matplotlib backend
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND" and not k.startswith("FEATPIPE_NB_")}
    env.update(
        FEATPIPE_NB_WORK=str(work),
        FEATPIPE_NB_BACKBONE="vgg16",
        FEATPIPE_NB_SIZE="32",
        FEATPIPE_NB_WEIGHTS="none",
        FEATPIPE_NB_SAMPLE="3,1,2",
        FEATPIPE_NB_EPOCHS="10",
        FEATPIPE_NB_SEED="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p),
    )

    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_cells = len(nb.cells)
    # appended to the in-memory copy only: which interpreter actually ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import sys, json; print(json.dumps([sys.executable, sys.prefix]))"))
    km = KernelManager(kernel_name="python3", kernel_spec_manager=ksm)
    client = NotebookClient(
        nb,
        km=km,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp)}},
    )
    started = time.perf_counter()
    try:
        client.execute(env=env)
    finally:
        # nbclient leaves a kernel it was given running: it would idle (1 GB, some CPU) until pytest exits
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - started
    probe = nb.cells.pop()
    assert len(nb.cells) == n_cells
    kernel_exe, kernel_prefix = json.loads(probe.outputs[0]["text"])
    return nb, work, seconds, (kernel_exe, kernel_prefix)


@pytest.mark.slow
def test_notebook_runs_on_the_test_interpreter(executed):
    _, _, _, (kernel_exe, kernel_prefix) = executed
    assert kernel_exe == sys.executable
    assert kernel_prefix == sys.prefix


@pytest.mark.slow
def test_notebook_runs_without_errors(executed):
    nb, _, seconds, _ = executed
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"cell {i} was not executed"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {i} raised {errors[0].ename}: {errors[0].evalue}"
    assert seconds < 170, f"the notebook took {seconds:.0f}s on the test settings"


@pytest.mark.slow
def test_notebook_draws_its_figures(executed):
    nb, _, _, _ = executed
    figure_cells = [c for c in nb.cells if c.cell_type == "code" and "figure" in c.metadata.get("tags", [])]
    assert len(figure_cells) >= 6
    images = 0
    for cell in figure_cells:
        pngs = [
            o for o in cell.outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data
        ]
        assert pngs, f"this figure cell drew no image:\n{cell.source[:300]}"
        images += len(pngs)
    assert images >= 6


@pytest.mark.slow
def test_notebook_trains_and_evaluates(executed):
    nb, work, _, _ = executed
    models = list(work.rglob("model.keras"))
    assert models, f"no run directory with model.keras under {work}"
    run_dir = models[0].parent
    for name in ("run.json", "history.csv", "report.json", "confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    text = "\n".join(
        o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "accuracy" in text and "roc_auc" in text  # the evaluate table
    assert re.search(r"misclassified test clip|least confident test clips", text)  # section 7 said what it shows
