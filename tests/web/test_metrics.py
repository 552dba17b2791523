"""The collector: families from one snapshot, parsable, in a registry of our own."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from anonpipe.daemon.states import RunState, StudyState
from anonpipe.daemon.status import PeerStatus, ServiceState, StatusReport
from anonpipe.scp import ScpStatus
from anonpipe.web.history import RunTally
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
    rejected = ("reason", "calling AE title is not an allowed peer")
    assert samples[("anonpipe_scp_associations_rejected_total", (rejected,))] == 3
    assert samples[("anonpipe_scp_objects_refused_total", (("reason", "out of resources"),))] == 2
    assert samples[("anonpipe_data_dir_free_bytes", ())] == 123
    assert samples[("anonpipe_build_info", (("version", "0.1.0"),))] == 1


def test_no_successful_run_yet_reads_zero_and_the_global_registry_is_untouched() -> None:
    registry, collector = make_registry()
    collector.snapshot = Snapshot(status=StatusReport(state="idle"), runs=[])
    samples = _samples(generate_latest(registry).decode())
    assert samples[("anonpipe_last_successful_run_timestamp_seconds", ())] == 0
    assert b"anonpipe_" not in generate_latest(REGISTRY)
