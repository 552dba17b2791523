"""An example post-anonymization hook: copy it, adapt it, list it in the configuration.

This folder holds site examples, not a package (no ``__init__.py``): anonpipe imports each file
listed in ``[pipeline] hook_files`` by its path. To use this one::

    [pipeline]
    hook_files = ["/etc/anonpipe/hooks/example_hook.py"]
    post_anon_hook = "example"

What a hook receives and must do
--------------------------------
run_dir : pathlib.Path
    The run folder. De-identified files are in ``run_dir / "to_production"``, laid out
    ``<study>/<series>/<instance>.dcm`` with cleaned UIDs as folder and file names. To trace a
    cleaned value back to the original (to link the study to a patient in your research
    database), query identity.db, e.g. ``select original from accession_no where cleaned = ?``.
overview : anonpipe.hooks.OverviewWriter
    A text stream: each complete line written to it is appended to overview.txt at once.
    Keep to a line or two; details belong in the return value.
practice : bool
    True in a practice run: look, report, but change nothing outside the run folder.
returns : str
    The detailed report, saved to post_anon_output.txt (post_anon_output_practice.txt in
    practice). An exception stops the run's hook step and is recorded in the run folder.
"""

from __future__ import annotations

from pathlib import Path

from anonpipe.hooks import OverviewWriter, registry


def example(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
    """Count the studies and files ready for production, and say so."""
    production = run_dir / "to_production"
    studies = sorted(p for p in production.iterdir() if p.is_dir()) if production.is_dir() else []
    files = sum(1 for study in studies for f in study.rglob("*.dcm") if f.is_file())
    mode = " (practice: nothing linked)" if practice else ""
    overview.write(f"example hook saw {files} files in {len(studies)} studies{mode}\n")
    return "".join(f"{study.name}\n" for study in studies) + f"{len(studies)} studies seen\n"


registry.register(example, name="example")
