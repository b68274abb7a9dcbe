"""A study's report: ``summary.csv``, the executed aggregate notebook (``notebooks/aggregate.ipynb``)
and ``report.html``, a self-contained page of its outputs (:func:`report_html`)."""
from __future__ import annotations

from pathlib import Path

from . import NOTEBOOKS
from .files import atomic_write
from .kernels import Interrupt, ipc_kernel_manager


AGGREGATE_NB = NOTEBOOKS / "aggregate.ipynb"
REPORT_TEMPLATE = Path(__file__).parent / "report_template" / "report.html.j2"  # no script from a CDN


def write_report(study_dir: Path, stop: Interrupt | None = None, timeout: int | None = None) -> Path:
    """summary.csv, the executed aggregate notebook (each cell at most ``timeout`` seconds, None: no
    limit; without the live results browser, which needs a kernel), and report.html (inputs hidden)."""
    import papermill as pm

    from .report import write_summary

    write_summary(study_dir)
    out_nb = study_dir / "aggregate.ipynb"
    pm.execute_notebook(str(AGGREGATE_NB), str(out_nb),
                        parameters={"study_dir": str(study_dir.resolve()), "live_browser": False},
                        kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS), execution_timeout=timeout,
                        **(stop.notebook_options() if stop else {"kernel_manager_class": ipc_kernel_manager()}))
    report = study_dir / "report.html"
    atomic_write(report, report_html(out_nb))
    return report


def report_html(notebook: Path) -> str:
    """An executed notebook as a self-contained page: outputs only (inputs and prompts hidden), and
    no script fetched from a network (:data:`REPORT_TEMPLATE`)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            extra_template_paths=[str(REPORT_TEMPLATE.parent)], template_file=REPORT_TEMPLATE.name)
    return exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))[0]
