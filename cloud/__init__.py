"""ECOS cloud trainer."""
