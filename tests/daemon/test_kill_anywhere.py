"""kill -9 at ten seeded random moments of a ten-study run (issue 10, item 7).

The same plan runs twice, each on its own pair of Orthancs: once uninterrupted (the reference),
once killed -9 (the daemon and its workers, as systemd kills a cgroup) ten times and restarted
after each kill, then left to finish. Both must end in the same state: the research PACS's
content, the review DB, the state store, every audit file (each line once), the quarantine and
identity.db. Values that are random per site (pseudonyms, dates, run names) are compared by
shape, not by value.

The kill moments are drawn on the reference's record of its durable progress (run state, studies
done, objects landed, de-identified or in the research PACS: what a kill does not undo), so a
moment is "once the run got as far as the reference had at t". Five are spread over the pulls
and pushes; five aim at steps too short to be hit by chance: start-up, between two studies, the
hook, a study's verification, the write-back. Each restart waits for its moment (at once if the
run is already there) and kills. The seed comes from ``ANONPIPE_KILL_SEED``; a failure message
gives the seed, the moments and the state each kill hit, for a replay (timing still varies)::

    ANONPIPE_KILL_SEED=<seed> .venv/bin/pytest -s tests/daemon/test_kill_anywhere.py
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import inspect
import json
import os
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from pprint import pformat
from typing import Any

import pytest

from anonpipe.anon.identity import TABLES
from anonpipe.config import Settings, load_settings
from anonpipe.daemon import audit
from anonpipe.daemon.rundir import AUDIT_FILES, RunDir
from anonpipe.daemon.service import Service
from anonpipe.daemon.state import StateStore
from anonpipe.daemon.states import RUN_PHASES, RunState, StudyState
from tests.harness.daemon import Daemon, make_site, query_state, run_state
from tests.harness.deployment import Site, StudyPlan, build_site
from tests.harness.orthanc import OrthancFactory, OrthancServer

pytestmark = pytest.mark.timeout(120)

#: Ten studies in the run (eight approved, one with a protocol series, one missing from the
#: staging PACS) and one held back beside them; 160 objects a study, so an
#: uninterrupted run lasts about 30 s on two cores and every step can be hit.
PLAN = StudyPlan(
    approved=8,
    approved_with_protocol=1,
    rejected_phi=0,
    conflicting=1,
    missing_from_staging=1,
    series_per_study=2,
    instances_per_series=80,
    size=(64, 64),
)
KILLS = 10
DEFAULT_SEED = 7

#: Run states in order.
PHASES = RUN_PHASES

#: (run state's index, the sum of its studies' ranks, objects on the way): see progress().
Progress = tuple[int, int, int]
START: Progress = (-1, 0, 0)


def _count(folder: Path, depth: int) -> int:
    """Visible files *depth* folders below *folder* (hidden ones are still being written);
    os.scandir, cheap enough to poll every 10 ms without slowing the run."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    if depth == 0:
        return sum(1 for e in entries if e.is_file() and not e.name.startswith("."))
    return sum(_count(Path(e.path), depth - 1) for e in entries if e.is_dir())


def progress(site: Site) -> Progress:
    """The run's durable progress, which only grows, across kills too.

    The run state, how far its studies are (each study's state ranks its steps; studies flow
    side by side, so the sum is what grows), and the objects there for good: landed,
    de-identified, in the research PACS. A resumed run keeps all of these, so "the killed run
    got as far as the reference had at t" is ``progress(killed) >= progress(reference at t)``.
    """
    run = run_state(site)
    if run == "failed":
        raise AssertionError(f"the run failed: {query_state(site, 'SELECT error FROM runs')}")
    if run not in PHASES:
        return START
    states = [StudyState(str(s)) for (s,) in query_state(site, "SELECT state FROM studies")]
    objects = 0
    runs = RunDir.list(site.data_dir)
    if runs:
        objects += _count(runs[-1].from_staging, 1) + _count(runs[-1].to_production, 2)
    if any(s.rank >= StudyState.PUSHING.rank for s in states):
        objects += int(site.research.get_json("/statistics")["CountInstances"])
    return (PHASES.index(RunState(str(run))), sum(s.rank for s in states), objects)


def in_hand(site: Site) -> str:
    """The study states a kill can interrupt that were there at once (joined)."""
    states = {str(s) for (s,) in query_state(site, "SELECT state FROM studies")}
    return (
        "+".join(
            sorted(
                states
                & {"selected", "pulling", "deidentified", "hooked", "pushing", "verified", "failed"}
            )
        )
        or "-"
    )


def describe(point: Progress) -> str:
    phase, ranks, objects = point
    if phase < 0:
        return "started"
    return f"{PHASES[phase]}, study ranks {ranks}" + (f", {objects} objects" if objects else "")


@dataclass(frozen=True)
class Moment:
    """Where to kill: once the run's progress reaches `point`, after `delay` seconds."""

    what: str
    point: Progress
    delay: float

    def __str__(self) -> str:
        return f"{self.what} ({describe(self.point)}, +{self.delay:.2f} s)"


@dataclass(frozen=True)
class Kill:
    """What one kill hit, read from the state store and the run directory after it."""

    moment: Moment
    after: float
    ready: bool
    run: str | None
    in_hand: str
    studies: dict[str, int]
    progress: Progress

    def __str__(self) -> str:
        where = f"run {self.run}" if self.ready else f"start-up (before READY=1), run {self.run}"
        return (
            f"at {self.moment}, {self.after:.2f} s after the start: {where}, study in hand"
            f" {self.in_hand}; {describe(self.progress)}; studies {self.studies}"
        )


@dataclass
class Timeline:
    """The reference run: when each progress was first reached, when READY=1 came, the end."""

    times: list[float]
    points: list[Progress]
    ready: float
    length: float

    def at(self, t: float) -> Progress:
        return self.points[max(bisect.bisect_right(self.times, t) - 1, 0)]

    def first(self, predicate: Callable[[Progress], bool]) -> float:
        return next((t for t, p in zip(self.times, self.points, strict=True) if predicate(p)), 0)

    def span(self, phase: RunState) -> float:
        """How long the reference spent in run state *phase* (0 when too short to be seen)."""
        index = PHASES.index(phase)
        start = self.first(lambda p: p[0] >= index)
        return max(self.first(lambda p: p[0] > index) - start, 0.0) if start else 0.0


def watch(site: Site, daemon: Daemon, timeout: float = 180.0) -> Timeline:
    """Follow the uninterrupted *daemon* to the end of its run."""
    started = time.monotonic()
    times: list[float] = []
    points: list[Progress] = []
    ready = 0.0
    while run_state(site) != "done":
        now = time.monotonic() - started
        if now > timeout or daemon.proc.poll() is not None:
            raise AssertionError(f"the reference run did not finish: {daemon.log_tail()}")
        if not ready and any("READY=1" in m for m in daemon.messages):
            ready = now
        point = progress(site)
        if not points or point > points[-1]:
            times.append(now)
            points.append(point)
        time.sleep(0.01)
    length = time.monotonic() - started
    return Timeline(times, points, ready, length)


def draw(rng: random.Random, ref: Timeline) -> list[Moment]:
    """Ten moments over the reference run: four just after a study's state was committed
    (between two steps: a pull's end, a hook, a verification, a write-back; too short to be hit
    by chance), five spread uniformly over the run (one in each fifth), and one at start-up."""
    pulling, writing = PHASES.index(RunState.PULLING), PHASES.index(RunState.WRITING_BACK)
    # The first point of each study-rank sum: just after some study's state changed.
    steps = sorted(
        {
            min(p for p in ref.points if p[:2] == key)
            for key in {p[:2] for p in ref.points if p[0] >= pulling}
        }
    )
    steps = [p for p in steps if p[1] > 0]
    moments = [
        Moment("after a study's step", point, 0.0)
        for point in rng.sample(steps, min(4, len(steps)))
    ]
    begin = ref.first(lambda p: p[0] >= pulling)
    # The last progress seen before the run's summaries (too short to be seen, often).
    end = max((t for t, p in zip(ref.times, ref.points, strict=True) if p[0] < writing), default=0)
    spread = KILLS - 1 - len(moments)
    for k in range(spread):
        t = begin + (end - begin) * (k + rng.random()) / spread
        moments.append(Moment(f"{t:.2f} s into the run", ref.at(t), 0.0))
    moments.sort(key=lambda m: (m.point, m.delay))
    # Start-up, before READY=1: at any restart.
    moments.insert(rng.randrange(KILLS), Moment("start-up", START, rng.uniform(0, ref.ready)))
    return moments


def kill_at(site: Site, sockets: Path, moment: Moment) -> Kill:
    """Start the daemon, wait for *moment*, kill -9 its process group; say what it hit."""
    daemon = Daemon(site, sockets)
    started = time.monotonic()
    try:
        daemon.wait_for(lambda: progress(site) >= moment.point, timeout=120, what=f"{moment}")
        time.sleep(moment.delay)
        assert daemon.proc.poll() is None, f"the daemon exited: {daemon.log_tail()}"
        ready = any("READY=1" in m for m in daemon.messages)
    finally:
        daemon.kill()
    after = time.monotonic() - started
    run = run_state(site)
    states = [str(s) for (s,) in query_state(site, "SELECT state FROM studies")]
    counts = dict(sorted(Counter(states).items()))
    return Kill(moment, after, ready, run, in_hand(site), counts, progress(site))


def research_shape(server: OrthancServer) -> list[tuple[int, ...]]:
    """Per study the instance counts of its series, sorted."""
    shape = []
    for study in server.get_json("/studies?expand"):
        shape.append(
            tuple(
                sorted(len(server.get_json(f"/series/{s}")["Instances"]) for s in study["Series"])
            )
        )
    return sorted(shape)


def masked(text: str, cleaned: dict[str, str]) -> str:
    """*text* without what differs per site: cleaned study UIDs, quarantine tokens, times, and
    how many files a resumed push found already there."""
    for uid, name in cleaned.items():
        text = text.replace(uid, name)
    text = re.sub(r"\b[0-9a-f]{24}\b", "<token>", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "<time>", text)
    return re.sub(r"\(\d+ were already there\)", "(<n> were already there)", text)


def end_state(site: Site) -> dict[str, object]:
    """Everything a run leaves behind that must not depend on how often it was killed."""
    state: dict[str, object] = {}
    studies = query_state(
        site,
        "SELECT review_id, state, reason, expected, landed, clean, quarantined, duplicates,"
        " pushed, notes, cleaned_study_uid FROM studies ORDER BY review_id",
    )
    cleaned = {str(row[-1]): f"<study {row[0]}>" for row in studies if row[-1]}
    state["state.db runs"] = query_state(site, "SELECT state, error FROM runs")
    state["state.db studies"] = [row[:-1] for row in studies]
    state["state.db files"] = query_state(
        site,
        "SELECT review_id, status, reason, pushed, COUNT(*) FROM files"
        " GROUP BY review_id, status, reason, pushed ORDER BY 1, 2, 3, 4",
    )
    state["state.db backoff"] = query_state(site, "SELECT review_id, failures FROM backoff")

    # The research PACS holds exactly the clean files, once, under the published study UIDs.
    state["research studies, series x instances"] = research_shape(site.research)
    state["research patients"] = len(site.research.patients())
    clean = {
        str(u)
        for (u,) in query_state(site, "SELECT sop_instance_uid FROM files WHERE status = 'clean'")
    }
    state["research holds exactly the clean files"] = site.research.sop_instance_uids() == clean
    state["research instances"] = len(site.research.instances())

    # The review DB, row for row (its own dates and the cleaned UID, which is per site, aside).
    rows = []
    for row in site.review.studies():
        values = dataclasses.asdict(row)
        for volatile in ("created", "modified", "pub_date", "processing_error_date"):
            values[volatile] = values[volatile] is not None if volatile.startswith("p") else "-"
        values["study_uid"] = cleaned.get(str(values["study_uid"]), values["study_uid"])
        rows.append(values)
    state["review DB studies"] = rows

    runs = RunDir.list(site.data_dir)
    state["run directories"] = len(runs)
    run = runs[-1]
    for name in AUDIT_FILES:
        lines = [masked(line, cleaned) for line in run.read_lines(name)]
        if name.startswith("post_anon"):
            # The hook lists the studies by cleaned UID (random per site), each with the
            # modality of its first file: random too in a CT + MR study.
            lines = ["\t".join(line.split("\t")[:3]) for line in lines]
        if name != "overview.txt":
            lines = sorted(lines)  # studies flow side by side: their lines interleave
        state[name] = lines if run.has(name) else None
    state["quarantine"] = sorted(
        json.loads(p.read_text())["reason"] for p in run.quarantine.glob("*.json")
    )
    state["quarantined objects"] = len(list(run.quarantine.glob("*.dcm")))
    state["to_production objects"] = sum(
        1 for p in run.to_production.rglob("*.dcm") if not p.name.startswith(".")
    )
    state["from_staging objects"] = sum(
        1 for p in run.from_staging.rglob("*") if p.is_file() and not p.name.startswith(".")
    )

    with sqlite3.connect(f"file:{site.root / 'identity.db'}?mode=ro", uri=True) as db:
        for table in (*TABLES, "study_patient"):
            (count,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            state[f"identity.db {table} rows"] = count
        for table in TABLES:
            (dupes,) = db.execute(
                f"SELECT COUNT(*) - COUNT(DISTINCT cleaned) FROM {table}"
            ).fetchone()
            state[f"identity.db {table} repeated pseudonyms"] = dupes
    return state


def leftovers(site: Site) -> list[str]:
    """Hidden temporary files a kill left in the run directory (reported, not compared)."""
    (run,) = RunDir.list(site.data_dir)
    return sorted(p.name for p in run.path.rglob(".*") if p.is_file())


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_kill_9_at_ten_random_moments_ends_as_an_uninterrupted_run(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    seed = int(os.environ.get("ANONPIPE_KILL_SEED", DEFAULT_SEED))
    rng = random.Random(seed)
    began = time.monotonic()
    # Two identical sites (the same seed), built side by side: one generates while the other
    # uploads. The servers start in this thread: each dies with the thread that started it
    # (PR_SET_PDEATHSIG), and the pool's threads end before the runs.
    servers = [(orthanc_factory("STAGING"), orthanc_factory("RESEARCH")) for _ in range(2)]

    def build(name: str, staging: OrthancServer, research: OrthancServer) -> Site:
        socket = short_dir / "ctl.sock"
        return build_site(tmp_path / name, staging, research, PLAN, socket_path=socket)[0]

    with ThreadPoolExecutor(2) as pool:
        reference, site = pool.map(build, ("reference", "killed"), *zip(*servers, strict=True))
    built = time.monotonic()

    daemon = Daemon(reference, short_dir)
    try:
        ref = watch(reference, daemon)
    finally:
        assert daemon.terminate() == 0
    moments = draw(rng, ref)

    kills: list[Kill] = []

    def context() -> str:
        """For failure messages: the seed, the moments, and what each kill so far hit."""
        return (
            f"seed {seed} (replay: ANONPIPE_KILL_SEED={seed}); reference run {ref.length:.1f} s\n"
            f"moments: {', '.join(map(str, moments))}\n"
            + "\n".join(f"kill {n}: {k}" for n, k in enumerate(kills, 1))
        )

    killed_from = time.monotonic()
    for moment in moments:
        try:
            kills.append(kill_at(site, short_dir, moment))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{context()}") from exc
    last = Daemon(site, short_dir)
    try:
        # Started first (a SIGTERM before the service's handlers are set kills it by signal, as
        # systemd expects; the test wants the exit code of a service that ran).
        last.wait_for(
            lambda: any("READY=1" in m for m in last.messages), timeout=60, what="READY=1"
        )
        last.wait_for(lambda: run_state(site) == "done", timeout=180, what="the run to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{context()}") from exc
    finally:
        assert last.terminate() == 0
    finished = time.monotonic()
    print(
        f"seed {seed}: sites built in {built - began:.1f} s, reference run {ref.length:.1f} s"
        f" (write-back {ref.span(RunState.WRITING_BACK):.2f} s),"
        f" killed run {finished - killed_from:.1f} s; temporary files left {leftovers(site)}\n"
        + context()
    )

    expected = end_state(reference)
    got = end_state(site)
    differences = {
        k: {"reference": expected[k], "killed": got[k]} for k in expected if got[k] != expected[k]
    }
    assert not differences, f"{pformat(differences, width=100)}\n{context()}"

    # Both are what an uninterrupted run must leave (the shared state checked once, absolutely).
    assert got["run directories"] == 1 and got["done.txt"] is not None
    assert got["research instances"] == site.expected_instances()
    assert len(site.research.studies()) == len(site.approved_uids)
    assert got["research holds exactly the clean files"] is True
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert row.image_published and row.study_uid in site.research.study_instance_uids()
    for uid in site.missing_uids:
        assert site.review.find_study(uid).processing_error
    for uid in site.held_uids + site.rejected_uids:
        row = site.review.find_study(uid)
        assert not row.image_published and not row.processing_error
    for name in AUDIT_FILES:
        lines = got[name]
        if name != "comments.txt" and isinstance(lines, list):  # comments may repeat ("ok 0")
            assert len(lines) == len(set(lines)), f"{name} repeats a line\n{context()}"
    assert got["identity.db patient rows"] == len(site.approved_uids)
    assert all(v == 0 for k, v in got.items() if k.endswith("repeated pseudonyms"))

    # The kills hit studies in different steps, or the test proves little.
    hit = {state for k in kills if k.ready for state in k.in_hand.split("+")}
    assert len(hit) >= 3, f"the kills hit only studies in {hit}\n{context()}"


# -- the narrow windows, each hit on purpose ---------------------------------------------------
#
# Between a step's audit lines (or folder) and the state that records it lie milliseconds: ten
# random kills rarely hit them. Here each is hit in-process: the first pass crashes right there,
# the next passes resume, and the run must end as an uninterrupted one.


class Crash(BaseException):
    """kill -9 at one line of the runner, in-process. The runner and the service catch
    Exception only, so nothing after that line runs; the ``finally`` blocks that do run close
    what is open and write nothing the resumed run reads."""


@dataclass(frozen=True)
class CrashPoint:
    """Crash at the first call of ``owner.method`` for which `when(args, kwargs)` holds: before
    the call runs, or (`after`) once it returned."""

    owner: type
    method: str
    after: bool
    when: Callable[[tuple[Any, ...], dict[str, Any]], bool]


def _always(_args: tuple[Any, ...], _kwargs: dict[str, Any]) -> bool:
    return True


def _study_state(state: str) -> Callable[[tuple[Any, ...], dict[str, Any]], bool]:
    return lambda _args, kwargs: kwargs.get("state") == state


CRASH_POINTS = {
    "run folder made, not recorded": CrashPoint(RunDir, "create", True, _always),
    "run recorded, its studies not": CrashPoint(StateStore, "add_run", True, _always),
    "study's pull audited, not its state": CrashPoint(
        StateStore, "update_study", False, _study_state("deidentified")
    ),
    "study's hook reported, not its state": CrashPoint(
        StateStore, "update_study", False, _study_state("hooked")
    ),
    "study's push audited, not its state": CrashPoint(
        StateStore, "update_study", False, _study_state("verified")
    ),
    "study published, not its state": CrashPoint(
        StateStore, "update_study", False, _study_state("published")
    ),
    "done.txt written, not the run's state": CrashPoint(
        StateStore, "set_run_state", False, lambda args, _kw: args[2] == "done"
    ),
}

#: Two studies delivered (one with a protocol series), one missing, one held back.
SMALL = StudyPlan(
    approved=1, approved_with_protocol=1, rejected_phi=0, conflicting=1, missing_from_staging=1
)


def crash_at(monkeypatch: pytest.MonkeyPatch, point: CrashPoint) -> None:
    """Make *point* raise :class:`Crash`, once."""
    original = getattr(point.owner, point.method)
    bound = isinstance(inspect.getattr_static(point.owner, point.method), classmethod)
    crashed: list[bool] = []

    def fire(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not crashed and point.when(args, kwargs):
            crashed.append(True)
            raise Crash(f"{point.owner.__name__}.{point.method}")

    if inspect.iscoroutinefunction(original):

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not point.after:
                fire(args, kwargs)
            result = await original(*args, **kwargs)
            if point.after:
                fire(args, kwargs)
            return result

        monkeypatch.setattr(point.owner, point.method, wrapper)
        return

    def plain(*args: Any, **kwargs: Any) -> Any:
        if not point.after:
            fire(args, kwargs)
        result = original(*args, **kwargs)
        if point.after:
            fire(args, kwargs)
        return result

    monkeypatch.setattr(point.owner, point.method, staticmethod(plain) if bound else plain)


def one_cycle(settings: Settings) -> None:
    """Start the service, let its scheduler take one turn (resume or start a run), stop."""

    async def turn() -> None:
        service = Service(settings)
        await service.start(control=False)
        try:
            await service._cycle()
        finally:
            await service.stop()

    asyncio.run(turn())


@pytest.mark.parametrize("where", list(CRASH_POINTS))
def test_a_crash_between_a_step_and_its_record_changes_nothing(
    where: str,
    orthanc_factory: OrthancFactory,
    tmp_path: Path,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, SMALL)
    settings = load_settings(site.config_path, {})
    crash_at(monkeypatch, CRASH_POINTS[where])
    with pytest.raises(Crash):
        one_cycle(settings)
    one_cycle(settings)  # the interrupted run resumes and ends
    one_cycle(settings)  # a later poll: nothing left to do

    runs = RunDir.list(site.data_dir)
    assert [r.name for r in runs] == [
        str(n) for (n,) in query_state(site, "SELECT name FROM runs")
    ], "a run folder without its run, or the other way round"
    assert len(runs) == 1 and run_state(site) == "done" and runs[0].done
    assert len(site.research.instances()) == site.expected_instances()
    for uid in site.approved_uids:
        assert site.review.find_study(uid).image_published
    (missing,) = site.missing_uids
    assert site.review.find_study(missing).processing_error
    # Every audit line once (the counts of files a resumed push found there aside).
    for name in AUDIT_FILES:
        if name != "comments.txt":  # reviewers' comments may repeat
            lines = [masked(line, {}) for line in runs[0].read_lines(name)]
            assert len(lines) == len(set(lines)), (name, lines)
    overview = [masked(line, {}) for line in runs[0].read_lines("overview.txt")]
    clean = site.expected_instances()
    landed = sum(
        len(series.instances)
        for m in site.manifests
        for study in m.studies
        if study.study_instance_uid in site.approved_uids
        for series in study.series
    )
    assert overview == [
        "Starting at <time>",
        audit.valid_reviewed(3),
        audit.held_back(1),
        audit.received(landed, 2),  # the protocol series' objects too (then quarantined)
        audit.not_pulled(1),
        audit.protocol_summary(1, 1),
        audit.hooked(clean, 2),
        "Push completed at <time>",
        audit.pushed(2),
    ]
    push = runs[0].read_lines("push_output.txt")
    assert sum("files in the research PACS" in line for line in push) == 2, push
    assert sum("\tverified: " in line for line in push) == 2, push
