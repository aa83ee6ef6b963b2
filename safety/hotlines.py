"""The hotline directory (data/hotlines.yaml) and lookup by region."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

HOTLINES_FILE = Path(__file__).parent / "data" / "hotlines.yaml"
INTERNATIONAL = "INTL"
REQUIRED = ("name", "source", "last_verified")


@dataclass(frozen=True)
class Service:
    name: str
    source: str
    last_verified: dt.date
    call: str | None = None
    text: str | None = None
    chat: str | None = None
    email: str | None = None
    verified_how: str = ""


@dataclass(frozen=True)
class Region:
    code: str
    name: str
    emergency: str
    services: tuple[Service, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Directory:
    regions: dict[str, Region]
    fallback: dict

    def get(self, code: str | None) -> Region | None:
        return self.regions.get((code or "").strip().upper().replace("UK", "GB"))

    def choices(self) -> list[tuple[str, str]]:
        """(label, code) pairs for a region selector, international first."""
        return [("International", INTERNATIONAL)] + sorted((r.name, r.code) for r in self.regions.values())

    def stale(self, days: int, today: dt.date | None = None) -> list[str]:
        today = today or dt.date.today()
        out = [f"{r.code}: {s.name} ({s.last_verified})" for r in self.regions.values() for s in r.services
               if (today - s.last_verified).days > days]
        return out


def _date(value, where: str) -> dt.date:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError as exc:
        raise ValueError(f"{where}: last_verified must be a date (YYYY-MM-DD), got {value!r}") from exc


def load(path: Path = HOTLINES_FILE) -> Directory:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    regions = {}
    for code, raw in data["regions"].items():
        services = []
        for s in raw["services"]:
            where = f"{path}: {code}/{s.get('name', '?')}"
            missing = [k for k in REQUIRED if not s.get(k)]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            if not (s.get("call") or s.get("text") or s.get("chat")):
                raise ValueError(f"{where}: needs at least one of call, text, chat")
            services.append(Service(**{**s, "last_verified": _date(s["last_verified"], where)}))
        regions[code] = Region(code, raw["name"], str(raw["emergency"]), tuple(services))
    fallback = dict(data["fallback"])
    fallback["last_verified"] = _date(fallback["last_verified"], f"{path}: fallback")
    return Directory(regions, fallback)


@lru_cache(maxsize=1)
def directory() -> Directory:
    return load()
