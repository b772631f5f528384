"""Files: checkpoint reading, atomic writes, output layout and ownership, calibration text."""
