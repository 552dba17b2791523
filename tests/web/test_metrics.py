"""The collector: families from one snapshot, parsable, in a registry of our own."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from anonpipe.daemon.pipeline import Step
from anonpipe.daemon.states import RunState, StudyState
from anonpipe.daemon.status import PeerStatus, ServiceState, StatusReport
from anonpipe.scp import ScpStatus
from anonpipe.web.history import STUDY_STEPS, RunTally, StudyTimes
from anonpipe.web.metrics import Snapshot, make_registry


def _tally(name: str, start: int, end: int | None, state: RunState, **counts: int) -> RunTally:
    return RunTally(
        name=name,
        state=state,
        practice=False,
        no_push=False,
        started=datetime.fromtimestamp(start, UTC),
        finished=datetime.fromtimestamp(end, UTC) if end is not None else None,
        error=None,
        studies=Counter({StudyState.PUBLISHED: counts.get("published", 0)}),
        files=Counter(clean=counts.get("clean", 0), pushed=counts.get("clean", 0)),
        quarantine=Counter({"burned-in annotation": counts.get("burned", 0)}),
        held=(7,) if counts.get("held") else (),
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_families_from_a_snapshot() -> None:
    registry, collector = make_registry()
    assert generate_latest(registry) == b""  # nothing before the first scrape's snapshot
    status = StatusReport(
        state="idle",
        service=ServiceState.IDLE,
        misroute="objects of an unexpected study arrived",
        scp=ScpStatus(
            ae_title="ANONPIPE",
            bind="127.0.0.1",
            port=11112,
            listening=True,
            active_associations=1,
            expected_studies=0,
            landed=42,
            refused={"out of resources": 2},
            rejected_associations={"calling AE title is not an allowed peer": 3},
            bytes_received=5_000_000,
            accepted_associations=4,
        ),
        peers={
            "staging": PeerStatus("STAGING@h:1", True, ""),
            "research": PeerStatus("RESEARCH@h:2", False, "no connection"),
        },
        version="0.1.0",
    )
    runs = [
        _tally("run_at_1000", 1000, 1100, RunState.DONE, published=2, clean=10, burned=1, held=1),
        _tally("run_at_2000", 2000, 2030, RunState.FAILED, clean=5),
        _tally("run_at_3000", 3000, None, RunState.PULLING, held=1),
    ]
    collector.snapshot = Snapshot(status=status, runs=runs, free_bytes=123)
    samples = _samples(generate_latest(registry).decode())

    assert samples[("anonpipe_files_total", (("outcome", "clean"),))] == 15
    assert samples[("anonpipe_files_total", (("outcome", "pushed"),))] == 15
    assert samples[("anonpipe_quarantined_files_total", (("reason", "burned-in annotation"),))] == 1
    assert samples[("anonpipe_studies", (("state", "published"),))] == 2
    assert samples[("anonpipe_latest_run_studies", (("state", "published"),))] == 0
    assert samples[("anonpipe_runs", (("state", "done"),))] == 1
    assert samples[("anonpipe_run_duration_seconds_count", ())] == 2
    assert samples[("anonpipe_run_duration_seconds_sum", ())] == 130
    assert samples[("anonpipe_run_duration_seconds_bucket", (("le", "60.0"),))] == 1
    assert samples[("anonpipe_run_duration_seconds_bucket", (("le", "300.0"),))] == 2
    assert samples[("anonpipe_last_successful_run_timestamp_seconds", ())] == 1100
    assert samples[("anonpipe_held_studies", ())] == 1
    # held since the first run that held it
    assert samples[("anonpipe_held_study_since_timestamp_seconds", (("study", "7"),))] == 1000
    assert samples[("anonpipe_peer_up", (("peer", "research"),))] == 0
    assert samples[("anonpipe_peer_up", (("peer", "staging"),))] == 1
    assert samples[("anonpipe_misroute_latched", ())] == 1
    assert samples[("anonpipe_service_state", (("state", "idle"),))] == 1
    assert samples[("anonpipe_service_state", (("state", "running"),))] == 0
    assert samples[("anonpipe_scp_objects_landed_total", ())] == 42
    assert samples[("anonpipe_scp_bytes_received_total", ())] == 5_000_000
    assert samples[("anonpipe_scp_associations_accepted_total", ())] == 4
    rejected = ("reason", "calling AE title is not an allowed peer")
    assert samples[("anonpipe_scp_associations_rejected_total", (rejected,))] == 3
    assert samples[("anonpipe_scp_objects_refused_total", (("reason", "out of resources"),))] == 2
    assert samples[("anonpipe_data_dir_free_bytes", ())] == 123
    assert samples[("anonpipe_build_info", (("version", "0.1.0"),))] == 1


def test_study_step_times_bytes_pushed_and_held_since_from_a_snapshot() -> None:
    registry, collector = make_registry()
    older = replace(
        _tally("run_at_1000", 1000, 1100, RunState.DONE, published=2, held=1),
        held_since={7: datetime.fromtimestamp(1040.5, UTC)},
        bytes_pushed=3_000,
        study_times=(
            StudyTimes(1, {Step.PULL: 0.5, Step.DEIDENTIFY: 2.0, Step.PUSH: 4.0}, 20.0),
            StudyTimes(2, {Step.PULL: 12.0, Step.WRITEBACK: 1.0}, 100.0),
        ),
    )
    newer = replace(
        _tally("run_at_2000", 2000, None, RunState.PUSHING, held=1),
        held_since={7: datetime.fromtimestamp(2001, UTC)},  # held again: since the first run
        bytes_pushed=500,
        study_times=(StudyTimes(3, {Step.PULL: 70.0}),),  # in flight: no total yet
    )
    collector.snapshot = Snapshot(status=StatusReport(state="idle"), runs=[older, newer])
    samples = _samples(generate_latest(registry).decode())

    def bucket(le: str, **labels: str) -> float:
        return samples[
            (
                "anonpipe_study_step_duration_seconds_bucket",
                tuple(sorted({**labels, "le": le}.items())),
            )
        ]

    step = "anonpipe_study_step_duration_seconds"
    assert samples[(f"{step}_count", (("step", "pull"),))] == 3
    assert samples[(f"{step}_sum", (("step", "pull"),))] == 82.5
    assert bucket("1.0", step="pull") == 1
    assert bucket("5.0", step="pull") == 1
    assert bucket("15.0", step="pull") == 2
    assert bucket("60.0", step="pull") == 2
    assert bucket("120.0", step="pull") == 3
    assert bucket("+Inf", step="pull") == 3
    assert samples[(f"{step}_count", (("step", "deidentify"),))] == 1
    assert samples[(f"{step}_sum", (("step", "push"),))] == 4.0
    assert bucket("1.0", step="writeback") == 1
    for untimed in ("hook", "verify"):  # every step has its histogram, empty or not
        assert samples[(f"{step}_count", (("step", untimed),))] == 0
    assert {dict(labels)["step"] for name, labels in samples if name == f"{step}_count"} == {
        s.value for s in STUDY_STEPS
    }
    study = "anonpipe_study_duration_seconds"
    assert samples[(f"{study}_count", ())] == 2  # the study in flight has no total yet
    assert samples[(f"{study}_sum", ())] == 120.0
    assert samples[(f"{study}_bucket", (("le", "30.0"),))] == 1
    assert samples[(f"{study}_bucket", (("le", "120.0"),))] == 2
    assert samples[("anonpipe_bytes_pushed_total", ())] == 3_500
    assert samples[("anonpipe_held_study_since_timestamp_seconds", (("study", "7"),))] == 1040.5
    # Without a service status, the SCP's counters are not invented.
    assert ("anonpipe_scp_bytes_received_total", ()) not in samples


def test_no_successful_run_yet_reads_zero_and_the_global_registry_is_untouched() -> None:
    registry, collector = make_registry()
    collector.snapshot = Snapshot(status=StatusReport(state="idle"), runs=[])
    samples = _samples(generate_latest(registry).decode())
    assert samples[("anonpipe_last_successful_run_timestamp_seconds", ())] == 0
    assert b"anonpipe_" not in generate_latest(REGISTRY)
