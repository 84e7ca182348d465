"""What the scripts share to read, compare and report runs (no training code here)."""
