"""Settings every test shares.

The tests' models are tiny: one thread is faster than two, two OpenMP threads on a loaded two-core machine spin
against each other (100x slowdowns seen), and seeded training then gives the same numbers whichever tests run
first and on whichever machine. So the whole suite runs single-threaded.
"""

import torch

torch.set_num_threads(1)
