"""Composable builders that mft's recipes are made of (one concern per module)."""
