"""The operator's helper commands (the old helper scripts), one module each.

- :mod:`anonpipe.tools.cleandata`: ``anonpipe clean-data``, free the disk space of old runs;
- :mod:`anonpipe.tools.filtering`: ``anonpipe filter``, move or delete files by UID;
- :mod:`anonpipe.tools.summary`: ``anonpipe summary``, what a folder of DICOM files holds;
- :mod:`anonpipe.tools.import_settings`: ``anonpipe import-settings``, the old local_settings.py
  as an anonpipe.toml (migration);
- :mod:`anonpipe.tools.unitpaths`: the systemd drop-in ``scripts/install.sh`` writes from the
  configuration (folders the service writes outside its state directory).

They print what the operator asked for and log nothing: their output may name patients (summary)
and goes to the operator's terminal only. :mod:`anonpipe.headers` reads the few header
elements they need.
"""
