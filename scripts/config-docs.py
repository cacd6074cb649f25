"""Rewrite the option table in docs/configuration.md from llamaproxy.config.SETTINGS.

Run after adding or changing an option: .venv/bin/python scripts/config-docs.py
(tests/test_config.py fails when an option is missing from the page.)
"""

from pathlib import Path

from llamaproxy.config import SETTINGS

HEADER = "| flag | environment | default | meaning |\n| --- | --- | --- | --- |\n"


def main() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    text = page.read_text()
    rows = []
    for s in SETTINGS:
        default = "—" if s.default in (None, "") else f"`{s.default}`"
        env = ", ".join(f"`{e}`" for e in s.env)
        rows.append(f"| `--{s.flag}` | {env} | {default} | {s.help} |")
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    page.write_text(text[:start] + HEADER + "\n".join(rows) + text[end:])


if __name__ == "__main__":
    main()
