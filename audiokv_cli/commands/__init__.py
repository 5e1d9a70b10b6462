"""Command implementations behind `audiokv`: thin typer + rich layers over the library."""
