"""Small dependency-free helpers (atomic files, output folders, platform defaults)."""
