# mypy: disallow-subclassing-any=False
"""django-dicom-models' review tables, column for column (``reference/ORIGINALS.md``).

Field types, lengths and nullability are those of django-dicom-models; the foreign keys into the
research database's patient and encounter tables (another database) are plain indexed integers
here, which is the column Django creates for them.
"""

from __future__ import annotations

from django.db import models


class Base(models.Model):
    """django-dicom-models' ``core.base.Base``: creation and modification times."""

    created = models.DateTimeField(editable=False)
    modified = models.DateTimeField(editable=False)

    class Meta:
        abstract = True


class RadiologyStudy(Base):
    """``dicom_staging_radiologystudy``: one study on the staging PACS."""

    original_study_uid = models.CharField(null=True, max_length=64)
    study_uid = models.CharField(max_length=64, null=True, blank=True)
    accession_no = models.CharField(max_length=20)
    study_date = models.DateTimeField(null=True)
    modality = models.CharField(max_length=5, null=True, blank=True)
    sop_class = models.CharField(max_length=30, null=True, blank=True)
    number_of_series = models.IntegerField(null=True, blank=True)
    total_images = models.IntegerField(null=True, blank=True)
    requested = models.BooleanField(default=False)
    exclude = models.BooleanField(default=False)
    image_published = models.BooleanField(default=False)
    high_risk_flag = models.BooleanField(default=False)
    pub_date = models.DateTimeField(null=True)
    processing_error = models.BooleanField(null=True)
    processing_error_date = models.DateTimeField(null=True)
    processing_error_msg = models.CharField(null=True, max_length=400)
    high_risk_message = models.CharField(null=True, max_length=500)
    impression = models.TextField(null=True, blank=True)
    patient_id = models.IntegerField(db_index=True)
    encounter_id = models.IntegerField(db_index=True)

    class Meta:
        verbose_name_plural = "Radiology Studies"


class RadiologyStudyReview(Base):
    """``dicom_staging_radiologystudyreview``: one reviewer's answers about a study."""

    study = models.ForeignKey(RadiologyStudy, on_delete=models.CASCADE)
    user_id = models.IntegerField(db_index=True)
    has_phi = models.BooleanField("Has PHI?", null=True, default=None)
    has_reconstruction = models.BooleanField("Has facial reconstruction?", default=False)
    has_protocol_series = models.BooleanField("Has a protocol series?", default=True)
    relevant = models.BooleanField("Relevant?", default=False)
    exclude = models.BooleanField(default=False)
    comment = models.TextField("Reviewer Comment", blank=True, null=True)
