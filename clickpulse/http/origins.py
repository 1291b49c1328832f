"""Origin patterns: exact origins (`https://shop.example`) or one leading wildcard label
(`https://*.shop.example`, any subdomain, not the bare domain). Used by CORS_ORIGINS and by
browser keys."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_ORIGIN = re.compile(r"(https?)://(\*\.)?([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)(:\d{1,5})?")


@dataclass(frozen=True, slots=True)
class OriginPatterns:
    exact: frozenset[str] | tuple[()] = ()
    suffixes: tuple[tuple[str, str], ...] = ()  # (scheme://, .domain[:port])

    @classmethod
    def parse(cls, texts: Iterable[str]) -> OriginPatterns:
        exact: set[str] = set()
        suffixes: list[tuple[str, str]] = []
        for text in texts:
            origin = text.strip().rstrip("/").lower()
            match = _ORIGIN.fullmatch(origin)
            if match is None:
                raise ValueError(f"{text!r} is not an origin like https://shop.example or https://*.shop.example")
            scheme, wildcard, host, port = match.groups()
            if wildcard:
                suffixes.append((f"{scheme}://", f".{host}{port or ''}"))
            else:
                exact.add(origin)
        return cls(frozenset(exact), tuple(suffixes))

    def __bool__(self) -> bool:
        return bool(self.exact) or bool(self.suffixes)

    def allows(self, origin: str) -> bool:
        if origin in self.exact:  # browsers send an origin in lower case: no copy to look it up
            return True
        origin = origin.lower()
        if origin in self.exact:
            return True
        for scheme, suffix in self.suffixes:
            if origin.startswith(scheme) and origin.endswith(suffix):
                label = origin[len(scheme):-len(suffix)]
                if label and _ORIGIN.fullmatch(f"{scheme}{label}") and ":" not in label:
                    return True
        return False

    def union(self, other: OriginPatterns) -> OriginPatterns:
        return OriginPatterns(frozenset((*self.exact, *other.exact)), (*self.suffixes, *other.suffixes))
