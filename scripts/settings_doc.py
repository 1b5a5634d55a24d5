"""Write docs/settings.md from the ``Attributes:`` sections of Config and EngineConfig.

    python scripts/settings_doc.py          # regenerate docs/settings.md
    python scripts/settings_doc.py --check  # exit 1 if a field has no entry or the page is stale

Each field's entry (Google style, one per field) reads
``name: What it means. Default: ``literal``. Betty: ... Read by: ...``; the default must
equal the dataclass's own (``ast.literal_eval``), so a changed default fails ``--check``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from mlocompile.config import Config, EngineConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "settings.md"
CLASSES = ((Config, "one per problem"), (EngineConfig, "one per engine"))
LABELS = ("Default", "Betty", "Read by")
_ENTRY = re.compile(r"^    (\w+): (.*)$")
_LABEL = re.compile(r"\s(Default|Betty|Read by):\s")


def _sections(cls: type) -> tuple[str, dict[str, str]]:
    """Split ``cls``'s docstring into its prose and its ``Attributes:`` entries (name -> joined text)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    prose, _, rest = doc.partition("\nAttributes:\n")
    entries: dict[str, list[str]] = {}
    for line in rest.splitlines():
        entry = _ENTRY.match(line)
        if entry:
            entries[entry.group(1)] = [entry.group(2)]
        elif line.startswith("        ") and entries:
            entries[next(reversed(entries))].append(line.strip())
        elif line.strip():
            break  # the section ended
    return prose.strip(), {name: " ".join(parts) for name, parts in entries.items()}


def parse_entry(text: str) -> dict[str, str]:
    """Split one entry into ``meaning`` and its labelled parts (``Default``, ``Betty``, ``Read by``)."""
    pieces = _LABEL.split(" " + text)
    parts = {"meaning": pieces[0].strip()}
    for label, value in zip(pieces[1::2], pieces[2::2]):
        parts[label] = value.strip()
    return parts


def problems(cls: type) -> list[str]:
    """What is wrong with ``cls``'s field entries (empty: each field has a complete, true entry)."""
    _, entries = _sections(cls)
    found = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in fields.keys() - entries.keys():
        found.append(f"{cls.__name__}.{name} has no entry in the class docstring's Attributes: section")
    for name in entries.keys() - fields.keys():
        found.append(f"{cls.__name__}'s docstring describes {name!r}, which is not one of its fields")
    for name in fields.keys() & entries.keys():
        parts = parse_entry(entries[name])
        missing = [label for label in ("meaning", *LABELS) if not parts.get(label)]
        if missing:
            found.append(f"{cls.__name__}.{name}'s entry has no {' / '.join(missing)} (write 'Label: ...')")
            continue
        literal = re.match(r"``(.*?)``", parts["Default"])
        default = _default(fields[name])
        if literal is None or _literal(literal.group(1)) != default:
            found.append(
                f"{cls.__name__}.{name}: the entry says Default: {parts['Default']!r}, the field's is {default!r}"
            )
    return sorted(found)


def _default(field: dataclasses.Field[Any]) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _md(text: str) -> str:
    return text.replace("``", "`")


def render() -> str:
    """The whole page, as ``docs/settings.md`` should hold it."""
    out = [
        "# Settings",
        "",
        "<!-- Generated from the docstrings of mlocompile/config.py by `python scripts/settings_doc.py`;",
        "     edit those, then rerun it (tests/test_docs.py fails while this page is stale). -->",
        "",
        "Every field of `mlocompile.Config` (how one problem is trained and differentiated) and",
        "`mlocompile.EngineConfig` (how the whole program runs). **Betty** says what the field is",
        "in Betty 0.2.1 (`betty-ml`), **Read by** which hypergradient methods, backends or parts",
        "of the engine use it. Fields are checked when the Engine is built; a bad value raises",
        "`ProgramError` naming the field, its value and what is allowed.",
    ]
    for cls, what in CLASSES:
        prose, entries = _sections(cls)
        fields = dataclasses.fields(cls)
        out += ["", f"## `{cls.__name__}` ({what})"]
        out += [line for para in prose.split("\n\n") for line in ("", _md(" ".join(para.split())))]
        out += ["", "| field | type | default | in Betty 0.2.1 |", "|---|---|---|---|"]
        parsed = {f.name: parse_entry(entries.get(f.name, "")) for f in fields}
        for f in fields:
            default = re.match(r"``(.*?)``", parsed[f.name].get("Default", "")) or None
            shown = default.group(1) if default else repr(_default(f))
            in_betty = "no" if parsed[f.name].get("Betty", "").startswith("not in Betty") else "yes"
            out.append(f"| `{f.name}` | `{str(f.type).replace('|', chr(92) + '|')}` | `{shown}` | {in_betty} |")
        for f in fields:
            parts = parsed[f.name]
            out += ["", f"### `{cls.__name__}.{f.name}`", "", _md(parts.get("meaning", "(no entry)")), ""]
            out.append(f"- **Betty 0.2.1:** {_md(parts.get('Betty', '?'))}")
            out.append(f"- **Read by:** {_md(parts.get('Read by', '?'))}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    """Regenerate the page, or with ``--check`` report what is missing or stale; return the exit status."""
    found = [p for cls, _ in CLASSES for p in problems(cls)]
    if "--check" in argv:
        if PAGE.read_text(encoding="utf-8") != render():
            found.append(f"{PAGE.relative_to(ROOT)} is stale: run python scripts/settings_doc.py")
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    for line in found:
        print(f"warning: {line}", file=sys.stderr)
    PAGE.write_text(render(), encoding="utf-8")
    print(PAGE.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
