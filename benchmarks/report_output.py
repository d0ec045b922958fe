"""How the benchmark scripts hand over a report: printed, and written atomically to ``--output`` when given."""

from __future__ import annotations

from pathlib import Path

from usema.io.files import atomic_write_text


def print_and_write(lines: list[str], output: Path | None) -> str:
    """Print the report made of ``lines`` and write it to ``output`` (if not None) in one atomic step."""
    text = "\n".join(lines) + "\n"
    print(text)
    if output:
        atomic_write_text(output, text)
    return text
