"""The local cluster driver of the end-to-end suite (README.md here)."""
