"""A plan: which branches each target layer becomes, by dotted name; JSON as in the contract."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from svdnas.errors import SpecError
from svdnas.lowrank.spec import LowRankSpec


@dataclass
class Plan:
    """Branches per layer; a layer with no branches is left as it was.

    Attributes:
        layers: dotted module name -> its branches, in model order.
    """

    layers: dict[str, list[LowRankSpec]] = field(default_factory=dict)

    def compressed(self) -> dict[str, list[LowRankSpec]]:
        """Only the layers that change."""
        return {k: v for k, v in self.layers.items() if v}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {"name": name, "branches": [s.to_dict() for s in specs]} for name, specs in self.layers.items()
            ]
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
            raise SpecError('a plan is {"layers": [{"name": ..., "branches": [...]}, ...]}')
        layers: dict[str, list[LowRankSpec]] = {}
        for entry in d["layers"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise SpecError(f"a plan entry needs a 'name': {entry!r}")
            if entry["name"] in layers:
                raise SpecError(f"layer {entry['name']!r} appears twice in the plan")
            branches = entry.get("branches", [])
            if not isinstance(branches, list):
                raise SpecError(f"'branches' of {entry['name']!r} must be a list")
            layers[entry["name"]] = [LowRankSpec.from_dict(b) for b in branches]
        return cls(layers)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"plan is not valid JSON: {e}") from e
