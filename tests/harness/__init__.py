"""Test and benchmark harness: real peers, synthetic data, review databases.

Modules (import them directly; this package imports nothing so that importing one part stays
cheap):

- :mod:`tests.harness.ports`: free loopback ports.
- :mod:`tests.harness.orthanc`: disposable Orthanc servers (:class:`OrthancServer`,
  :class:`OrthancFactory`) and their REST API.
- :mod:`tests.harness.dcmtk`: DCMTK ``echoscu``/``findscu``/``movescu``/``storescu`` and
  ``storescp`` as independent DICOM peers.
- :mod:`tests.harness.studygen`: synthetic CT/MR studies with planted identifiers and a manifest.
- :mod:`tests.harness.reviewdb`: django-dicom-review databases, SQLite or PostgreSQL, with the
  schema Django's migrations create (:mod:`tests.harness.djangoschema`, the models and migration
  in :mod:`tests.harness.dicom_staging`).
- :mod:`tests.harness.postgres`: a disposable PostgreSQL server, run as an unprivileged user.

The pytest fixtures built on them live in ``tests/conftest.py``.
"""
