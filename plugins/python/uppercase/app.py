"""wasmhook plugin `uppercase`, written in Python (componentize-py).

Upper-cases the string value of one top-level field of the event payload.

Config (all values are strings, as the host passes them):
- `field`:   top-level payload field to upper-case (default `event`).
- `strict`:  `true` to fail with a plugin error when the field is missing or
             not a string (default `false`: the event is kept unchanged).
- `explode`: `true` raises a Python exception on purpose, to show that an
             uncaught exception is a trap, not a plugin error (default `false`).

Decisions:
- transform: the payload with the field upper-cased, plus metadata
  `uppercase.field` = the field name for the next plugins of the chain.
- keep: the field is missing or not a string and `strict` is off.
- err(plugin-error): the payload is not a JSON object, a config value is
  invalid, or (with `strict=true`) the field is missing or not a string.

Build: componentize-py -d ../../../wit -w wasmhook:plugin/plugin componentize app -o uppercase.wasm
"""

import json
from typing import Dict, List

import wit_world
from componentize_py_types import Err
from wit_world.imports import log
from wit_world.imports.types import (
    Decision,
    Decision_Keep,
    Decision_Transform,
    Event,
    Message,
    Pair,
    PluginError,
)

NAME = "uppercase"


def fail(message: str) -> Err:
    """The WIT `err(plugin-error)`: raise what this returns."""
    return Err(PluginError(message=f"{NAME}: {message}"))


def short(text: str, limit: int = 64) -> str:
    """A value cut for a log line (the host keeps at most 2 KiB a line)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def config_bool(config: Dict[str, str], key: str, default: bool) -> bool:
    raw = config.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise fail(f"config `{key}` must be true or false, got {raw!r}")


class WitWorld(wit_world.WitWorld):
    def handle(self, event: Event, config: List[Pair]) -> Decision:
        # Later pairs with the same key win, as in a TOML table.
        cfg = {pair.key: pair.value for pair in config}

        if config_bool(cfg, "explode", False):
            # Deliberately NOT a plugin error: an uncaught exception traps.
            raise RuntimeError("explode=true: raising on purpose")

        field = cfg.get("field", "event") or "event"
        strict = config_bool(cfg, "strict", False)

        try:
            payload = json.loads(event.payload)
        except ValueError as e:
            raise fail(f"payload is not valid JSON: {e}")
        if not isinstance(payload, dict):
            raise fail(f"payload is not a JSON object but {type(payload).__name__}")

        value = payload.get(field)
        if not isinstance(value, str):
            what = "missing" if field not in payload else f"not a string ({type(value).__name__})"
            if strict:
                raise fail(f"field `{field}` is {what}")
            log.log(log.Level.DEBUG, f"field `{field}` is {what}; event {event.id} kept")
            return Decision_Keep()

        upper = value.upper()
        payload[field] = upper
        log.log(log.Level.INFO, f"upper-cased `{field}` of event {event.id}: {short(value)} -> {short(upper)}")
        return Decision_Transform(
            Message(
                payload=json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
                headers=[],
                metadata=[Pair(key=f"{NAME}.field", value=field)],
            )
        )
