"""Prometheus metrics, built at scrape time from the status model and the state store.

A custom collector (:class:`AnonpipeCollector`) in a registry of our own (never the process-wide
default one, which would also export whatever else registered there): each scrape of
``/metrics`` first reads a :class:`Snapshot` (one :func:`~anonpipe.daemon.status.build_status`,
the run tallies of :class:`~anonpipe.web.history.History`, the data folder's free space), then
``generate_latest`` asks the collector for its families, which it builds from that snapshot
alone. Nothing is counted twice in memory: the counters are the state store's own totals (so they
survive restarts), the SCP's are its counters since start (they reset with the process, as
Prometheus counters may).

Labels are anonpipe's own words (states, failure kinds, quarantine reasons, refusal reasons,
steps, ``staging``/``research``) and review ids; never an original identifier or UID.

The study histograms are built from each run's step times
(:class:`~anonpipe.web.history.StudyTimes`, the state store's ``study_steps``), so they too
survive restarts; a study is in a step's
histogram once it finished that step. Bytes pushed are the store's (the sizes of the clean files
in the research PACS); bytes received and associations accepted are the SCP's, since start.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import CollectorRegistry

from anonpipe import __version__
from anonpipe.daemon.states import Failure, RunState, StudyState
from anonpipe.daemon.status import ServiceState, StatusReport
from anonpipe.web.history import FILE_OUTCOMES, STUDY_STEPS, RunTally

__all__ = [
    "RUN_DURATION_BUCKETS",
    "STUDY_DURATION_BUCKETS",
    "AnonpipeCollector",
    "Snapshot",
    "make_registry",
]

#: Upper bounds (seconds) of the run duration histogram: 1 minute to a day.
RUN_DURATION_BUCKETS: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
#: Upper bounds (seconds) of the study and study step histograms: a second to a day.
STUDY_DURATION_BUCKETS: tuple[float, ...] = (
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    21600,
    86400,
)

Metric = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily | InfoMetricFamily


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape reports: read (asynchronously) just before the collector runs."""

    status: StatusReport
    #: Every run in the state store, oldest first.
    runs: Sequence[RunTally]
    #: Free bytes in the data folder's file system (None if it cannot be read).
    free_bytes: int | None = None
    taken: datetime = field(default_factory=lambda: datetime.now(UTC))


def free_bytes(data_dir: Path) -> int | None:
    """Free bytes for an unprivileged writer under *data_dir* (None if it is not there)."""
    try:
        return shutil.disk_usage(data_dir).free
    except OSError:
        return None


def _seconds(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def _histogram(
    family: HistogramMetricFamily,
    labels: Sequence[str],
    values: Sequence[float],
    bounds: Sequence[float],
) -> None:
    """Add one histogram of *values* (cumulative buckets at *bounds*, then +Inf) to *family*."""
    buckets = [(str(float(b)), float(sum(1 for v in values if v <= b))) for b in bounds]
    buckets.append(("+Inf", float(len(values))))
    family.add_metric(list(labels), buckets, sum_value=sum(values))


class AnonpipeCollector:
    """Builds every anonpipe metric family from :attr:`snapshot` (see module doc)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe ahead: the families exist only at scrape time."""
        return ()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        yield from self._service(snap.status)
        yield from self._store(snap.runs)
        yield from self._scp(snap.status)
        peers = GaugeMetricFamily(
            "anonpipe_peer_up",
            "Whether the PACS answered the scheduler's last C-ECHO (1) or not (0)",
            labels=["peer"],
        )
        for name, peer in sorted(snap.status.peers.items()):
            peers.add_metric([name], 1.0 if peer.ok else 0.0)
        yield peers
        if snap.free_bytes is not None:
            yield GaugeMetricFamily(
                "anonpipe_data_dir_free_bytes",
                "Free space in the data folder's file system ([pipeline] data_dir)",
                value=snap.free_bytes,
            )

    def _service(self, status: StatusReport) -> Iterator[Metric]:
        info = InfoMetricFamily("anonpipe_build", "The anonpipe version serving these metrics")
        info.add_metric([], {"version": status.version or __version__})
        yield info
        state = GaugeMetricFamily(
            "anonpipe_service_state",
            "What the service is doing: 1 for the current state, 0 for the others",
            labels=["state"],
        )
        for kind in ServiceState:
            state.add_metric([kind.value], 1.0 if status.service is kind else 0.0)
        yield state
        yield GaugeMetricFamily(
            "anonpipe_paused",
            "1 while an operator's pause holds (anonpipectl pause, until resume)",
            value=1.0 if status.paused else 0.0,
        )
        yield GaugeMetricFamily(
            "anonpipe_misroute_latched",
            "1 while the misroute guard stops pulls (objects of an unexpected study arrived); "
            "anonpipectl resume clears it",
            value=1.0 if status.misroute else 0.0,
        )
        yield GaugeMetricFamily(
            "anonpipe_deferred_studies",
            "Studies waiting out a back-off after failing again and again",
            value=len(status.deferred),
        )

    def _store(self, runs: Sequence[RunTally]) -> Iterator[Metric]:
        by_run_state: Counter[RunState] = Counter(r.state for r in runs)
        gauge = GaugeMetricFamily(
            "anonpipe_runs", "Runs in the state store, by state", labels=["state"]
        )
        for run_state in RunState:
            gauge.add_metric([run_state.value], by_run_state[run_state])
        yield gauge

        studies: Counter[StudyState] = Counter()
        failures: Counter[str] = Counter()
        files: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for run in runs:
            studies.update(run.studies)
            failures.update(run.failures)
            files.update(run.files)
            reasons.update(run.quarantine)
        gauge = GaugeMetricFamily(
            "anonpipe_studies",
            "Studies of every run in the state store, by their state (a study picked again in "
            "a later run counts once per run)",
            labels=["state"],
        )
        for study_state in StudyState:
            gauge.add_metric([study_state.value], studies[study_state])
        yield gauge
        latest = runs[-1] if runs else None
        gauge = GaugeMetricFamily(
            "anonpipe_latest_run_studies",
            "Studies of the newest run, by state",
            labels=["state"],
        )
        for study_state in StudyState:
            gauge.add_metric([study_state.value], latest.studies[study_state] if latest else 0)
        yield gauge
        counter = CounterMetricFamily(
            "anonpipe_study_failures",
            "Studies that failed, by kind (reported ones are written back to the review DB)",
            labels=["failure", "reported"],
        )
        for kind in Failure:
            counter.add_metric([kind.name, str(kind.reported).lower()], failures[kind.name])
        yield counter
        counter = CounterMetricFamily(
            "anonpipe_files",
            "Files of every run by outcome: clean, duplicate, quarantined, error (de-identified "
            "or set aside), pushed (clean files in the research PACS)",
            labels=["outcome"],
        )
        for outcome in FILE_OUTCOMES:
            counter.add_metric([outcome], files[outcome])
        yield counter
        yield CounterMetricFamily(
            "anonpipe_bytes_pushed",
            "Bytes of the clean files of every run that are in the research PACS (files "
            "recorded by versions before this count was kept add nothing)",
            value=sum(run.bytes_pushed for run in runs),
        )
        counter = CounterMetricFamily(
            "anonpipe_quarantined_files",
            "Quarantined files of every run, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(reasons.items()):
            counter.add_metric([reason], count)
        yield counter
        yield from self._times(runs, latest)

    def _times(self, runs: Sequence[RunTally], latest: RunTally | None) -> Iterator[Metric]:
        finished = [r for r in runs if r.state.finished and r.finished is not None]
        durations = [d for r in finished if (d := r.duration()) is not None]
        histogram = HistogramMetricFamily(
            "anonpipe_run_duration_seconds",
            "Finished runs (done or failed) by duration, start to end",
        )
        _histogram(histogram, [], durations, RUN_DURATION_BUCKETS)
        yield histogram
        times = [t for r in runs for t in r.study_times]
        histogram = HistogramMetricFamily(
            "anonpipe_study_step_duration_seconds",
            "Time studies spent in each step they finished: pull (C-MOVE, de-identifying as "
            "files land), deidentify (the files left when the C-MOVE ended), hook, push, "
            "verify, writeback",
            labels=["step"],
        )
        for step in STUDY_STEPS:
            values = [t.steps[step] for t in times if step in t.steps]
            _histogram(histogram, [step.value], values, STUDY_DURATION_BUCKETS)
        yield histogram
        histogram = HistogramMetricFamily(
            "anonpipe_study_duration_seconds",
            "Studies at their end (published, failed, practised; or de-identified in a run "
            "without push) by time from their pull's start to their last state",
        )
        totals = [t.total for t in times if t.total is not None]
        _histogram(histogram, [], totals, STUDY_DURATION_BUCKETS)
        yield histogram
        done = [r for r in finished if r.state is RunState.DONE]
        yield GaugeMetricFamily(
            "anonpipe_last_successful_run_timestamp_seconds",
            "When the newest run that ended done finished (Unix time; 0: none yet)",
            value=_seconds(done[-1].finished) if done else 0.0,
        )
        if finished:
            rate = finished[-1].files_per_second()
            yield GaugeMetricFamily(
                "anonpipe_last_run_files_per_second",
                "Files de-identified or set aside per second of the newest finished run",
                value=rate or 0.0,
            )
        held = GaugeMetricFamily(
            "anonpipe_held_study_since_timestamp_seconds",
            "Each study held in the newest run (its reviews conflict), by review id: when the "
            "first run that held it held it (Unix time; that run's start for runs recorded "
            "before study steps were)",
            labels=["study"],
        )
        for study in latest.held if latest else ():
            first = next((r for r in runs if study in r.held), None)
            since = first.held_since.get(study, first.started) if first is not None else None
            held.add_metric([str(study)], _seconds(since))
        yield held
        yield GaugeMetricFamily(
            "anonpipe_held_studies",
            "Studies held in the newest run (their reviews conflict)",
            value=len(latest.held) if latest else 0,
        )

    def _scp(self, status: StatusReport) -> Iterator[Metric]:
        scp = status.scp
        if scp is None:
            return
        yield GaugeMetricFamily(
            "anonpipe_scp_listening", "1 while our Storage SCP listens", value=int(scp.listening)
        )
        yield GaugeMetricFamily(
            "anonpipe_scp_associations_active",
            "Associations open on our Storage SCP",
            value=scp.active_associations,
        )
        yield GaugeMetricFamily(
            "anonpipe_scp_expected_studies",
            "Studies whose objects the SCP expects now (pulls in progress)",
            value=scp.expected_studies,
        )
        yield CounterMetricFamily(
            "anonpipe_scp_objects_landed",
            "Objects our Storage SCP received and kept, since the service started",
            value=scp.landed,
        )
        yield CounterMetricFamily(
            "anonpipe_scp_bytes_received",
            "Bytes of the objects our Storage SCP received and kept (as received, file meta "
            "included), since the service started",
            value=scp.bytes_received,
        )
        yield CounterMetricFamily(
            "anonpipe_scp_associations_accepted",
            "Associations our Storage SCP accepted (allowed peers, a free slot), since start",
            value=scp.accepted_associations,
        )
        counter = CounterMetricFamily(
            "anonpipe_scp_associations_rejected",
            "Associations or connections our Storage SCP refused, by reason, since start",
            labels=["reason"],
        )
        for reason, count in sorted(scp.rejected_associations.items()):
            counter.add_metric([reason], count)
        yield counter
        counter = CounterMetricFamily(
            "anonpipe_scp_objects_refused",
            "Objects our Storage SCP refused (C-STORE failure status), by reason, since start",
            labels=["reason"],
        )
        for reason, count in sorted(scp.refused.items()):
            counter.add_metric([reason], count)
        yield counter


def make_registry() -> tuple[CollectorRegistry, AnonpipeCollector]:
    """A registry of our own holding one :class:`AnonpipeCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    collector = AnonpipeCollector()
    registry.register(collector)
    return registry, collector
