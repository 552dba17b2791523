"""What the web tests share: a site with ``[web]``, a crawler, the metrics, listening sockets.

The crawler follows every link of every page it reaches (same origin only) and keeps each
page's bytes, so a test can look for the planted identifiers in all of them.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.deployment import Site
from tests.harness.ports import LOOPBACK, free_port

__all__ = [
    "Crawl",
    "crawl",
    "enable_web",
    "fetch",
    "forbidden_strings",
    "listening_ports",
    "metrics",
]


def enable_web(site: Site) -> str:
    """Add ``[web] bind`` on a free loopback port to the site's configuration; its base URL."""
    port = free_port()
    text = site.config_path.read_text(encoding="utf-8")
    site.config_path.write_text(f'{text}\n[web]\nbind = "{LOOPBACK}:{port}"\n', encoding="utf-8")
    return f"http://{LOOPBACK}:{port}"


def fetch(url: str, timeout: float = 20.0) -> tuple[int, str, bytes]:
    """GET *url*: status, content type, body (an HTTP error's too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links += [value for name, value in attrs if name == "href" and value]


@dataclass
class Crawl:
    """Every page reached: URL → (status, content type, body)."""

    pages: dict[str, tuple[int, str, bytes]]

    def body(self, path: str) -> str:
        return next(
            body.decode()
            for url, (_s, _t, body) in self.pages.items()
            if urlsplit(url).path == path
        )

    def paths(self) -> set[str]:
        return {urlsplit(url).path for url in self.pages}


def crawl(base: str, limit: int = 500) -> Crawl:
    """Fetch ``base/`` and every page linked from a page reached, on the same host and port."""
    origin = urlsplit(base).netloc
    seen: dict[str, tuple[int, str, bytes]] = {}
    queue = deque([base + "/"])
    while queue and len(seen) < limit:
        url = queue.popleft()
        if url in seen:
            continue
        status, kind, body = fetch(url)
        seen[url] = (status, kind, body)
        if not kind.startswith("text/html"):
            continue
        parser = _Links()
        parser.feed(body.decode("utf-8"))
        for link in parser.links:
            target = urljoin(url, link).split("#", 1)[0]
            if urlsplit(target).netloc == origin and target not in seen:
                queue.append(target)
    return Crawl(seen)


def metrics(base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` parsed: sample name → (sorted labels → value)."""
    status, kind, body = fetch(base + "/metrics")
    assert status == 200 and kind.startswith("text/plain"), (status, kind)
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def forbidden_strings(site: Site) -> set[str]:
    """What no page and no label may show: every planted token and original UID of the site,
    and the review database's accession numbers."""
    found: set[str] = set()
    for manifest in site.manifests:
        found |= manifest.identifiers(uids=True)
    found |= set(site.approved_uids + site.held_uids + site.rejected_uids + site.missing_uids)
    found |= {row.accession_no for row in site.review.studies() if row.accession_no}
    return found


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process *pid* listens on (from /proc: its sockets in state LISTEN)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
