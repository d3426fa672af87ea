"""Data: clip records, preprocessing, synthetic talking faces, the grain input pipeline."""
