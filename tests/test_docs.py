"""Reference docs: every setting is described and docs/settings.md is current; every CLI argument has help."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from mlocompile.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("settings_doc", ROOT / "scripts" / "settings_doc.py")
assert _spec is not None and _spec.loader is not None
settings_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(settings_doc)


@pytest.mark.parametrize("cls", [c for c, _ in settings_doc.CLASSES], ids=lambda c: c.__name__)
def test_every_field_has_a_complete_true_entry(cls):
    assert settings_doc.problems(cls) == []
    _, entries = settings_doc._sections(cls)
    assert list(entries) == [f.name for f in dataclasses.fields(cls)]  # one entry per field, in field order
    for name, text in entries.items():
        parts = settings_doc.parse_entry(text)
        assert len(parts["meaning"]) > 20, (name, parts)  # says what it means, not only labels


def test_the_check_catches_a_missing_entry_a_wrong_default_and_a_stray_entry():
    @dataclasses.dataclass
    class Settings:
        """Some settings.

        Attributes:
            lr: The step size of the update. Default: ``0.1``. Betty: same. Read by: sgd.
            gone: A field that was removed. Default: ``1``. Betty: not in Betty. Read by: nothing.
            half: Half an entry, with no labels at all.
        """

        lr: float = 0.2
        steps: int = 3
        half: int = 0

    assert settings_doc.problems(Settings) == [
        "Settings's docstring describes 'gone', which is not one of its fields",
        "Settings.half's entry has no Default / Betty / Read by (write 'Label: ...')",
        "Settings.lr: the entry says Default: '``0.1``.', the field's is 0.2",
        "Settings.steps has no entry in the class docstring's Attributes: section",
    ]


def test_settings_page_is_generated_from_the_docstrings_and_current():
    page = settings_doc.PAGE.read_text(encoding="utf-8")
    assert page == settings_doc.render(), "docs/settings.md is stale: run python scripts/settings_doc.py"
    assert (
        "### `EngineConfig.in_place_updates`" in page and "| `memory_budget` | `float \\| None` | `None` | no |" in page
    )
    assert settings_doc.main(["--check"]) == 0
    assert "docs/settings.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_of_every_subcommand_explains_every_argument(command, capsys):
    sub = _subcommands()[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"mlocompile {command} {name} has no help="
        assert " ".join(sub._get_formatter()._expand_help(action).split()) in shown, (command, name)
