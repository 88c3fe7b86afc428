"""`selfe recipes`: the bundled recipes."""

from __future__ import annotations

from selfe_cli.cli.app import app, table_console


@app.command()
def recipes() -> None:
    """List the bundled recipes (use them by name or as recipes/NAME.yaml)."""
    from rich.table import Table

    from selfe_cli.recipes.loader import bundled_recipes, read_yaml

    table = Table(title="bundled recipes")
    for col in ("name", "method", "model", "data", "steps", "description"):
        table.add_column(col)
    for name, path in bundled_recipes().items():
        raw = read_yaml(path)
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        desc = first.lstrip("# ").strip() if first.startswith("#") else ""
        table.add_row(name, str((raw.get("method") or {}).get("name", "flow_matching")),
                      str((raw.get("model") or {}).get("name", "?")), str((raw.get("data") or {}).get("name", "?")),
                      str((raw.get("train") or {}).get("total_steps", "")), desc)
    table_console().print(table)
