"""
The keys of a DSRL dataset, for every module that reads, writes or batches one.

A DSRL file (and a recording, and the dict that training batches from) holds flat arrays of
transitions under these keys. Recordings add extras (``saferl_ros.recorder.EXTRA_KEYS``), which
DSRL's loader ignores.
"""

# Every DSRL dataset has exactly these arrays, one row per transition.
DSRL_KEYS = ('observations', 'next_observations', 'actions', 'rewards', 'costs', 'terminals',
             'timeouts')
# Stored as float32; the first three are (rows, dim) matrices, the others (rows,) vectors.
FLOAT_KEYS = ('observations', 'next_observations', 'actions', 'rewards', 'costs')
VECTOR_KEYS = ('observations', 'next_observations', 'actions')
# Episode-end flags, stored as bool: ``terminals`` (the task ended it), ``timeouts`` (the horizon).
FLAG_KEYS = ('terminals', 'timeouts')
