"""The bottom layer: reading and writing images, labels and result files (imports no other usema package)."""
