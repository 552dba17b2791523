"""A whole site on one machine: staging and research Orthanc, a review DB (SQLite, or PostgreSQL
on a given server), studies, a config file.

Used by the end-to-end tests, the one-command demo (``scripts/demo.py``) and ``bench/e2e.py``,
so all three exercise the same set-up. Every server runs on 127.0.0.1 on free ports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.orthanc import OrthancServer
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.postgres import PostgresServer
from tests.harness.reviewdb import ReviewDB
from tests.harness.studygen import TINY, ImageSize, Manifest, generate

__all__ = ["OUR_AE", "Site", "StudyPlan", "build_site", "build_site_from", "write_config"]

OUR_AE = "ANONPIPE"


@dataclass(frozen=True)
class StudyPlan:
    """How many studies of each review outcome to generate (each its own patient)."""

    approved: int = 3
    approved_with_protocol: int = 1
    rejected_phi: int = 1
    conflicting: int = 1
    missing_from_staging: int = 1
    series_per_study: int = 2
    instances_per_series: int = 3
    #: Studies of each approved patient (each study has its own review).
    studies_per_patient: int = 1
    #: Issuer of Patient ID varies from object to object (absent, reformatted, with text).
    issuer_variants: bool = False
    size: ImageSize | tuple[int, int] = TINY


@dataclass
class Site:
    """What :func:`build_site` made; ``approved_uids`` are the studies that must arrive."""

    root: Path
    staging: OrthancServer
    research: OrthancServer
    review: ReviewDB
    config_path: Path
    socket_path: Path
    manifests: list[Manifest] = field(default_factory=list)
    approved_uids: list[str] = field(default_factory=list)
    protocol_uids: list[str] = field(default_factory=list)
    rejected_uids: list[str] = field(default_factory=list)
    held_uids: list[str] = field(default_factory=list)
    missing_uids: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def expected_instances(self) -> int:
        """Clean instances that must reach research (protocol series are quarantined)."""
        total = 0
        for manifest in self.manifests:
            for study in manifest.studies:
                if study.study_instance_uid in self.approved_uids:
                    total += sum(len(s.instances) for s in study.series if not s.is_protocol)
        return total


def write_config(site: Site, local_port: int, **pipeline: object) -> Path:
    """Write the site's anonpipe.toml (every path inside ``site.root``)."""
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in pipeline.items())
    site.config_path.write_text(
        f"""[local]
ae_title = "{OUR_AE}"
bind = "{LOOPBACK}"
port = {local_port}
min_free_mb = 0

[staging]
ae_title = "{site.staging.aet}"
host = "{LOOPBACK}"
port = {site.staging.dicom_port}

[research]
ae_title = "{site.research.aet}"
host = "{LOOPBACK}"
port = {site.research.dicom_port}
retry_backoff = 0.5

[review]
database = "{site.review.database}"
poll_interval = 2

[pipeline]
data_dir = "{site.data_dir}"
{extra}
[anon]
identity_db = "{site.root / "identity.db"}"
key_file = "{site.root / "anon.key"}"
jobs = 2

[control]
socket = "{site.socket_path}"

[logging]
level = "info"
format = "json"
""",
        encoding="utf-8",
    )
    return site.config_path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def build_site(
    root: Path,
    staging: OrthancServer,
    research: OrthancServer,
    plan: StudyPlan | None = None,
    *,
    socket_path: Path | None = None,
    seed: int = 1000,
    postgres: PostgresServer | None = None,
) -> tuple[Site, int]:
    """Generate and load the studies, fill the review DB, write the config.

    *staging* and *research* must be running. The review DB is ``root/review.db`` (SQLite), or
    a new database on *postgres* when given. Returns the site and the port our SCP must use
    (staging already maps our AE title to it).
    """
    plan = plan or StudyPlan()
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    if postgres is not None:
        review = ReviewDB.create_postgresql(postgres)
    else:
        review = ReviewDB.create(root / "review.db")
    site = Site(
        root,
        staging,
        research,
        review,
        root / "anonpipe.toml",
        socket_path or root / "control.sock",
    )
    groups: Sequence[tuple[str, int, bool]] = (
        ("approved", plan.approved, False),
        ("protocol", plan.approved_with_protocol, True),
        ("rejected", plan.rejected_phi, False),
        ("held", plan.conflicting, False),
    )
    for index, (kind, count, protocol) in enumerate(groups):
        if not count:
            continue
        manifest = generate(
            root / "studies" / kind,
            patients=count,
            studies_per_patient=plan.studies_per_patient if kind == "approved" else 1,
            issuer_variants=plan.issuer_variants,
            series_per_study=plan.series_per_study,
            instances_per_series=plan.instances_per_series,
            size=plan.size,
            modalities=("CT", "MR"),
            protocol_series=protocol,
            seed=seed + index,
        )
        site.manifests.append(manifest)
        staging.upload(manifest.paths)
        for n, study in enumerate(manifest.studies):
            uid = study.study_instance_uid
            accession = f"{kind[:3].upper()}{seed + index}{n:03d}"
            if kind in ("approved", "protocol"):
                study_id = review.add_study(uid, accession)
                review.add_review(study_id, has_protocol_series=protocol, comment=f"ok {n}")
                (site.protocol_uids if protocol else site.approved_uids).append(uid)
            elif kind == "rejected":
                review.add_rejected_phi(uid, accession)
                site.rejected_uids.append(uid)
            else:
                review.add_conflicting(uid, accession)
                site.held_uids.append(uid)
    site.approved_uids.extend(site.protocol_uids)
    for n in range(plan.missing_from_staging):
        uid = f"2.25.{seed}{n:04d}999"
        review.add_approved(uid, f"MIS{n:03d}")
        site.missing_uids.append(uid)
    local_port = free_port()
    staging.add_modality("anonpipe", OUR_AE, LOOPBACK, local_port)
    write_config(site, local_port)
    return site, local_port


def build_site_from(
    root: Path,
    staging: OrthancServer,
    research: OrthancServer,
    manifests: Sequence[Manifest],
    *,
    upload: Callable[[Iterable[Path]], object] | None = None,
    socket_path: Path | None = None,
) -> tuple[Site, int]:
    """A site whose studies were generated beforehand: each study of *manifests* approved.

    For data :func:`build_site` does not generate (one 2 GiB multi-frame object, say). Each
    manifest's files are stored in *staging* by *upload* (default ``staging.upload``, REST;
    pass a ``storescu`` for objects too large to hold in memory), each study gets one approving
    review, the config is written as :func:`build_site` writes it. Returns the site and our
    SCP's port (staging already maps our AE title to it).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    review = ReviewDB.create(root / "review.db")
    site = Site(
        root,
        staging,
        research,
        review,
        root / "anonpipe.toml",
        socket_path or root / "control.sock",
    )
    store = upload or staging.upload
    for manifest in manifests:
        site.manifests.append(manifest)
        store(manifest.paths)
        for study in manifest.studies:
            uid = study.study_instance_uid
            study_id = review.add_study(uid, f"APP{len(site.approved_uids):04d}")
            review.add_review(study_id, comment=f"ok {len(site.approved_uids)}")
            site.approved_uids.append(uid)
    local_port = free_port()
    staging.add_modality("anonpipe", OUR_AE, LOOPBACK, local_port)
    write_config(site, local_port)
    return site, local_port
