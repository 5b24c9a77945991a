"""Engines: RefittableEngine, its kinds (whole, segmented, hybrid), the bundle format and file I/O."""
