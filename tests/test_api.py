"""API snapshot: the public names and signatures users and other code rely on."""

from __future__ import annotations

import inspect

import mlocompile


def _describe() -> str:
    lines = []
    for name in sorted(mlocompile.__all__):
        obj = getattr(mlocompile, name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            lines.append(f"class {name}{inspect.signature(obj)}")
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and callable(member):
                    lines.append(f"    def {attr}{inspect.signature(member)}")
        elif inspect.isclass(obj):
            lines.append(f"exception {name}({obj.__mro__[1].__name__})")
        else:
            lines.append(f"def {name}{inspect.signature(obj)}")
    return "\n".join(lines) + "\n"


def test_all_is_sorted_and_complete():
    assert list(mlocompile.__all__) == sorted(mlocompile.__all__)
    assert all(hasattr(mlocompile, n) for n in mlocompile.__all__)


def test_public_api_snapshot(golden):
    golden("api.txt", _describe())
