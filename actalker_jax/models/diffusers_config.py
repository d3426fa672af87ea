"""Frozen-dataclass configs whose fields are diffusers `config.json` keys."""

import dataclasses
from typing import Any, ClassVar


class DiffusersConfig:
    """Mixin for frozen dataclasses: `from_diffusers(dict)` and `to_diffusers()`.

    `OWN_FIELDS` names fields that are ours, not diffusers' (left out of `to_diffusers`).
    """

    OWN_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides):
        """From a diffusers config.json dict; keys starting with "_" are metadata and ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown diffusers config keys {unknown}")
        return cls(**{**values, **overrides})

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers constructor kwargs (tuples as lists, our own fields left out)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if k not in self.OWN_FIELDS}
