"""A Django app mirroring django-dicom-models' ``dicom_staging`` tables (tests only).

Its migration (``migrations/0001_initial.py``, written by ``makemigrations``) is what
:mod:`tests.harness.djangoschema` applies, so review databases in tests have exactly the columns
Django creates on each backend, as a site's database has.
"""
