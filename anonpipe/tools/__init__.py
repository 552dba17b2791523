"""The operator's helper commands (the old helper scripts), one module each.

- :mod:`anonpipe.tools.cleandata`: ``anonpipe clean-data``, free the disk space of old runs;
- :mod:`anonpipe.tools.filtering`: ``anonpipe filter``, move or delete files by UID;
- :mod:`anonpipe.tools.summary`: ``anonpipe summary``, what a folder of DICOM files holds.

They print what the operator asked for and log nothing: their output may name patients (summary)
and goes to the operator's terminal only. :mod:`anonpipe.headers` reads the few header
elements they need.
"""
