"""The DSRL data layer: task registry, HDF5 I/O and validation, trajectories, scores, plots."""
