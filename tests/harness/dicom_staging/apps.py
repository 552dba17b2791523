# mypy: disallow-subclassing-any=False
"""The app's configuration: label ``dicom_staging``, hence the tables' prefix."""

from __future__ import annotations

from django.apps import AppConfig


class DicomStagingConfig(AppConfig):
    """django-dicom-models' staging app; ``AutoField`` ids as its (pre-3.2 Django) tables have."""

    name = "tests.harness.dicom_staging"
    label = "dicom_staging"
    default_auto_field = "django.db.models.AutoField"
