"""Bundled sweep specs (YAML); the repository's top-level sweeps/ links here."""
