"""Subcommands of this room; registered with laftr.cli.register_subcommand on import (being written)."""
