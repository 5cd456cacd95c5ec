"""Canonical IANA time-zone names, from the `tzdata` package's own tables.

``zoneinfo.available_timezones()`` also lists the backward-compatibility links
(Africa/Asmera, Asia/Calcutta, US/Eastern, Etc/UCT…), which a reader should never be
offered. The names offered are those of tzdata's ``zone.tab`` (one per country and
region, what people recognise) plus ``UTC``; an alias is mapped to its canonical name
through the links of ``tzdata.zi``, so a subscriber who has one sees and keeps the
current spelling of the same clock.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

UTC_NAME = "UTC"
_UTC_TARGET = "Etc/UTC"


def _table(name: str) -> str:
    return resources.files("tzdata.zoneinfo").joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def canonical_zones() -> tuple[str, ...]:
    """Every zone a reader may pick, sorted: zone.tab's names and UTC."""
    names = {UTC_NAME}
    for line in _table("zone.tab").splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("\t")[2])
    return tuple(sorted(names))


@lru_cache(maxsize=1)
def _links() -> dict[str, str]:
    """alias -> target, from tzdata.zi's ``L TARGET ALIAS`` lines."""
    links = {}
    for line in _table("tzdata.zi").splitlines():
        if line.startswith("L "):
            _, target, alias = line.split()
            links[alias] = target
    return links


@lru_cache(maxsize=1024)
def canonical_zone(name: str) -> str:
    """The name to store and show for a valid zone name ``name``.

    A canonical name is itself; an alias is its link's target (Africa/Asmera ->
    Africa/Nairobi, Asia/Calcutta -> Asia/Kolkata, Etc/UTC and its aliases -> UTC). A
    real zone outside zone.tab (Etc/GMT+5) is kept as it is: it is not an alias.
    """
    offered = set(canonical_zones())
    seen = {name}
    current = name
    while current not in offered and current in _links():
        current = _links()[current]
        if current in seen:  # a loop would be a broken tzdata; keep what was given
            return name
        seen.add(current)
    if current == _UTC_TARGET:
        return UTC_NAME
    return current if current in offered else name
